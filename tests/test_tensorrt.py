"""TensorRT backend (cspkv.engines.tensorrt): what runs without TensorRT -- the import guard, the
engine-compatibility check on fake manifests, builder flags, the device KV buffer's logic over a fake
CUDA runtime (and over the real one when a GPU is present), and the ModalityTopK prefill variant.
Building and running engines needs TensorRT and a GPU: those tests skip here, saying so."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import onnx
import pytest
import torch

from cspkv.engines import tensorrt as trt_backend
from cspkv.engines.cuda_runtime import CudaRuntime, CudaUnavailable, DeviceKVBuffer
from cspkv.engines.tensorrt import (
    EngineMismatch,
    TensorRTUnavailable,
    check_engine_compatibility,
    engine_precision_plan,
    read_engine_manifest,
)
from cspkv.runtime.manifest import ManifestError, file_sha256
from cspkv.runtime.kv_buffer import KVBuffer


def _tensorrt_missing() -> str | None:
    try:
        trt_backend.require_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


def _gpu_missing() -> str | None:
    try:
        CudaRuntime()
    except CudaUnavailable as exc:
        return str(exc)
    return None


TRT_MISSING = _tensorrt_missing()
GPU_MISSING = _gpu_missing()

H100 = {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def fake_engine_manifest(**changes) -> dict:
    manifest = {"engine_manifest_version": 1, "tensorrt_version": "10.13.3.9",
                "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
                "precision": "fp16", "source": {"folder": "/exports/fp16"}, "folder": "/engines/fp16"}
    manifest.update(changes)
    return manifest


# --- import guard -----------------------------------------------------------------------------------

@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here")
def test_without_tensorrt_entry_points_say_what_to_install(tmp_path):
    assert "pip install tensorrt" in TRT_MISSING and "NVIDIA GPU" in TRT_MISSING
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt-cu12 polygraphy"):
        trt_backend.build_engines(tmp_path / "export", tmp_path / "engines")
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        trt_backend.TrtPipeline(tmp_path / "engines")
    assert issubclass(TensorRTUnavailable, ImportError)


# --- compatibility (pure) --------------------------------------------------------------------------

def test_engine_built_here_is_accepted():
    check_engine_compatibility(fake_engine_manifest(), H100)


@pytest.mark.parametrize("runtime, message", [
    ({**H100, "tensorrt_version": "10.14.1.48"}, r"built with TensorRT 10\.13\.3\.9, this machine has TensorRT 10\.14\.1\.48"),
    ({**H100, "gpu_name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"},
     r"built for NVIDIA H100 80GB HBM3 \(compute capability 9\.0\), this GPU is NVIDIA Jetson AGX Orin \(compute capability 8\.7\)"),
    ({**H100, "gpu_name": "NVIDIA H200"}, r"tuned on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200 .*not portable"),
])
def test_engine_for_another_tensorrt_or_gpu_is_refused(runtime, message):
    with pytest.raises(EngineMismatch, match=message) as info:
        check_engine_compatibility(fake_engine_manifest(), runtime)
    assert "rebuild them here" in str(info.value) and "/exports/fp16" in str(info.value)


def test_engine_manifest_without_build_info_is_refused():
    with pytest.raises(EngineMismatch, match="does not record the TensorRT version"):
        check_engine_compatibility(fake_engine_manifest(gpu={}), H100)


def test_read_engine_manifest_checks_files_then_compatibility(tmp_path):
    (tmp_path / "decode.engine").write_bytes(b"not really an engine")
    manifest = fake_engine_manifest(files={"decode.engine": {"sha256": file_sha256(tmp_path / "decode.engine"),
                                                             "bytes": 20}})
    (tmp_path / "engine_manifest.json").write_text(json.dumps(manifest))
    assert read_engine_manifest(tmp_path, runtime=H100)["precision"] == "fp16"
    with pytest.raises(EngineMismatch, match="TensorRT 10.13.3.9"):
        read_engine_manifest(tmp_path, runtime={**H100, "tensorrt_version": "10.0.1"})
    (tmp_path / "decode.engine").write_bytes(b"replaced")
    with pytest.raises(ManifestError, match="does not match its manifest hash"):
        read_engine_manifest(tmp_path, runtime=H100)


def test_builder_flags_follow_the_export_precision():
    assert engine_precision_plan({"precision": "fp16"}, None) == {"precision": "fp16", "fp16": True, "int8": False,
                                                                  "calibrated": False}
    assert engine_precision_plan({"precision": "int8-s8s8"}, None)["calibrated"] is False   # explicit QDQ
    assert engine_precision_plan({"precision": "fp32"}, "int8")["calibrated"] is True       # needs a calibrator
    with pytest.raises(ValueError, match="s8s8"):
        engine_precision_plan({"precision": "int8-u8s8"}, None)
    with pytest.raises(ValueError, match="fp16 export builds fp16"):
        engine_precision_plan({"precision": "fp16"}, "int8")


# --- the KV buffer in device memory -----------------------------------------------------------------

class FakeCuda:
    """CudaRuntime's interface over host memory: exercises DeviceKVBuffer's hooks without a GPU."""

    def __init__(self):
        self.blocks, self.allocated, self.freed = {}, 0, 0

    def malloc(self, nbytes):
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        self.allocated += 1
        return ctypes.addressof(block)

    def free(self, ptr):
        self.blocks.pop(ptr)
        self.freed += 1

    def copy(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)
        return 0

    def copy2d(self, dst, dst_pitch, src, src_pitch, width, height):
        for row in range(height):
            ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)
        return 0

    def download(self, src, out):
        ctypes.memmove(out.ctypes.data, src, out.nbytes)
        return out

    def upload(self, dst, array):
        ctypes.memmove(dst, np.ascontiguousarray(array).ctypes.data, array.nbytes)


def _prefill_case(rng, L=2, H=3, S=10, D=4, C=6, dtype=np.float16):
    """A prefill result as the engine outputs it: kv [L, 2, 1, H, S, D] with the prompt in slots 0..C-1."""
    n_valid = rng.integers(3, C + 1, (L, H)).astype(np.int32)
    positions = np.stack([np.stack([np.sort(rng.choice(20, C, replace=False)) for _ in range(H)]) for _ in range(L)])
    kv = rng.standard_normal((L, 2, 1, H, S, D)).astype(dtype)
    kv[..., C:, :] = 0
    for l in range(L):
        for h in range(H):
            kv[l, :, 0, h, n_valid[l, h]:C] = 0
    modality = rng.integers(0, 2, (L, H, C))
    return kv, positions, modality, n_valid


def check_device_buffer_against_host(cuda, download, uniform=False):
    """uniform: ring policy and the same prompt length in every (layer, head), so every write goes to
    one slot for all heads (the strided single-copy path); otherwise rescore with ragged heads (the
    library's per-row hook copies)."""
    rng = np.random.default_rng(0)
    L, H, S, D, C = 2, 3, 10, 4, 6
    kv, positions, modality, n_valid = _prefill_case(rng, L, H, S, D, C)
    policy = "ring" if uniform else "rescore"
    if uniform:
        n_valid[:] = C
        kv, _, _, _ = _prefill_case(np.random.default_rng(1), L, H, S, D, C)
        kv[..., :C, :] = np.random.default_rng(2).standard_normal(kv[..., :C, :].shape)
    host = KVBuffer(L, H, S, D, np.float16, policy, n_recent=1, n_sink=1)
    device = DeviceKVBuffer(L, H, S, D, np.float16, policy, n_recent=1, n_sink=1, cuda=cuda)
    scores = rng.random((L, H, C)).astype(np.float32)
    host.load_prefill(np.ascontiguousarray(kv[:, :, 0, :, :C]), positions, modality, n_valid, 20, scores)
    cuda.upload(device.kv_ptr, kv)                     # what the prefill engine writes in place
    before = device.copies
    device.load_prefill_in_place(positions, modality, n_valid, 20, scores)
    assert device.copies == before                     # no K/V copy: the engine wrote it in place
    delta = cuda.malloc(L * 2 * H * D * 2)
    for position in range(20, 20 + 12):                # past the free slots: evictions
        slots = host.choose_write_slots(position)
        np.testing.assert_array_equal(device.choose_write_slots(position), slots)
        new = rng.standard_normal((L, 2, 1, H, 1, D)).astype(np.float16)
        host.write_token(slots, new, position)
        cuda.upload(delta, new)
        device.write_token_device(slots, delta, position)
        mass = rng.random((L, H, S)).astype(np.float32)
        host.accumulate(mass)
        device.accumulate(mass)
    assert (device.copies == before) == uniform        # uniform: one strided copy, no per-row hook
    np.testing.assert_array_equal(download(device), host.kv)
    np.testing.assert_array_equal(device.position, host.position)
    np.testing.assert_array_equal(device.attention_bias(), host.attention_bias())
    pointers = device.layer_pointers()
    assert pointers["past_key_0"] == device.kv_ptr
    assert pointers[f"past_value_{L - 1}"] == device.kv_ptr + (2 * L - 1) * H * S * D * 2
    with pytest.raises(ValueError, match="use kv_ptr"):
        device.kv
    return device


@pytest.mark.parametrize("uniform", [False, True])
def test_device_kv_buffer_logic_with_a_fake_cuda_runtime(uniform):
    cuda = FakeCuda()
    device = check_device_buffer_against_host(cuda, lambda d: d.download_kv(), uniform)
    assert cuda.allocated >= 2
    allocated = cuda.freed
    device.close()
    del device
    import gc

    gc.collect()
    assert cuda.freed == allocated + 1                 # the C buffer freed its memory through the hook


@pytest.mark.skipif(GPU_MISSING is not None, reason=f"needs a CUDA GPU: {GPU_MISSING}")
def test_device_kv_buffer_on_the_gpu():
    cuda = CudaRuntime()
    info = cuda.device_info()
    assert info["name"] and info["compute_capability"][0].isdigit()
    check_device_buffer_against_host(cuda, lambda d: d.download_kv(), uniform=False)
    check_device_buffer_against_host(cuda, lambda d: d.download_kv(), uniform=True)


@pytest.mark.skipif(TRT_MISSING is not None or GPU_MISSING is not None,
                    reason=f"needs TensorRT and a GPU: {TRT_MISSING or GPU_MISSING}")
def test_tensorrt_engines_match_onnx_runtime(exports, tmp_path):
    from cspkv.quantize.convert import convert_export
    from cspkv.models.tiny import multi_image_prompt
    from cspkv.engines.onnx_runtime import OnnxPipeline

    fp32 = exports("gqa", "csp", 0.5)
    convert_export(fp32, tmp_path / "fp16", "fp16")
    manifest = trt_backend.build_engines(tmp_path / "fp16", tmp_path / "engines")
    assert manifest["tensorrt_version"] and manifest["gpu"]["compute_capability"]
    ids, pixels = multi_image_prompt(8, seed=5)
    got = trt_backend.TrtPipeline(tmp_path / "engines").generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=8)
    want = OnnxPipeline(fp32).generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=8)
    assert np.abs(got.logits[0] - want.logits[0]).max() < 5e-3


