"""INT4 weight-only conversion of an fp32 export (cspkv.quantize.int4), on the tiny GQA model's export
(conftest): what is quantized and how, the numbers it gives, what stays float, and what is refused.

The int4 graphs are run as their QDQ arithmetic defines them (graph optimisations off: dequantize, then a
float MatMul), which every CPU computes alike; ONNX Runtime's fused 4-bit kernel (MatMulNBits, int8
activations) is only required to run and to stay close."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from conftest import P_MAX, TEST_CHUNK
from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine
from cspkv.models.tiny import multi_image_prompt
from cspkv.quantize.convert import PrecisionError, convert_export
from cspkv.quantize.graph import module_of, weight_matmuls
from cspkv.quantize.int4 import dequantized_weights, int4_plan
from cspkv.runtime.manifest import ManifestError, read_manifest
from test_precision import cosine, qdq_semantics, quantized_against_fp32

# Tiny model (logits of magnitude ~0.5), prefill logits and one decode step fed the same fp32 cache: on two
# tiny seeds and three prompts, max |d logit| / max |logit| reached 0.18 (0.12 with lm_head float) and the
# cosine stayed >= 0.991, as QDQ arithmetic and through the fused kernel alike (within 0.003 of each other).
INT4_MAX_REL = 0.25
INT4_MIN_COSINE = 0.98
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def fp32(exports):
    return exports("gqa", "csp", 0.5)


@pytest.fixture(scope="module")
def int4(fp32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int4") / "int4"
    convert_export(fp32, folder, "int4")
    return folder


def roundf(x):
    """C's roundf: halves away from zero (numpy rounds them to even)."""
    whole = np.trunc(x)
    return np.where(np.abs(x - whole) >= 0.5, whole + np.sign(x), whole)


