"""TensorRT engines from a csp-export folder (through Polygraphy), and a TensorRT runtime backend.

    build_engines("exports/fp16", "engines/fp16")                   # fp16 graphs -> fp16 engines
    build_engines("exports/int8-s8s8", "engines/int8")              # QDQ graphs -> explicit INT8
    build_engines("exports/fp32", "engines/int8c", precision="int8")   # implicit INT8, calibrated
    pipeline = TrtPipeline("engines/fp16")                           # K/V ring buffer on the GPU

Building: ``network_from_onnx_path`` -> ``CreateConfig`` (fp16 / int8 flags, a polygraphy
``Calibrator`` over the recorded calibration feeds with a calibration cache file when INT8 is
calibrated rather than read from QDQ nodes, one optimisation profile pinning the static shapes, a
timing cache loaded and saved across builds) -> ``engine_from_network`` -> ``save_engine``. The
engine folder's ``engine_manifest.json`` records the TensorRT version, the GPU's name and compute
capability, the precision and the source export (whose manifest is kept inside it); loading refuses
an engine built for another TensorRT version or another GPU (:func:`check_engine_compatibility`, a
pure function).

Running: :class:`TrtPipeline` is the one generation loop (:class:`~cspkv.engines.generation.Pipeline`)
over TensorRT execution contexts with device buffers. The K/V ring buffer is libcspkv's, with its memory
cudaMalloc'd through the allocator hook (:class:`~cspkv.engines.cuda_runtime.DeviceKVBuffer`): the
prefill engine writes the pruned K/V straight into it, the decode engine's ``past_*`` inputs are
bound to its per-layer blocks, and the new token's K/V is copied device-to-device into its slot.

TensorRT is not a dependency of cspkv: every entry point calls :func:`require_tensorrt`, which
raises :class:`TensorRTUnavailable` saying what to install.
"""

from __future__ import annotations

import json
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cspkv.durable import write_atomic
from cspkv.engines.cuda_runtime import CudaRuntime, DeviceArray, DeviceKVBuffer
from cspkv.engines.generation import TEXT, Pipeline, vision_in_batches
from cspkv.runtime.manifest import ManifestError, file_sha256, read_manifest

ENGINE_MANIFEST = "engine_manifest.json"
ENGINE_MANIFEST_VERSION = 1
TIMING_CACHE = "timing.cache"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = (
    "TensorRT >= 10 is needed for engines: on a machine with an NVIDIA GPU and driver, "
    "`pip install tensorrt-cu12 polygraphy` (or tensorrt-cu13 for CUDA 13; "
    "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html), "
    "then build the ModalityTopK plugin with `make -C cspkv/engines/plugin plugin` if the graphs use it. "
    "Without TensorRT, run the export with ONNX Runtime (csp-run --engine EXPORT_FOLDER)."
)


class TensorRTUnavailable(ImportError):
    """TensorRT (or Polygraphy's TensorRT backend, or a GPU) is not available here."""


class EngineMismatch(ManifestError):
    """An engine folder built for another TensorRT version or GPU; the message says what to do."""


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable with the install instructions."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"cannot import tensorrt ({exc}). {INSTALL_HINT}") from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {tensorrt.__version__} is too old (IPluginV3 and int64 "
                                  f"plugin outputs need 10). {INSTALL_HINT}")
    try:
        import polygraphy.backend.trt  # noqa: F401
    except ImportError as exc:
        raise TensorRTUnavailable(f"cannot import polygraphy ({exc}): pip install polygraphy") from None
    return tensorrt


# ---- compatibility (pure) --------------------------------------------------------------------

def runtime_info(cuda=None) -> dict:
    """What :func:`check_engine_compatibility` compares: this TensorRT and this GPU."""
    trt = require_tensorrt()
    device = (cuda or CudaRuntime()).device_info()
    return {"tensorrt_version": trt.__version__, "gpu_name": device["name"],
            "compute_capability": device["compute_capability"]}