# --- the ModalityTopK prefill variant ----------------------------------------------------------------

@pytest.fixture(scope="module")
def topk_variant(models, tmp_path_factory):
    from cspkv.engines.modality_topk_graph import export_modality_topk_prefill
    from cspkv.export.exporter import ExportPlan

    plan = ExportPlan.make(models["gqa"], "csp", {"cross_ratio": 0.9}, 0.5, 64, 4, 0.0)
    path = export_modality_topk_prefill(models["gqa"], plan, tmp_path_factory.mktemp("topk") / "prefill.onnx")
    return plan, path


def test_modality_topk_variant_is_one_plugin_node_for_all_layers(models, topk_variant):
    from cspkv.engines.modality_topk_graph import modality_topk_nodes
    from cspkv.export.readiness import check_graph

    plan, path = topk_variant
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    nodes = modality_topk_nodes(model)
    assert len(nodes) == 1                          # the layers are its batch
    layers = models["gqa"].config.text_config.num_hidden_layers
    assert {i.domain: i.version for i in model.opset_import}.get("cspkv") == 1
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input]}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.value_info}
    heads, p = 2, plan.max_prompt
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert set(attrs) == {"cross_ratio", "c_max", "plugin_namespace"}
        assert attrs["c_max"] == plan.max_keep and attrs["plugin_namespace"] == b"cspkv"
        assert abs(attrs["cross_ratio"] - 0.9) < 1e-7
        assert len(node.input) == 5 and len(node.output) == 1
        assert [types[i] for i in node.input] == [onnx.TensorProto.FLOAT] * 2 + [onnx.TensorProto.INT32] * 3
        assert [shapes[i] for i in node.input] == [[layers, heads, p], [layers, heads, p], [layers, p],
                                                   [layers], [layers]]
    # the policy's own threshold search is gone from the selection
    assert all(n.op_type not in ("TopK", "CumSum") for n in model.graph.node)
    readiness = check_graph(path, allow_custom_domains=("cspkv",))
    assert not [msg for msg in readiness.problems if "intermediate" not in msg], readiness.problems