def reference_int4(weight: np.ndarray, block: int = 32, symmetric: bool = True):
    """Block quantization of a [K, N] float32 weight along K by the rules of onnxruntime's blockwise
    quantizer (MLAS q4_dq.cpp). Symmetric: per block and column the value of largest magnitude m (the negative
    one on a tie) maps to -8, scale = -m / 8, q = clip(roundf(w * (1 / scale)), -8, 7), zero point 0.
    Asymmetric: the range [min(w, 0), max(w, 0)] spans 0..15, scale = range / 15, zero point z =
    roundf(-min / scale), q = clip(roundf(w * (1 / scale)) + z, 0, 15). Returns (q, scale, zero point)."""
    k, n = weight.shape
    blocks = weight.reshape(k // block, block, n)
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    if symmetric:
        peak = np.where(np.abs(high) > np.abs(low), high, low)
        scale = (-peak / np.float32(8)).astype(np.float32)
    else:
        low, high = np.minimum(low, 0), np.maximum(high, 0)
        scale = ((high - low) / np.float32(15)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    reciprocal = np.where(scale == 0, np.float32(0), np.float32(1) / safe).astype(np.float32)
    zero = np.zeros_like(scale) if symmetric else np.clip(roundf(np.where(scale == 0, 0, -low / safe)), 0, 15)
    q = roundf((blocks * reciprocal[:, None, :]).astype(np.float32)) + zero[:, None, :]
    q = np.clip(q, -8, 7) if symmetric else np.clip(q, 0, 15)
    return q.reshape(k, n), scale, zero


def reference_weight(weight: np.ndarray, symmetric: bool = True) -> np.ndarray:
    q, scale, zero = reference_int4(weight, symmetric=symmetric)
    return ((q - np.repeat(zero, 32, axis=0)) * np.repeat(scale, 32, axis=0)).astype(np.float32)


def quantized_matmuls(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """{MatMul output name: (DequantizeLinear, MatMul)} of the MatMuls whose weight is dequantized."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return {n.output[0]: (producers[n.input[1]], n) for n in model.graph.node if n.op_type == "MatMul"
            and n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"}


def per_layer(role: str) -> int:
    """MatMuls per linear layer: the chunked prefill runs each projection once per chunk."""
    return -(-P_MAX // TEST_CHUNK) if role == "prefill" else 1


def fp32_weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, np.ndarray]]:
    """{MatMul output name: (MatMul, weight)} of the fp32 graph's weight MatMuls."""
    inits = {i.name: i for i in model.graph.initializer}
    names = weight_matmuls(model)
    return {n.output[0]: (n, numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node
            if n.name in names and n.input[1] in inits}


def random_decode_feed(manifest: dict, seed: int = 0) -> dict:
    m, p = manifest["model"], manifest["plan"]
    rng = np.random.default_rng(seed)
    feed = {"token": np.array([[7]], np.int64), "position": np.array([40], np.int64),
            "bias": np.zeros((m["layers"], 1, m["kv_heads"], p["n_slots"]), np.float32)}
    for layer in range(m["layers"]):
        for part in ("past_key", "past_value"):
            shape = (1, m["kv_heads"], p["n_slots"], m["head_dim"])
            feed[f"{part}_{layer}"] = rng.standard_normal(shape).astype(np.float32)
    return feed


# --- what the conversion writes ----------------------------------------------------------------------

def test_int4_quantizes_every_language_model_projection_in_blocks_of_32_and_records_it(fp32, int4):
    manifest, source = read_manifest(int4), read_manifest(fp32)
    assert manifest["precision"] == "int4" and manifest["kv_dtype"] == "float32"
    assert manifest["io"] == source["io"]                                   # same I/O, K/V float32
    conversion = manifest["conversion"]
    assert conversion["block_size"] == 32 and conversion["symmetric"] is True and conversion["format"] == "QDQ"
    assert (int4 / "vision.onnx").read_bytes() == (fp32 / "vision.onnx").read_bytes()   # vision stays fp32
    layers = source["model"]["layers"]
    for role in ("prefill", "decode"):
        model = onnx.load(str(int4 / f"{role}.onnx"))
        assert {o.domain: o.version for o in model.opset_import}[""] == 21
        onnx.checker.check_model(model, full_check=True)
        inits = {i.name: i for i in model.graph.initializer}
        pairs = quantized_matmuls(model)
        modules = sorted(module_of(matmul).rsplit(".", 1)[-1] for _, matmul in pairs.values())
        # every linear layer, nothing else
        assert modules == sorted(PROJECTIONS * layers * per_layer(role) + ("lm_head",)), role
        weights = {dq.input[0] for dq, _ in pairs.values()}
        assert len(weights) == len(PROJECTIONS) * layers + 1                    # one DequantizeLinear each
        for dq, _ in pairs.values():
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            assert attrs == {"axis": 0, "block_size": 32}
            codes, scales = inits[dq.input[0]], inits[dq.input[1]]
            assert codes.data_type == onnx.TensorProto.INT4 and len(dq.input) == 2      # no zero point
            k, n = codes.dims
            assert len(codes.raw_data) == k * n // 2                                    # two weights a byte
            assert list(scales.dims) == [k // 32, n] and scales.data_type == onnx.TensorProto.FLOAT
        graph = conversion["graphs"][role]
        assert graph["int4_matmuls"] == len(PROJECTIONS) * layers * per_layer(role) + 1 == graph["weight_matmuls"]
        assert graph["kept_float"] == {}
    assert conversion["graphs"]["vision"]["quantized"] is False
    assert list(conversion["graphs"]["vision"]["kept_float"]) == ["vision"]
    for role in ("prefill", "decode"):          # the 4-bit weights stay inside their graph (fused, repacked)
        graph = onnx.load(str(int4 / f"{role}.onnx"), load_external_data=False).graph
        quantized = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT4]
        assert quantized and all(t.data_location == onnx.TensorProto.DEFAULT and t.raw_data for t in quantized)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_weights_equal_a_numpy_reference_block_quantization(fp32, int4, tmp_path, symmetric):
    """Codes, scales and zero points of every quantized weight equal the reference's bit for bit, and the
    decode graph computes exactly an fp32 graph holding the reference's dequantized weights."""
    folder = int4
    if not symmetric:
        folder = tmp_path / "asymmetric"
        convert_export(fp32, folder, "int4", symmetric=False)
    assert read_manifest(folder)["conversion"]["symmetric"] is symmetric
    for role in ("prefill", "decode"):
        model = onnx.load(str(folder / f"{role}.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        original = fp32_weights(onnx.load(str(fp32 / f"{role}.onnx")))
        pairs = quantized_matmuls(model)
        assert pairs and set(pairs) == set(original)
        dequantized = dequantized_weights(model)
        for output, (dq, matmul) in pairs.items():
            q, scale, zero = reference_int4(original[output][1], symmetric=symmetric)
            codes = inits[dq.input[0]]
            assert codes.data_type == (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4)
            np.testing.assert_array_equal(numpy_helper.to_array(codes).astype(np.float32), q)
            np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[1]]), scale)
            if symmetric:
                assert len(dq.input) == 2
            else:
                np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32), zero)
            np.testing.assert_array_equal(dequantized[matmul.name], reference_weight(original[output][1], symmetric))
    # the reference's weights in the fp32 decode graph give the int4 graph's numbers
    fake = onnx.load(str(fp32 / "decode.onnx"))
    inits = {i.name: i for i in fake.graph.initializer}
    for node, weight in fp32_weights(fake).values():
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(reference_weight(weight, symmetric), node.input[1]))
    feed = random_decode_feed(read_manifest(fp32))
    want = ort.InferenceSession(fake.SerializeToString(), qdq_semantics(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(folder / "decode.onnx"), qdq_semantics(), providers=["CPUExecutionProvider"])
    want, got = want.run(None, feed), got.run(None, feed)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_int4_logits_stay_close_to_fp32_and_the_fused_kernel_runs_end_to_end(fp32, int4):
    ids, pixels, pairs = quantized_against_fp32(fp32, int4)
    for got, want in pairs:
        assert cosine(got, want) > INT4_MIN_COSINE
        assert np.abs(got - want).max() < INT4_MAX_REL * np.abs(want).max()
        assert np.abs(got - want).max() > 0                                 # the weights really changed
    # default session: onnxruntime fuses DequantizeLinear -> MatMul into its 4-bit kernel
    pipeline = OnnxPipeline(int4)
    result = pipeline.generate(ids, pixels, max_new_tokens=20)              # ring overflow included
    assert len(result.tokens) == 20 and pipeline.buffer.dtype == np.float32
    reference = pairs[0][1]                                                  # fp32's prefill logits
    assert cosine(result.logits[0], reference) > INT4_MIN_COSINE
    assert np.abs(result.logits[0] - reference).max() < INT4_MAX_REL * np.abs(reference).max()


def test_int4_graphs_are_tensorrt_ready(int4):
    """Opset 21 (for the INT4 weights), symmetric blocked DequantizeLinear on constant weights feeding
    MatMul weights: what TensorRT's IDequantizeLayer takes."""
    from cspkv.export.readiness import check_graph

    for role in ("prefill", "decode"):
        report = check_graph(int4 / f"{role}.onnx")
        assert report.ok, report.problems
        assert report.op_counts["DequantizeLinear"] == 7 * read_manifest(int4)["model"]["layers"] + 1


def test_readiness_refuses_int4_forms_tensorrt_does_not_take(tmp_path):
    from onnx import TensorProto, helper

    from cspkv.export.readiness import check_graph

    def graph(zero=None, reader="MatMul", opset=21, weight_type=TensorProto.INT4, scale_input=False):
        weight = helper.make_tensor("w", weight_type, [64, 8], np.zeros(64 * 8, np.int8).tolist())
        inits = [weight]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])]
        if scale_input:
            inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 8]))
        else:
            inits.append(helper.make_tensor("s", TensorProto.FLOAT, [2, 8], np.ones(16, np.float32).tolist()))
        dq_inputs = ["w", "s"]
        if zero is not None:
            inits.append(helper.make_tensor("z", weight_type, [2, 8], [zero] * 16))
            dq_inputs.append("z")
        nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["wf"], axis=0, block_size=32, name="dq")]
        nodes.append(helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm") if reader == "MatMul"
                     else helper.make_node("Add", ["wf", "wf"], ["y"], name="add"))
        out_shape = [1, 8] if reader == "MatMul" else [64, 8]
        g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
        path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), path)
        return "\n".join(check_graph(path).problems)

    assert graph() == ""
    assert graph(zero=0) == ""
    assert "zero point must be absent or zero" in graph(zero=3)
    assert "must feed only MatMul weights" in graph(reader="Add")
    assert "scale is not a constant" in graph(scale_input=True)
    assert "block quantization (a 2-D scale) is for INT4 weights only" in graph(weight_type=TensorProto.INT8)
    assert "opset 21 without INT4 weights" in graph(weight_type=TensorProto.INT8)
    assert "opset 20, expected 18 (21 for INT4 weights)" in graph(opset=20)