def check_engine_compatibility(manifest: dict, runtime: dict) -> None:
    """Refuse an engine folder built for another TensorRT version or another GPU.

    ``manifest``: an engine manifest (``tensorrt_version``, ``gpu.name``, ``gpu.compute_capability``);
    ``runtime``: :func:`runtime_info` of this machine. TensorRT engines are specific to the exact
    TensorRT version and to the GPU model they were tuned on; a mismatch raises EngineMismatch.
    """
    folder = manifest.get("folder", "the engine folder")
    built = manifest.get("tensorrt_version")
    gpu = manifest.get("gpu") or {}
    if not built or not gpu.get("name") or not gpu.get("compute_capability"):
        raise EngineMismatch(f"{folder}: the engine manifest does not record the TensorRT version and GPU it "
                             "was built for: rebuild the engines with this cspkv (build_engines)")
    rebuild = (f"rebuild them here: python -c \"from cspkv.engines.tensorrt import build_engines; "
               f"build_engines('{manifest.get('source', {}).get('folder', 'EXPORT_FOLDER')}', 'NEW_ENGINE_FOLDER')\"")
    if built != runtime["tensorrt_version"]:
        raise EngineMismatch(f"{folder} was built with TensorRT {built}, this machine has TensorRT "
                             f"{runtime['tensorrt_version']}: engines only load in the TensorRT version that "
                             f"built them; {rebuild}")
    if gpu["compute_capability"] != runtime["compute_capability"]:
        raise EngineMismatch(f"{folder} was built for {gpu['name']} (compute capability "
                             f"{gpu['compute_capability']}), this GPU is {runtime['gpu_name']} (compute "
                             f"capability {runtime['compute_capability']}): {rebuild}")
    if gpu["name"] != runtime["gpu_name"]:
        raise EngineMismatch(f"{folder} was built and tuned on {gpu['name']}, this GPU is {runtime['gpu_name']} "
                             f"(same compute capability {gpu['compute_capability']}, but TensorRT engines are "
                             f"not portable across GPU models): {rebuild}")


def engine_precision_plan(export_manifest: dict, precision: str | None) -> dict:
    """Builder flags for an export folder (pure): {precision, fp16, int8, calibrated}.

    fp16 exports give fp16 engines; int8-s8s8 (QDQ) exports give explicit INT8 (no calibrator);
    int8-u8s8 exports are refused (TensorRT takes symmetric int8 activations); fp32 exports give
    fp32, fp16 or calibrated (implicit) INT8 engines as asked."""
    source = export_manifest.get("precision", "fp32")
    if precision is not None and precision not in ENGINE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    if source == "int8-u8s8":
        raise ValueError("int8-u8s8 exports (uint8 activations) are for ONNX Runtime CPU; TensorRT takes "
                         "symmetric int8: convert with --precision int8 --int8-flavour s8s8")
    if source == "int8-s8s8":
        if precision not in (None, "int8"):
            raise ValueError(f"an int8-s8s8 export builds int8 engines, not {precision}")
        return {"precision": "int8", "fp16": True, "int8": True, "calibrated": False}
    if source == "fp16":
        if precision not in (None, "fp16"):
            raise ValueError(f"an fp16 export builds fp16 engines, not {precision}: use the fp32 export")
        return {"precision": "fp16", "fp16": True, "int8": False, "calibrated": False}
    precision = precision or "fp32"
    return {"precision": precision, "fp16": precision in ("fp16", "int8"), "int8": precision == "int8",
            "calibrated": precision == "int8"}