def test_modality_topk_variant_selects_what_the_policy_selects(models, topk_variant):
    """Eager parity: the variant module (op kernel = the plugin's C reference) vs PrefillGraph.
    The ONNX graph itself is not run: ONNX Runtime has no kernel for cspkv::ModalityTopK."""
    from cspkv.engines.modality_topk_graph import modality_topk_prefill_module
    from cspkv.export.exporter import example_inputs
    from cspkv.export.graphs import PrefillGraph
    from cspkv.models.tiny import multi_image_prompt
    from cspkv.pruning import get_policy

    plan, _ = topk_variant
    model = models["gqa"]
    ids, _ = multi_image_prompt(2, seed=9)
    length = ids.shape[1]
    p = plan.max_prompt
    input_ids = torch.zeros(1, p, dtype=torch.int64)
    input_ids[0, :length] = ids[0]
    modality = (input_ids == model.config.image_token_id).long()
    embeds = torch.randn(1, p, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    args = (input_ids, embeds, modality, torch.tensor([length]))
    assert example_inputs(model, plan)["prefill"][0].shape == input_ids.shape
    reference = PrefillGraph(model, get_policy("csp", **plan.policy_params), plan.budget, p, plan.n_slots)
    with torch.no_grad():
        want = reference(*args)
        got = modality_topk_prefill_module(model, plan)(*args)
    for a, b, name in zip(got, want, ["logits", "kv", "slot_position", "slot_modality", "slot_valid", "slot_mass"]):
        assert torch.equal(a, b), name


def test_modality_topk_variant_runs_in_onnx_runtime_with_the_c_reference(models, topk_variant):
    """ONNX Runtime parity of the plugin graph: the ModalityTopK node is run by the plugin's C reference
    registered as an onnxruntime-extensions Python op (skips without that package)."""
    extensions = pytest.importorskip("onnxruntime_extensions", reason="pip install onnxruntime-extensions")
    import onnxruntime as ort

    from cspkv.engines.modality_topk import modality_topk_ref, ratio_from_float32
    from cspkv.engines.modality_topk_graph import modality_topk_nodes
    from cspkv.export.graphs import PrefillGraph
    from cspkv.models.tiny import multi_image_prompt
    from cspkv.pruning import get_policy

    dt = extensions.PyCustomOpDef

    @extensions.onnx_op(op_type="ModalityTopK", domain="ai.onnx.contrib",
                        inputs=[dt.dt_float, dt.dt_float, dt.dt_int32, dt.dt_int32, dt.dt_int32],
                        outputs=[dt.dt_int64],
                        attrs={"cross_ratio": dt.dt_float, "c_max": dt.dt_int64, "plugin_namespace": dt.dt_string})
    def modality_topk(self_scores, cross_scores, key_modality, n_keep, n_recent, **attrs):
        return modality_topk_ref(self_scores, cross_scores, key_modality, n_keep, n_recent,
                                 cross_ratio=ratio_from_float32(attrs["cross_ratio"]), c_max=int(attrs["c_max"]))

    plan, path = topk_variant
    model = onnx.load(str(path))
    for node in modality_topk_nodes(model):
        node.domain = "ai.onnx.contrib"
    model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.contrib", 1))
    options = ort.SessionOptions()
    options.register_custom_ops_library(extensions.get_library_path())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    gqa = models["gqa"]
    ids, _ = multi_image_prompt(2, seed=11)
    length, p = ids.shape[1], plan.max_prompt
    input_ids = torch.zeros(1, p, dtype=torch.int64)
    input_ids[0, :length] = ids[0]
    modality = (input_ids == gqa.config.image_token_id).long()
    embeds = torch.randn(1, p, gqa.config.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    got = session.run(None, {"input_ids": input_ids.numpy(), "image_embeds": embeds.numpy(),
                             "modality": modality.numpy(), "valid_length": np.array([length])})
    reference = PrefillGraph(gqa, get_policy("csp", **plan.policy_params), plan.budget, p, plan.n_slots)
    with torch.no_grad():
        want = reference(input_ids, embeds, modality, torch.tensor([length]))
    for a, b, name in zip(got, want, ["logits", "kv", "slot_position", "slot_modality", "slot_valid", "slot_mass"]):
        if name.startswith("slot_") and name != "slot_mass":
            np.testing.assert_array_equal(a, b.numpy(), err_msg=name)
        else:
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4, err_msg=name)