def test_int4_keeps_lm_head_float_on_request(fp32, tmp_path):
    folder = tmp_path / "lm-head-float"
    convert_export(fp32, folder, "int4", quantize_lm_head=False)
    manifest = read_manifest(folder)
    assert manifest["conversion"]["quantize_lm_head"] is False
    for role in ("prefill", "decode"):
        assert manifest["conversion"]["graphs"][role]["kept_float"] == {
            "lm_head": "lm_head kept float on request (quantize_lm_head=False)"}
        model = onnx.load(str(folder / f"{role}.onnx"))
        assert "lm_head" not in {module_of(m) for _, m in quantized_matmuls(model).values()}
        assert len(quantized_matmuls(model)) == 7 * manifest["model"]["layers"] * per_layer(role)
    ids, pixels = multi_image_prompt(4, seed=2)
    assert len(OnnxPipeline(folder).generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=4).tokens) == 4


# --- what stays float, and what is refused -------------------------------------------------------------

def test_int4_keeps_layers_whose_k_the_block_does_not_divide_in_float_and_names_them(fp32, tmp_path):
    """Tiny model: K is 64 for q/k/v/o/gate/up_proj and lm_head, 128 for down_proj; blocks of 128 fit
    down_proj only."""
    messages = []
    folder = tmp_path / "b128"
    convert_export(fp32, folder, "int4", block_size=128, progress=messages.append)
    manifest = read_manifest(folder)
    layers = manifest["model"]["layers"]
    assert manifest["conversion"]["block_size"] == 128
    for role in ("prefill", "decode"):
        kept = manifest["conversion"]["graphs"][role]["kept_float"]
        small = {f"text.layers.{i}.{kind}.{proj}" for i in range(layers)
                 for kind, projs in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:6])) for proj in projs}
        assert set(kept) == small | {"lm_head"}
        assert all(kept[m] == "K=64 is smaller than the block size 128" for m in small | {"lm_head"})
        model = onnx.load(str(folder / f"{role}.onnx"))
        assert sorted(module_of(m) for _, m in quantized_matmuls(model).values()) == \
            sorted(f"text.layers.{i}.mlp.down_proj" for i in range(layers) for _ in range(per_layer(role)))
        assert manifest["conversion"]["graphs"][role]["int4_matmuls"] == layers * per_layer(role)
    assert "int4: decode: text.layers.0.self_attn.q_proj kept float (K=64 is smaller than the block size 128)" \
        in messages


