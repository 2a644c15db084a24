"""ONNX Runtime engine over an export folder (CPU provider by default).

The K/V memory and slot table live in the C library (:class:`KVBuffer`). ONNX Runtime reads the
buffer in place: the decode graph's ``past_key_<i>`` / ``past_value_<i>`` inputs are bound once,
with IOBinding, to OrtValues over each layer's block of the C-owned memory, and its outputs go to
preallocated arrays; the new token's K/V is then copied into its slot by the C library. Nothing
grows after construction.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cspkv.engines.generation import TEXT, Pipeline, vision_in_batches
from cspkv.runtime.kv_buffer import KVBuffer
from cspkv.runtime.manifest import (STAMP_KEY, ManifestError, check_graphs, kv_dtype, read_manifest,
                                   weights_table)
from cspkv.runtime.slot_reference import RING

# onnxruntime's NodeArg.type -> numpy dtype name, as manifest.json writes them
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}
# See shared_weights: repacked copies would double the memory the shared weights file saves. Only float
# exports share their MatMul weights; int8/int4 keep their quantized weights inline and repacked (their
# kernels are built on it), sharing only float tables such as the embedding.
DISABLE_PREPACKING = True
FLOAT_PRECISIONS = ("fp32", "fp16")
PREFILL_OUTPUTS = ("logits", "kv", "slot_position", "slot_modality", "slot_valid", "slot_mass")


def session_io(session: ort.InferenceSession) -> dict:
    """{"inputs"|"outputs": {name: (shape, dtype)}} of a loaded graph (symbolic sizes stay strings)."""
    def specs(args):
        return {a.name: (list(a.shape), _ORT_TYPES.get(a.type, a.type)) for a in args}

    return {"inputs": specs(session.get_inputs()), "outputs": specs(session.get_outputs())}


def shared_weights(folder: Path, manifest: dict, options: ort.SessionOptions) -> list:
    """Read the export's shared weights file once and give every tensor in it to ``options``, so the
    prefill and decode sessions both run on these buffers instead of each loading its own copy.

    ONNX Runtime would still repack each MatMul weight into a per-session copy (its Python API has
    no shared pre-packed weights container), so repacking is turned off for float exports. Returns
    the buffer and its OrtValues, which must outlive the sessions; [] for an export without one.
    """
    table = weights_table(folder, manifest)
    if not table:
        return []
    blob = np.fromfile(folder / manifest["weights"]["file"], dtype=np.uint8)
    values: list = [blob]                                            # the OrtValues do not own it
    for name, (offset, nbytes, dtype, shape) in table.items():
        array = blob[offset:offset + nbytes].view(np.dtype(dtype)).reshape(shape)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))       # wraps the buffer, no copy (CPU)
        options.add_initializer(name, values[-1])
    if DISABLE_PREPACKING and manifest["precision"] in FLOAT_PRECISIONS:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return values


class OrtEngine:
    """The three graphs of a csp-export folder as ONNX Runtime sessions, checked against the manifest.

    ``copy_cache_each_step``: the slower design the runtime avoids (hand the decode graph a fresh
    copy of the whole cache every step), kept only so the latency gate can show it catches it.
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 session_options: ort.SessionOptions | None = None, copy_cache_each_step: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        options = session_options or ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._weights = shared_weights(self.folder, self.manifest, options)
        self.sessions = {}
        for role, name in self.manifest["graphs"].items():
            try:
                self.sessions[role] = ort.InferenceSession(str(self.folder / name), options,
                                                           providers=providers or ["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own types for unreadable graphs
                raise ManifestError(f"{self.folder / name} cannot be loaded by onnxruntime ({exc}): "
                                    "re-run csp-export") from None
        # Vision and prefill run once a prompt: their activations go back to the system after each run
        # instead of staying in the session's arena, so the prefill does not sit on the vision graph's
        # memory and decoding on the prefill's (the price: the next prompt's first touches of fresh pages).
        self._run_once = ort.RunOptions()
        self._run_once.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        check_graphs(self.folder, self.manifest, {role: session_io(s) for role, s in self.sessions.items()},
                     {role: s.get_modelmeta().custom_metadata_map.get(STAMP_KEY) for role, s in self.sessions.items()})
        model, plan = self.manifest["model"], self.manifest["plan"]
        self.max_prompt, self.n_slots = plan["max_prompt"], plan["n_slots"]
        self.vision_batch, self.image_size = plan["vision_batch"], plan["image_size"]
        self.hidden_size = model["hidden_size"]
        self.precision = self.manifest["precision"]
        self.kv_dtype = kv_dtype(self.manifest)          # float16 for fp16 exports, else float32
        self.copy_cache_each_step = copy_cache_each_step
        layers, heads = model["layers"], model["kv_heads"]
        self._kv_shape = (layers, 2, 1, heads, self.n_slots, model["head_dim"])
        # the decode graph's inputs and outputs, preallocated and bound once
        self.binding = self.sessions["decode"].io_binding()
        self._token, self._position = np.zeros((1, 1), np.int64), np.zeros((1,), np.int64)
        self.bias = np.zeros((layers, 1, heads, self.n_slots), np.float32)
        for name, array in (("token", self._token), ("position", self._position), ("bias", self.bias)):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        self._out = {"logits": np.empty((1, model["vocab_size"]), np.float32),
                     "new_kv": np.empty((layers, 2, 1, heads, 1, model["head_dim"]), self.kv_dtype),
                     "mass": np.empty((layers, 1, heads, self.n_slots), np.float32)}
        for name, array in self._out.items():
            self.binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self._bound = None                                 # weakref to the buffer the decode graph reads

    # ---- vision and prefill ----

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] float32 -> [N, T, hidden], run in the graph's static batch."""
        return vision_in_batches(pixel_values, self.image_size, self.vision_batch,
                                 lambda chunk: self.sessions["vision"].run(None, {"pixel_values": chunk},
                                                                           self._run_once)[0])

    def prefill(self, input_ids: np.ndarray, modality: np.ndarray, image_features: np.ndarray | None) -> dict:
        """Pad a prompt of L <= P_max tokens and run prefill; image features are placed at the
        image positions in prompt order."""
        length = len(input_ids)
        if length > self.max_prompt:
            raise ValueError(f"the prompt has {length} tokens but this export takes at most "
                             f"{self.max_prompt} (--max-prompt): shorten it or re-export")
        n_image = int((modality == 1).sum())
        n_features = 0 if image_features is None else len(image_features)
        if n_image != n_features:
            raise ValueError(f"the prompt has {n_image} image positions but {n_features} image "
                             "feature rows were given: one image token per feature row")
        ids = np.zeros((1, self.max_prompt), np.int64)
        ids[0, :length] = input_ids
        mod = np.zeros((1, self.max_prompt), np.int64)
        mod[0, :length] = modality
        embeds = np.zeros((1, self.max_prompt, self.hidden_size), np.float32)
        if n_image:
            embeds[0, :length][modality == 1] = image_features
        values = self.sessions["prefill"].run(list(PREFILL_OUTPUTS), {
            "input_ids": ids, "image_embeds": embeds, "modality": mod,
            "valid_length": np.array([length], np.int64)}, self._run_once)
        return dict(zip(PREFILL_OUTPUTS, values))

    # ---- the K/V buffer and decoding ----

    def new_buffer(self, eviction: str = RING, n_recent: int = 16, n_sink: int = 4,
                   null_logit: float | None = None) -> KVBuffer:
        """The C-owned K/V buffer of the export's plan, bound to the decode graph (read in place)."""
        if self._bound is not None and self._bound() is not None:
            raise ValueError("this engine's decode graph already reads another pipeline's buffer: open one "
                             "OrtEngine per pipeline")
        layers, _, _, heads, slots, head_dim = self._kv_shape
        buffer = KVBuffer(layers, heads, slots, head_dim, self.kv_dtype, eviction, n_recent, n_sink, null_logit)
        self._bind_kv(buffer.kv.reshape(self._kv_shape))
        self._bound = weakref.ref(buffer)
        return buffer

    def _bind_kv(self, kv: np.ndarray) -> None:
        """Bind each layer's K and V block of ``kv`` [layers, 2, 1, H, S, D] without copying."""
        self._kv_values = []                               # keep the OrtValues alive
        for layer in range(kv.shape[0]):
            for part, name in enumerate(("past_key", "past_value")):
                block = kv[layer, part]                    # contiguous [1, H, S, D] view
                value = ort.OrtValue.ortvalue_from_numpy(block)     # wraps, does not copy (CPU)
                assert value.data_ptr() == block.ctypes.data
                self.binding.bind_ortvalue_input(f"{name}_{layer}", value)
                self._kv_values.append(value)

    def load_prefill(self, buffer: KVBuffer, out: dict, c: int, n_valid: np.ndarray, prompt_len: int) -> None:
        kv = np.ascontiguousarray(out["kv"][:, :, 0, :, :c], dtype=self.kv_dtype)  # [layers, 2, H, C, D]
        buffer.load_prefill(kv, out["slot_position"][:, :, :c], out["slot_modality"][:, :, :c], n_valid,
                            prompt_len, out["slot_mass"][:, :, :c])

    def decode_step(self, token: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """One decode graph run over the bound buffer (``bias`` filled by the caller): the logits [vocab]
        and the attention mass [layers, 1, H, S], both overwritten by the next step."""
        self._token[0, 0] = token
        self._position[0] = position
        if self.copy_cache_each_step:
            self._bind_kv(np.array(self._bound().kv).reshape(self._kv_shape))
        self.run_decode_graph()
        return self._out["logits"][0], self._out["mass"]

    def run_decode_graph(self) -> None:
        """The bare decode graph on its bound inputs (the latency gate's reference)."""
        self.sessions["decode"].run_with_iobinding(self.binding)

    def write_token(self, buffer: KVBuffer, slots: np.ndarray, position: int) -> None:
        buffer.write_token(slots, self._out["new_kv"], position, TEXT)

    def decode(self, token: int, position: int, kv: np.ndarray, bias: np.ndarray):
        """One decode step from a whole cache kv [layers, 2, 1, H, S, D] (tests and tools; a
        pipeline binds the per-layer inputs to its buffer instead)."""
        feed = {"token": np.array([[token]], np.int64), "position": np.array([position], np.int64),
                "bias": bias}
        for layer in range(kv.shape[0]):
            feed[f"past_key_{layer}"] = np.asarray(kv[layer, 0], dtype=self.kv_dtype)
            feed[f"past_value_{layer}"] = np.asarray(kv[layer, 1], dtype=self.kv_dtype)
        return self.sessions["decode"].run(None, feed)


class OnnxPipeline(Pipeline):
    """:class:`Pipeline` over an :class:`OrtEngine` (or an export folder, opened with ``engine_options``)."""

    def __init__(self, engine: OrtEngine | str | Path, eviction: str = RING, n_recent: int = 16, n_sink: int = 4,
                 **engine_options):
        super().__init__(engine if isinstance(engine, OrtEngine) else OrtEngine(engine, **engine_options),
                         eviction, n_recent, n_sink)