def read_engine_manifest(folder: str | Path, runtime: dict | None = None, verify_hashes: bool = True) -> dict:
    """The engine folder's manifest, checked: files and hashes, then (given ``runtime``, or this
    machine's when None) TensorRT version and GPU."""
    folder = Path(folder)
    path = folder / ENGINE_MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing: build the engines with cspkv.engines.tensorrt.build_engines")
    manifest = json.loads(path.read_text())
    if manifest.get("engine_manifest_version") != ENGINE_MANIFEST_VERSION:
        raise ManifestError(f"{path} has engine manifest version {manifest.get('engine_manifest_version')!r}, "
                            f"this cspkv reads {ENGINE_MANIFEST_VERSION}: rebuild the engines")
    for name, meta in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ManifestError(f"{file} is missing: rebuild the engines")
        if verify_hashes and file_sha256(file) != meta["sha256"]:
            raise ManifestError(f"{file} does not match its manifest hash: rebuild the engines")
    manifest["folder"] = str(folder)
    check_engine_compatibility(manifest, runtime if runtime is not None else runtime_info())
    return manifest


# ---- building --------------------------------------------------------------------------------

def static_profile(io_inputs: dict):
    """One optimisation profile with min = opt = max = each input's static shape."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, spec in io_inputs.items():
        shape = tuple(spec["shape"])
        profile.add(name, min=shape, opt=shape, max=shape)
    return profile


def build_engines(export_folder: str | Path, out_folder: str | Path, precision: str | None = None,
                  calibration=None, plugins=(), timing_cache: str | Path | None = None,
                  workspace_bytes: int | None = None, force: bool = False,
                  progress: Callable[[str], None] = lambda message: None) -> dict:
    """Build vision/prefill/decode engines from an export folder into ``out_folder``. ``calibration``:
    the CalibrationSet of an implicit (calibrated) INT8 build from an fp32 export."""
    require_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import (
        Calibrator,
        CreateConfig,
        engine_from_network,
        network_from_onnx_path,
        save_engine,
    )
    from polygraphy.backend.trt import load_plugins

    export_folder, out = Path(export_folder), Path(out_folder)
    export = read_manifest(export_folder)
    flags = engine_precision_plan(export, precision)
    if out.exists() and any(out.iterdir()) and not force:
        raise ManifestError(f"{out} already exists and is not empty: choose another folder or pass force=True")
    out.mkdir(parents=True, exist_ok=True)
    plugin_paths = [str(Path(p).resolve()) for p in plugins]
    if plugin_paths:
        load_plugins(plugins=plugin_paths)
    cache_path = Path(timing_cache) if timing_cache else out / TIMING_CACHE
    calibration_set = calibration if flags["calibrated"] else None
    if flags["calibrated"] and calibration is None:
        raise ValueError("calibrated INT8 engines need a calibration set: pass calibration="
                         "cspkv.quantize.calibration.resolve_calibration(EXPORT_FOLDER)")
    engines, timings = {}, {}
    for role, name in export["graphs"].items():
        progress(f"TensorRT: building {role} engine ({flags['precision']})")
        start = time.perf_counter()
        network = network_from_onnx_path(str(export_folder / name))
        calibrator = None
        if calibration_set is not None:
            calibrator = Calibrator(data_loader=calibration_set.polygraphy_loader(role),
                                    cache=str(out / f"{role}.calibration.cache"))
        kwargs = {}
        if workspace_bytes:
            kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)}
        config = CreateConfig(fp16=flags["fp16"], int8=flags["int8"], calibrator=calibrator,
                              profiles=[static_profile(export["io"][role]["inputs"])],
                              load_timing_cache=str(cache_path) if cache_path.is_file() else None, **kwargs)
        engine = engine_from_network(network, config=config, save_timing_cache=str(cache_path))
        engines[role] = f"{role}.engine"
        save_engine(engine, str(out / engines[role]))
        timings[role] = round(time.perf_counter() - start, 2)
    device = CudaRuntime().device_info()
    files = {n: {"sha256": file_sha256(out / n), "bytes": (out / n).stat().st_size} for n in engines.values()}
    manifest = {
        "engine_manifest_version": ENGINE_MANIFEST_VERSION,
        "backend": "tensorrt",
        "tensorrt_version": trt.__version__,
        "gpu": {"name": device["name"], "compute_capability": device["compute_capability"],
                "cuda_runtime": device["cuda_runtime"]},
        "precision": flags["precision"],
        "int8": {"mode": "calibrated" if flags["calibrated"] else ("explicit-qdq" if flags["int8"] else None),
                 "calibration": calibration_set.meta if calibration_set is not None else None},
        "kv_dtype": export.get("kv_dtype", "float32"),
        "engines": engines,
        "plugins": plugin_paths,
        "timing_cache": str(cache_path),
        "build_seconds": timings,
        "files": files,
        "source": {"folder": str(export_folder.resolve()), "precision": export.get("precision", "fp32"),
                   "fingerprint": export["model"]["fingerprint"],
                   "files": {n: m["sha256"] for n, m in export["files"].items()}},
        "export_manifest": export,
    }
    if export.get("processor"):
        path = export["processor"]["path"]
        shutil.copytree(export_folder / path, out / path, dirs_exist_ok=True)
    write_atomic(out / ENGINE_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---- running ---------------------------------------------------------------------------------

_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
                 "INT8": np.int8, "BOOL": np.bool_, "UINT8": np.uint8}


@dataclass
class _Context:
    engine: object
    context: object
    shapes: dict = field(default_factory=dict)
    dtypes: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    buffers: dict = field(default_factory=dict)     # name -> DeviceArray (own allocations)


class TrtEngine:
    """The three engines of an engine folder, with a device buffer per I/O tensor except the K/V
    ones, which are bound to the pipeline's K/V buffer on the GPU (:meth:`new_buffer`)."""

    def __init__(self, folder: str | Path, runtime: dict | None = None, cuda=None):
        trt = require_tensorrt()
        self.cuda = cuda or CudaRuntime()
        self.folder = Path(folder)
        self.engine_manifest = read_engine_manifest(self.folder, runtime if runtime is not None
                                                    else runtime_info(self.cuda))
        self.manifest = self.engine_manifest["export_manifest"]
        model, plan = self.manifest["model"], self.manifest["plan"]
        self._past = [f"{name}_{i}" for i in range(model["layers"]) for name in ("past_key", "past_value")]
        external = {"prefill": {"kv"}, "decode": set(self._past)}       # bound to the K/V buffer
        if self.engine_manifest.get("plugins"):
            from polygraphy.backend.trt import load_plugins

            load_plugins(plugins=self.engine_manifest["plugins"])
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = self.cuda.stream()
        self.contexts: dict[str, _Context] = {}
        for role, name in self.engine_manifest["engines"].items():
            engine = self._runtime.deserialize_cuda_engine((self.folder / name).read_bytes())
            if engine is None:
                raise ManifestError(f"{self.folder / name} could not be deserialized: rebuild the engines")
            ctx = _Context(engine, engine.create_execution_context())
            for i in range(engine.num_io_tensors):
                tensor = engine.get_tensor_name(i)
                ctx.shapes[tensor] = tuple(engine.get_tensor_shape(tensor))
                ctx.dtypes[tensor] = np.dtype(_TRT_TO_NUMPY[engine.get_tensor_dtype(tensor).name])
                if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
                    ctx.inputs.append(tensor)
                if tensor in external.get(role, ()):
                    continue
                ctx.buffers[tensor] = DeviceArray(self.cuda, ctx.shapes[tensor], ctx.dtypes[tensor])
                ctx.context.set_tensor_address(tensor, ctx.buffers[tensor].ptr)
            self.contexts[role] = ctx
        self.max_prompt, self.n_slots = plan["max_prompt"], plan["n_slots"]
        self.vision_batch, self.image_size = plan["vision_batch"], plan["image_size"]
        self.hidden_size = model["hidden_size"]
        self.kv_dtype = np.dtype(self.engine_manifest.get("kv_dtype", "float32"))
        self.bias = np.zeros((model["layers"], 1, model["kv_heads"], self.n_slots), np.float32)
        self._bound = None

    def bind(self, role: str, tensor: str, address: int) -> None:
        """Point an engine tensor at another device address (e.g. the KV buffer)."""
        self.contexts[role].context.set_tensor_address(tensor, address)

    def execute(self, role: str, feeds: dict[str, np.ndarray], outputs=()) -> dict[str, np.ndarray]:
        """Upload ``feeds``, run, download ``outputs`` (host arrays)."""
        ctx = self.contexts[role]
        for name, value in feeds.items():
            ctx.buffers[name].upload(np.asarray(value, dtype=ctx.dtypes[name]))
        if not ctx.context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT {role} engine failed to execute")
        self.cuda.stream_synchronize(self.stream)
        return {name: ctx.buffers[name].download() for name in outputs}

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        return vision_in_batches(pixel_values, self.image_size, self.vision_batch,
                                 lambda chunk: self.execute("vision", {"pixel_values": chunk},
                                                            ["image_features"])["image_features"])

    def prefill(self, input_ids: np.ndarray, modality: np.ndarray, image_features: np.ndarray | None) -> dict:
        """Prefill with the pruned K/V written straight into the bound K/V buffer; the slot tables and
        logits come back to the host."""
        length, p = len(input_ids), self.max_prompt
        ids, mod = np.zeros((1, p), np.int64), np.zeros((1, p), np.int64)
        ids[0, :length], mod[0, :length] = input_ids, modality
        embeds = np.zeros((1, p, self.hidden_size), np.float32)
        if image_features is not None and len(image_features):
            embeds[0, :length][modality == 1] = image_features
        return self.execute("prefill", {"input_ids": ids, "image_embeds": embeds, "modality": mod,
                                        "valid_length": np.array([length], np.int64)},
                            ["logits", "slot_position", "slot_modality", "slot_valid", "slot_mass"])

    def new_buffer(self, eviction: str = "ring", n_recent: int = 16, n_sink: int = 4,
                   null_logit: float | None = None):
        """libcspkv's K/V buffer in GPU memory, bound as the prefill engine's ``kv`` output and the
        decode engine's ``past_*`` inputs."""
        if self._bound is not None and self._bound() is not None:
            raise ValueError("these engines already write another pipeline's buffer: open one TrtEngine per pipeline")
        model = self.manifest["model"]
        buffer = DeviceKVBuffer(model["layers"], model["kv_heads"], self.n_slots, model["head_dim"], self.kv_dtype,
                                eviction, n_recent, n_sink, null_logit, cuda=self.cuda)
        self.bind("prefill", "kv", buffer.kv_ptr)
        for name, address in buffer.layer_pointers().items():
            self.bind("decode", name, address)
        self._bound = weakref.ref(buffer)
        return buffer

    def load_prefill(self, buffer, out: dict, c: int, n_valid: np.ndarray, prompt_len: int) -> None:
        buffer.load_prefill_in_place(out["slot_position"][:, :, :c], out["slot_modality"][:, :, :c], n_valid,
                                     prompt_len, out["slot_mass"][:, :, :c])

    def decode_step(self, token: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        result = self.execute("decode", {"token": np.array([[token]], np.int64),
                                         "position": np.array([position], np.int64), "bias": self.bias},
                              ["logits", "mass"])
        return result["logits"][0], result["mass"]

    def write_token(self, buffer, slots: np.ndarray, position: int) -> None:
        buffer.write_token_device(slots, self.contexts["decode"].buffers["new_kv"].ptr, position, TEXT)


class TrtPipeline(Pipeline):
    """:class:`~cspkv.engines.generation.Pipeline` over TensorRT engines, the K/V buffer in GPU memory."""

    def __init__(self, folder: str | Path, eviction: str = "ring", n_recent: int = 16, n_sink: int = 4,
                 runtime: dict | None = None):
        require_tensorrt()
        super().__init__(TrtEngine(folder, runtime), eviction, n_recent, n_sink)