def test_int4_plan_keeps_a_k_that_is_not_a_multiple_of_the_block_in_float():
    from onnx import TensorProto, helper

    weights = {"w48": np.ones((48, 8), np.float32), "w64": np.ones((64, 8), np.float32),
               "w3d": np.ones((1, 64, 8), np.float32)}
    nodes = [helper.make_node("MatMul", ["x48", "w48"], ["y48"], name="a"),
             helper.make_node("MatMul", ["x64", "w64"], ["y64"], name="b"),
             helper.make_node("MatMul", ["x64", "w3d"], ["y3d"], name="c")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, int(n[1:])]) for n in ("x48", "x64")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y48", "y64", "y3d")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    quantize, kept = int4_plan(helper.make_model(graph), 32)
    assert quantize == ["b"]
    assert kept == {"a": "K=48 is not a multiple of the block size 32", "c": "weight is 3-D [1, 64, 8], not 2-D"}


@pytest.mark.parametrize("block_size, message", [
    (24, "block size must be a power of two >= 16 .*got 24: use 32"),
    (8, "block size must be a power of two >= 16 .*got 8"),
    (256, "no linear layer of .* can be quantized to int4 with block size 256 .*K=64 is smaller than the block "
          "size 256.*choose a block size that divides their K"),
])
def test_int4_refuses_a_block_size_before_writing_anything(fp32, tmp_path, block_size, message):
    with pytest.raises(PrecisionError, match=message):
        convert_export(fp32, tmp_path / "out", "int4", block_size=block_size)
    assert not (tmp_path / "out").exists()


def test_int4_is_converted_from_fp32_only(int4, tmp_path):
    with pytest.raises(PrecisionError, match="is a int4 export: convert from the fp32 export"):
        convert_export(int4, tmp_path / "again", "int4")


def test_cli_exports_int4_and_refuses_options_of_other_precisions(fp32, tmp_path):
    from cspkv.cli.export import main

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(main, ["--from", str(fp32), "--precision", "int4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "precision int4, K/V float32" in result.output
    assert read_manifest(out)["conversion"]["block_size"] == 32
    for args, message in ((["--precision", "int4", "--int8-flavour", "s8s8"], "--int8-flavour applies to --precision "
                                                                               "int8 only, not int4"),
                          (["--precision", "int4", "--calibration", "auto"],
                           "--calibration applies to --precision int8"),
                          (["--precision", "int8", "--int4-block-size", "64"], "--int4-block-size applies to "
                                                                               "--precision int4 only, not int8"),
                          (["--int4-block-size", "64"], "--int4-block-size applies to --precision int4 only, not fp32"),
                          (["--precision", "int4", "--int4-block-size", "48"], "power of two >= 16")):
        result = runner.invoke(main, ["--from", str(fp32), *args, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        error = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1, result.output
    assert not (tmp_path / "bad").exists()


# --- the reader ------------------------------------------------------------------------------------------

def _copy(folder, dst, edit=None):
    shutil.copytree(folder, dst)
    if edit:
        manifest = json.loads((dst / "manifest.json").read_text())
        edit(manifest)
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_reader_refuses_a_corrupt_or_mismatched_int4_folder(fp32, int4, tmp_path):
    no_block = _copy(int4, tmp_path / "no-block", lambda m: m["conversion"].pop("block_size"))
    with pytest.raises(ManifestError, match=r"conversion.block_size is missing: re-run csp-export"):
        read_manifest(no_block)
    odd = _copy(int4, tmp_path / "odd", lambda m: m["conversion"].update(block_size=48))
    with pytest.raises(ManifestError, match=r"conversion.block_size is 48, expected a power of two"):
        read_manifest(odd)
    unsure = _copy(int4, tmp_path / "unsure", lambda m: m["conversion"].update(symmetric="yes"))
    with pytest.raises(ManifestError, match=r"conversion.symmetric is not true or false"):
        read_manifest(unsure)
    half = _copy(int4, tmp_path / "half", lambda m: m.update(kv_dtype="float16"))
    with pytest.raises(ManifestError, match="kv_dtype is 'float16', but a int4 export holds float32 K/V"):
        read_manifest(half)
    # an fp32 manifest relabelled int4 lacks the quantization record
    relabelled = _copy(fp32, tmp_path / "relabelled", lambda m: m.update(precision="int4"))
    with pytest.raises(ManifestError, match="conversion.block_size is missing"):
        OrtEngine(relabelled)
    # the fp32 decode graph copied over the int4 one
    swapped = _copy(int4, tmp_path / "swapped")
    shutil.copy(fp32 / "decode.onnx", swapped / "decode.onnx")
    with pytest.raises(ManifestError, match="decode.onnx has .* bytes, manifest.json says"):
        OrtEngine(swapped)
    truncated = _copy(int4, tmp_path / "truncated")
    data = (truncated / "prefill.onnx").read_bytes()
    (truncated / "prefill.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="prefill.onnx has .* bytes, manifest.json says .*truncated"):
        OrtEngine(truncated)
    flipped = _copy(int4, tmp_path / "flipped")
    data = bytearray((flipped / "decode.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "decode.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="decode.onnx does not match its manifest hash"):
        OrtEngine(flipped)
