"""FP16 / INT8 conversions of an fp32 export (cspkv.quantize), their calibration data and the
runtime's kv_dtype, on the tiny GQA model's export (conftest)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import P_MAX, TEST_CHUNK
from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine
from cspkv.models.tiny import multi_image_prompt
from cspkv.quantize.calibration import HOW_TO, CalibrationError, CalibrationSettings, FeedReader, build_calibration_set, cache_key
from cspkv.quantize.calibration_prompts import tiny_prompts, train_prompts
from cspkv.quantize.convert import PrecisionError, convert_export
from cspkv.quantize.graph import scoring_path_nodes
from cspkv.runtime.manifest import ManifestError, read_manifest

# Tolerances on the tiny model (logits of magnitude ~0.5), prefill logits and one decode step fed the
# same fp32 cache. fp16 measured ~4e-4; int8 measured ~0.05-0.07 max abs, cosine > 0.99. int8 graphs
# are checked as their QDQ arithmetic defines them (graph optimisations off: dequantize, then float
# MatMul), which every CPU computes alike; ONNX Runtime's fused int8 kernels round and saturate
# differently by instruction set (AVX2 without VNNI, AVX-512 VNNI), which is the precision table's
# business, not a test's.
FP16_ATOL = 3e-3
INT8_MIN_COSINE = 0.98
INT8_MAX_REL = 0.25   # max |d logit| / max |logit|


@pytest.fixture(scope="module")
def calib_cache(tmp_path_factory):
    """Calibration sets go to a temporary cache, never to ~/.cache (restored afterwards)."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cspkv-cache")
    mp.setenv("CSPKV_CACHE_DIR", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="module")
def fp32(exports):
    return exports("gqa", "csp", 0.5)


@pytest.fixture(scope="module")
def converted(fp32, calib_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    folders = {}
    for precision in ("fp16", "int8-u8s8", "int8-s8s8"):
        folders[precision] = root / precision
        convert_export(fp32, folders[precision], precision)
    return folders


def prefill_and_step(engine: OrtEngine, ids, pixels, fp32_out=None):
    """Prefill logits, and one decode step's logits fed ``fp32_out``'s cache (teacher forcing)."""
    modality = (ids == engine.manifest["model"]["image_token_id"]).astype(np.int64)
    features = engine.image_features(pixels).reshape(-1, engine.hidden_size)
    out = engine.prefill(ids, modality, features)
    source = fp32_out or out
    kv = source["kv"].astype(np.float32)
    bias = np.where(source["slot_valid"][:, None] > 0, 0.0, -np.inf).astype(np.float32)
    token = int(source["logits"][0].argmax())
    step = engine.decode(token, len(ids), kv, bias)
    return out, step[0][0]


def qdq_semantics():
    """Session options that run a QDQ graph as written (no int8 kernel fusion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def quantized_against_fp32(fp32, folder):
    """(ids, pixels, [(prefill logits, fp32's), (one decode step's logits, fp32's)]) for an 8-image
    prompt, the quantized export run as a QDQ graph (no kernel fusion)."""
    base, quantized = OrtEngine(fp32), OrtEngine(folder, session_options=qdq_semantics())
    ids, pixels = multi_image_prompt(8, seed=5)
    ids, pixels = ids[0].numpy(), pixels.numpy()
    ref_out, ref_step = prefill_and_step(base, ids, pixels)
    out, step = prefill_and_step(quantized, ids, pixels, ref_out)
    return ids, pixels, [(out["logits"][0], ref_out["logits"][0]), (step, ref_step)]


# --- fp16 --------------------------------------------------------------------------------------------

def test_fp16_folder_has_float16_kv_and_fp32_io_elsewhere(fp32, converted):
    manifest = read_manifest(converted["fp16"])
    source = read_manifest(fp32)
    assert manifest["precision"] == "fp16" and manifest["kv_dtype"] == "float16"
    assert manifest["source"]["fingerprint"] == source["model"]["fingerprint"]
    assert manifest["manifest_version"] == source["manifest_version"]
    for name in ("weights.bin", "vision.onnx"):                               # weights halve (the tiny
        assert manifest["files"][name]["bytes"] < 0.9 * source["files"][name]["bytes"]  # model is mostly graph)
    io = manifest["io"]
    assert io["prefill"]["outputs"]["kv"]["dtype"] == "float16"
    assert io["decode"]["outputs"]["new_kv"]["dtype"] == "float16"
    for name, spec in io["decode"]["inputs"].items():
        assert spec["dtype"] == ("float16" if name.startswith("past_") else source["io"]["decode"]["inputs"][name]["dtype"])
    from cspkv.export.readiness import check_graph

    for role in ("vision", "prefill", "decode"):                       # still TensorRT-importable,
        report = check_graph(converted["fp16"] / f"{role}.onnx")        # topologically sorted, typed
        assert report.ok, report.problems
        onnx.checker.check_model(onnx.load(str(converted["fp16"] / f"{role}.onnx")), full_check=True)
        for kind in ("inputs", "outputs"):
            for name, spec in io[role][kind].items():
                if name not in ("kv", "new_kv") and not name.startswith("past_"):
                    assert spec == source["io"][role][kind][name], (role, name)


def test_fp16_keeps_the_pruning_scores_and_top_k_in_fp32(fp32, converted):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(converted["fp16"] / "prefill.onnx")))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    blocked = set(scoring_path_nodes(onnx.load(str(fp32 / "prefill.onnx"))))
    # the selection compares scores in float32 (the threshold search and its ties)
    compares = [n for n in graph.node if n.name in blocked and n.op_type in ("GreaterOrEqual", "Greater", "Equal")]
    assert compares and all(types[n.input[0]] != onnx.TensorProto.FLOAT16 for n in compares)
    assert sum(types[n.input[0]] == onnx.TensorProto.FLOAT for n in compares) >= 2 * 8   # two top-k, 8 rounds
    # the scoring path's exp/reductions (n-softmax statistics) read float32
    stats = [n for n in graph.node if n.name in blocked and n.op_type in ("Exp", "ReduceMax", "ReduceSum")]
    assert all(types[n.input[0]] != onnx.TensorProto.FLOAT16 for n in stats)   # float32 (or integer counts)
    assert sum(types[n.input[0]] == onnx.TensorProto.FLOAT for n in stats) >= 3 * 2      # per layer: max, exp, sums
    # and the transformer's MatMuls really are float16
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.name not in blocked]
    assert matmuls and all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)


def test_fp16_logits_close_to_fp32_and_kv_buffer_is_float16(fp32, converted):
    base, half = OrtEngine(fp32), OrtEngine(converted["fp16"])
    ids, pixels = multi_image_prompt(8, seed=5)
    ids, pixels = ids[0].numpy(), pixels.numpy()
    ref_out, ref_step = prefill_and_step(base, ids, pixels)
    out, step = prefill_and_step(half, ids, pixels, ref_out)
    assert out["kv"].dtype == np.float16
    assert np.abs(out["logits"] - ref_out["logits"]).max() < FP16_ATOL
    assert np.abs(step - ref_step).max() < FP16_ATOL
    pipeline, pipeline32 = OnnxPipeline(converted["fp16"]), OnnxPipeline(fp32)
    assert pipeline.buffer.dtype == np.float16 and pipeline.buffer.kv.dtype == np.float16
    assert pipeline.buffer.nbytes * 2 == pipeline32.buffer.nbytes
    result = pipeline.generate(ids, pixels, max_new_tokens=20)      # ring overflow included
    assert len(result.tokens) == 20 and result.kv_bytes == pipeline.buffer.nbytes
    assert np.abs(result.logits[0] - ref_out["logits"][0]).max() < FP16_ATOL
    kv_view = pipeline.buffer.kv.reshape(pipeline.layers, 2, 1, pipeline.heads, pipeline.n_slots, pipeline.head_dim)
    assert [v.data_ptr() for v in pipeline.engine._kv_values][:2] == [kv_view[0, 0].ctypes.data, kv_view[0, 1].ctypes.data]


# --- int8 --------------------------------------------------------------------------------------------

def test_int8_calibrates_only_weight_matmul_inputs_and_quantizes_as_full_calibration_does(fp32, calib_cache, tmp_path):
    """The reference is onnxruntime's own MinMax calibration of every MatMul input and output; the
    narrower calibration (weight MatMul activations only, what bounds memory at long P_max) must give
    the same ranges for those inputs and byte-identical quantized graphs."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from cspkv.quantize.graph import weight_matmul_tensors
    from cspkv.quantize.int8 import calibrate_ranges, int8_options, quantize_weight_matmuls

    manifest = read_manifest(fp32)
    calibration = build_calibration_set(fp32, "auto")
    options = int8_options("u8s8")
    for role in ("prefill", "decode"):
        path = fp32 / manifest["graphs"][role]
        reader = calibration.reader(role, manifest)
        narrow = calibrate_ranges(path, reader, tmp_path / f"{role}-narrow.json")
        calibrator = create_calibrator(path, ["MatMul", "Gemm"], augmented_model_path=str(tmp_path / "aug.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        reader.rewind()
        calibrator.collect_data(reader)
        full = calibrator.compute_data()
        save_tensors_data(full, tmp_path / f"{role}-full.json")
        model = onnx.load(str(path))
        observed = weight_matmul_tensors(model)
        assert set(narrow.data) == observed and observed < set(full.data)
        for name in observed:
            np.testing.assert_array_equal(narrow.data[name].range_value, full.data[name].range_value)
        graphs = {}
        for kind in ("narrow", "full"):
            reader.rewind()
            quantize_weight_matmuls(path, tmp_path / f"{role}-{kind}.onnx", model, reader, options, [],
                                    tmp_path / f"{role}-{kind}.json")
            graphs[kind] = (tmp_path / f"{role}-{kind}.onnx").read_bytes()
        assert graphs["narrow"] == graphs["full"], role


@pytest.mark.parametrize("flavour", ["u8s8", "s8s8"])
def test_int8_quantizes_weight_matmuls_only_and_stays_close(fp32, converted, flavour):
    folder = converted[f"int8-{flavour}"]
    manifest = read_manifest(folder)
    assert manifest["precision"] == f"int8-{flavour}" and manifest["kv_dtype"] == "float32"
    assert manifest["io"] == read_manifest(fp32)["io"]                  # same I/O, K/V float32
    graph = onnx.load(str(folder / "prefill.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quant
    zero_types = {inits[n.input[2]].data_type for n in quant}
    assert zero_types == {onnx.TensorProto.UINT8 if flavour == "u8s8" else onnx.TensorProto.INT8}
    if flavour == "s8s8":                                               # symmetric: zero points are 0
        assert all(not np.any(onnx.numpy_helper.to_array(inits[n.input[2]])) for n in quant)
    producers = {o: n for n in graph.node for o in n.output}
    dq_matmuls = [n for n in graph.node if n.op_type == "MatMul"
                  and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)]
    plain = [n for n in graph.node if n.op_type == "MatMul" and n not in dq_matmuls]
    assert dq_matmuls and plain
    from cspkv.quantize.graph import activation_matmuls, weight_matmuls

    fp32_prefill = onnx.load(str(fp32 / "prefill.onnx"))
    attention = activation_matmuls(fp32_prefill)      # attention / scoring MatMuls are not quantized
    assert attention and set(attention) <= {n.name for n in plain}
    assert {n.name for n in dq_matmuls} <= set(weight_matmuls(fp32_prefill))
    assert manifest["conversion"]["graphs"]["prefill"]["activation_matmuls_fp32"] == len(attention)
    from cspkv.quantize.graph import module_of

    excluded = set(manifest["conversion"]["graphs"]["prefill"]["excluded_nodes"])
    lm_head = [n for n in plain if n.name in excluded and module_of(n) == "lm_head"]
    assert len(lm_head) == 1                          # lm_head stays fp32
    fp32_graph = onnx.load(str(fp32 / "prefill.onnx")).graph
    kept = {n.name for n in fp32_graph.node if n.op_type == "MatMul"
            and module_of(n).endswith((".down_proj", ".k_proj", ".v_proj"))}
    chunks = -(-P_MAX // TEST_CHUNK)                  # the prefill runs each projection once per chunk
    assert len(kept) == 3 * read_manifest(fp32)["model"]["layers"] * chunks and kept <= excluded
    assert kept <= {n.name for n in plain}            # every down_proj, k_proj and v_proj stays fp32
    q_proj = {n.name for n in fp32_graph.node if n.op_type == "MatMul" and module_of(n).endswith(".q_proj")}
    assert len(q_proj) == read_manifest(fp32)["model"]["layers"] * chunks
    if flavour == "s8s8":                             # s8s8 keeps q_proj fp32 too: its shared input is lopsided
        assert q_proj <= {n.name for n in plain} and "q_proj" in manifest["conversion"]["exclude_module_types"]
    else:
        assert q_proj <= {n.name for n in dq_matmuls}
    if flavour == "s8s8":                             # what TensorRT's explicit quantization imports
        from cspkv.export.readiness import check_graph

        assert all(check_graph(folder / f"{role}.onnx").ok for role in ("vision", "prefill", "decode"))

    ids, pixels, pairs = quantized_against_fp32(fp32, folder)
    for got, want in pairs:
        assert cosine(got, want) > INT8_MIN_COSINE
        assert np.abs(got - want).max() < INT8_MAX_REL * np.abs(want).max()
    result = OnnxPipeline(folder).generate(ids, pixels, max_new_tokens=8)
    assert len(result.tokens) == 8


def test_int8_keeps_the_chosen_projection_types_fp32_and_refuses_an_unknown_type(fp32, converted, calib_cache,
                                                                                  tmp_path):
    """keep_fp32_types replaces the default set: k/v_proj stay plain MatMuls, down_proj is quantized."""
    # k/v_proj only, so that down_proj (a default type) shows the default was replaced, not extended
    from cspkv.quantize.graph import module_of

    folder = tmp_path / "kv-fp32"
    convert_export(fp32, folder, "int8-u8s8", keep_fp32_types=["k_proj", "v_proj"])
    manifest = read_manifest(folder)
    assert manifest["conversion"]["exclude_module_types"] == ["k_proj", "v_proj"]
    graph = onnx.load(str(folder / "prefill.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}

    def quantized(suffix):
        nodes = [n for n in graph.node if n.op_type == "MatMul" and module_of(n).endswith(suffix)]
        assert nodes
        # the weight input: k/v_proj share their activation (and its Q/DQ pair) with the quantized q_proj
        return {n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear" for n in nodes}

    assert quantized(".k_proj") == {False} and quantized(".v_proj") == {False}
    assert quantized(".down_proj") == {True} and quantized(".q_proj") == {True}
    with pytest.raises(PrecisionError, match="type kproj: choose from .*down_proj.*k_proj"):
        convert_export(fp32, tmp_path / "typo", "int8-u8s8", keep_fp32_types=["kproj"])
    assert not (tmp_path / "typo").exists()


def _graph_content(path):
    """A graph's ops and its initializers' bytes, whatever the initializers are named and wherever stored."""
    graph = onnx.load(str(path)).graph
    weights = sorted(onnx.numpy_helper.to_array(t).tobytes() for t in graph.initializer)
    return [(n.op_type, n.domain) for n in graph.node], weights


def test_int8_copies_the_decode_graph_as_fp32_by_default_and_refuses_an_unknown_graph(fp32, converted, calib_cache,
                                                                                       tmp_path):
    for flavour in ("u8s8", "s8s8"):
        folder = converted[f"int8-{flavour}"]
        graphs = read_manifest(folder)["conversion"]["graphs"]
        assert {r: g["quantized"] for r, g in graphs.items()} == {"vision": True, "prefill": True, "decode": False}
        assert _graph_content(folder / "decode.onnx") == _graph_content(fp32 / "decode.onnx")
        assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(folder / "prefill.onnx")).graph.node)
    every = tmp_path / "every"
    convert_export(fp32, every, "int8-u8s8", keep_fp32_graphs=[])
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(every / "decode.onnx")).graph.node)
    with pytest.raises(PrecisionError, match="no graph named decoder .*choose from .*decode"):
        convert_export(fp32, tmp_path / "typo", "int8-u8s8", keep_fp32_graphs=["decoder"])


# --- calibration ---------------------------------------------------------------------------------------

def test_decode_feed_prompts_are_spread_over_every_task():
    from cspkv.quantize.calibration import decode_feed_prompts
    from cspkv.evaluation.easyvqa_tasks import TASKS

    chosen = decode_feed_prompts(16, 12)
    assert len(chosen) == 12 and chosen[0] == 0 and chosen[-1] == 15 and chosen == sorted(set(chosen))
    # the default set cycles through the tasks: every task gives decode feeds
    assert {TASKS[i % len(TASKS)] for i in chosen} == set(TASKS)
    assert decode_feed_prompts(8, 4) == [0, 2, 5, 7]
    assert decode_feed_prompts(3, 10) == [0, 1, 2]
    assert decode_feed_prompts(0, 4) == [] and decode_feed_prompts(5, 0) == []


def test_calibration_reader_yields_each_graphs_inputs(fp32, calib_cache):
    import onnxruntime as ort

    manifest = read_manifest(fp32)
    calib = build_calibration_set(fp32)
    assert calib.meta["settings"]["source"] == "tiny-synthetic"
    settings = calib.meta["settings"]
    assert 0 < len(calib.feeds["decode"]) <= settings["decode_feeds"]
    # the decode feeds come from prompts spread over the set, the last one included
    assert len(calib.meta["decode_feed_prompts"]) == len(calib.feeds["decode"])
    assert calib.meta["decode_feed_prompts"][-1] == calib.meta["prompts"][-1]
    for role in ("vision", "prefill", "decode"):
        session = ort.InferenceSession(str(fp32 / f"{role}.onnx"), providers=["CPUExecutionProvider"])
        reader = calib.reader(role, manifest)
        feeds = list(iter(reader.get_next, None))
        assert len(feeds) == len(reader) > 0
        for feed in feeds:
            assert list(feed) == [i.name for i in session.get_inputs()]
            for spec in session.get_inputs():
                assert list(feed[spec.name].shape) == spec.shape
        reader.rewind()
        assert reader.get_next() is feeds[0]
        session.run(None, feeds[-1])                                   # a real, runnable feed
    prefill = calib.feeds["prefill"][0]
    assert 0 < int(prefill["valid_length"][0]) <= manifest["plan"]["max_prompt"]
    bad = {**prefill, "valid_length": prefill["valid_length"].astype(np.int32)}
    with pytest.raises(CalibrationError, match="valid_length"):
        FeedReader([bad], manifest["io"]["prefill"]["inputs"], "prefill")


def test_calibration_set_is_cached_by_export_and_settings(fp32, calib_cache, monkeypatch):
    first = build_calibration_set(fp32)
    manifest = read_manifest(fp32)
    key = cache_key(manifest, CalibrationSettings("tiny-synthetic", 8, 3, 4))
    assert (calib_cache / "calibration" / key / "meta.json").is_file()
    assert key != cache_key(manifest, CalibrationSettings("tiny-synthetic", 9, 3, 4))
    import cspkv.quantize.calibration as data

    monkeypatch.setattr(data, "record_calibration_set", lambda *a, **k: pytest.fail("should come from the cache"))
    again = build_calibration_set(fp32)
    assert again.meta["prompts"] == first.meta["prompts"]
    np.testing.assert_array_equal(again.feeds["decode"][0]["past_key_0"], first.feeds["decode"][0]["past_key_0"])


def test_calibration_prompts_come_from_the_training_split_only(monkeypatch):
    from cspkv.evaluation import easyvqa_tasks as tasks
    from cspkv.data import easyvqa

    seen_splits = []
    real_labels = easyvqa.load_labels

    def spy_labels(split):
        seen_splits.append(split)
        if split != "train":
            raise AssertionError("calibration touched the test split")
        return real_labels(split)

    built = []

    def fake_build_prompt(sample, processor, system=None, images=None):   # no images, no tokenizer
        built.append(sample)
        n = 40 * sample.n_images + 30
        return {"input_ids": np.ones((1, n), np.int64), "pixel_values": np.zeros((sample.n_images, 3, 4, 4))}

    monkeypatch.setattr(tasks, "load_labels", spy_labels)
    monkeypatch.setattr(tasks, "build_prompt", fake_build_prompt)
    monkeypatch.setattr(tasks, "load_image", lambda *a, **k: pytest.fail("no image is needed here"))
    prompts = train_prompts(processor=None, n_prompts=8, max_prompt=200)
    assert len(prompts) == 8 and all(len(p.input_ids) <= 200 for p in prompts)
    assert set(seen_splits) == {"train"}
    assert built and all(s.split == "train" and s.sample_id.startswith("train-") for s in built)
    assert all(p.source.startswith("easyvqa-train:train-") for p in prompts)
    assert len({s.task for s in built}) > 1
    with pytest.raises(CalibrationError, match="training split only"):
        train_prompts(processor=None, n_prompts=1, max_prompt=200, split="test")
    assert set(seen_splits) == {"train"}


def test_tiny_prompts_fit_the_export():
    prompts = tiny_prompts(6, max_prompt=60)
    assert all(len(p.input_ids) <= 60 and (p.input_ids == 99).sum() == 16 * len(p.pixel_values) for p in prompts)
    with pytest.raises(CalibrationError, match="--max-prompt"):
        tiny_prompts(1, max_prompt=10)


# --- manifests, runtime and CLI -----------------------------------------------------------------------

def _copy_with_manifest(src, dst, **changes):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_unknown_precision_and_mismatched_kv_dtype_are_refused(fp32, converted, tmp_path):
    bad = _copy_with_manifest(fp32, tmp_path / "int2", precision="int2")
    with pytest.raises(ManifestError, match="precision 'int2'.*fp32, fp16, int8-u8s8, int8-s8s8, int4"):
        OnnxPipeline(bad)
    lying = _copy_with_manifest(converted["fp16"], tmp_path / "lying", kv_dtype="float32")
    with pytest.raises(ManifestError, match="kv_dtype is 'float32', but a fp16 export holds float16 K/V"):
        OrtEngine(lying)
    # precision and kv_dtype that agree with each other but not with the graphs
    both = _copy_with_manifest(converted["fp16"], tmp_path / "both", kv_dtype="float32", precision="fp32")
    with pytest.raises(ManifestError, match="output kv is float16 .* but manifest.json says float32|"
                                            "output kv is float16, but kv_dtype"):
        OrtEngine(both)
    with pytest.raises(PrecisionError, match="fp16 export"):
        convert_export(converted["fp16"], tmp_path / "again", "int8")


def test_cli_converts_an_existing_export(fp32, tmp_path):
    from cspkv.cli.export import main

    out = tmp_path / "fp16"
    result = CliRunner().invoke(main, ["--from", str(fp32), "--precision", "fp16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "precision fp16, K/V float16" in result.output
    assert read_manifest(out)["precision"] == "fp16"


def test_cli_int8_without_calibration_data_says_how_to_provide_it(fp32, tmp_path, calib_cache):
    from cspkv.cli.export import main

    runner = CliRunner()
    result = runner.invoke(main, ["--model", "llava", "--precision", "int8", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "record_calibration_set" in result.output and "--calibration" in result.output
    other = _copy_with_manifest(fp32, tmp_path / "other-model", model={"id": "/models/my-llava"})
    result = runner.invoke(main, ["--from", str(other), "--precision", "int8", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and HOW_TO.splitlines()[0][:60] in result.output
    result = runner.invoke(main, ["--from", str(fp32), "--precision", "int8", "--calibration", str(tmp_path / "none"),
                                  "--out", str(tmp_path / "c")])
    assert result.exit_code != 0 and "no such folder" in result.output and "record_calibration_set" in result.output


def test_cli_exports_fp32_then_converts_to_int8_with_built_in_calibration(tmp_path, calib_cache):
    from cspkv.cli.export import main

    out = tmp_path / "int8"
    result = CliRunner().invoke(main, ["--model", "tiny", "--max-prompt", "64", "--decode-slots", "4",
                                       "--precision", "int8", "--int8-flavour", "s8s8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["precision"] == "int8-s8s8" and manifest["plan"]["max_prompt"] == 64
    assert manifest["conversion"]["calibration"]["settings"]["source"] == "tiny-synthetic"
    assert all(p.startswith("tiny-synthetic:") for p in manifest["conversion"]["calibration"]["prompts"])
    ids, pixels = multi_image_prompt(2, seed=1)
    assert len(OnnxPipeline(out).generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=3).tokens) == 3


def _precision_table_script():
    from cspkv.bench import precision_table

    return precision_table


def test_precision_task_table_reports_the_worst_loss_against_fp32_at_the_same_budget():
    table = _precision_table_script()

    def row(budget, precision, scores):
        items = [{"task": task, "score": s, "tokens": [1]} for task, values in scores.items() for s in values]
        return {"budget": budget, "precision": precision, "items": items}

    rows = [row(1.0, "fp32", {"a": [1, 1], "b": [0, 1]}), row(1.0, "int8-u8s8", {"a": [1, 0], "b": [1, 1]}),
            # budget 0.2's fp32 is worse than 1.0's int8: a loss must only be taken within one budget
            row(0.2, "fp32", {"a": [0, 0], "b": [0, 0]}), row(0.2, "int8-u8s8", {"a": [0, 0], "b": [0, 0]})]
    assert table.per_task(rows[1]) == {"a": 0.5, "b": 1.0}
    lines = table.task_table(rows).splitlines()
    assert lines[0].startswith("| task | 1.0 fp32 | 1.0 int8-u8s8 | 0.2 fp32 | 0.2 int8-u8s8 |")
    assert lines[2] == "| a | 1.000 | 0.500 | 0.000 | 0.000 | +0.500 |"
    assert lines[3] == "| b | 0.500 | 1.000 | 0.000 | 0.000 | +0.000 |"


def test_precision_paired_loss_matches_prompts_by_id_and_brackets_the_mean():
    table = _precision_table_script()

    def row(precision, scores, order=None):
        items = [{"id": f"p{k}", "task": "a", "score": s, "tokens": [1]} for k, s in enumerate(scores)]
        return {"budget": 1.0, "precision": precision, "items": [items[k] for k in (order or range(len(items)))]}

    fp32 = row("fp32", [1, 1, 0, 1, 0.5, 1])
    # the same prompts in another order: a loss taken position by position would be wrong
    int8 = row("int8-u8s8", [1, 0, 0, 1, 1, 1], order=[5, 4, 3, 2, 1, 0])
    loss = table.paired_loss(fp32, int8, "a")
    assert loss["prompts"] == 6 and loss["worse"] == 1 and loss["better"] == 1
    assert loss["loss"] == pytest.approx((1 - 0.5) / 6)
    low, high = loss["ci95"]
    assert low < loss["loss"] < high and -1 <= low and high <= 1
    # identical differences leave no spread; a task the row lacks gives None
    same = table.paired_loss(fp32, row("int8-s8s8", [0.5, 0.5, -0.5, 0.5, 0, 0.5]), "a")
    assert same["ci95"] == pytest.approx([0.5, 0.5]) and same["worse"] == 6
    assert table.paired_loss(fp32, int8, "missing") is None
    lines = table.loss_table([fp32, int8]).splitlines()
    assert lines[2] == "| a | 1.0 | int8-u8s8 | 6 | +8.3 | " + \
        f"[{100 * low:+.1f}, {100 * high:+.1f}] | 1 / 1 |"


def test_precision_tables_only_prints_an_existing_json_and_needs_one(tmp_path, capsys):
    table = _precision_table_script()
    rows = [{"budget": 1.0, "precision": p, "accuracy": s, "decode_ms_median": 1.0, "ttft_s_median": 1.0,
             "graph_bytes": 2**20, "kv_buffer_bytes": 2**20,
             "items": [{"id": "x", "task": "a", "score": s, "tokens": [t]}]}
            for p, s, t in (("fp32", 1.0, 1), ("int8-u8s8", 0.0, 2))]
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit):
        table.main(["--tables-only", "--out", str(out)])
    assert "does not exist" in capsys.readouterr().err
    out.write_text(json.dumps({"rows": rows}))
    assert table.main(["--tables-only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1.0 | int8-u8s8 | 0.000 | 0.00 | 0.00 |" in printed
    assert "| a | 1.0 | int8-u8s8 | 1 | +100.0 | [+100.0, +100.0] | 1 / 0 |" in printed


def test_precision_table_treats_an_int8_export_with_quantized_attention_as_stale():
    table = _precision_table_script()
    graphs = {"vision": {"quantized": True, "activation_matmuls_fp32": 24}, "decode": {"quantized": False}}
    manifest = {"precision": "int8-u8s8", "conversion": {"exclude_module_types": ["down_proj"], "graphs": graphs}}
    assert table.int8_fp32_parts(manifest) == (["down_proj"], ["decode"])
    assert not table.attention_quantized(manifest)
    del graphs["vision"]["activation_matmuls_fp32"]              # written before attention was excluded
    assert table.attention_quantized(manifest)
    assert table.int8_fp32_parts({"precision": "fp32"}) is None and not table.attention_quantized({"precision": "fp32"})


def test_precision_table_resumes_only_rows_of_the_same_weights(tmp_path):
    table = _precision_table_script()
    out = tmp_path / "p.json"
    table.check_resumable({}, "abc", out)                                       # nothing to resume
    table.check_resumable({"rows": [{}], "model_fingerprint": "abc"}, "abc", out)
    with pytest.raises(SystemExit, match="other weights .*fingerprint def, now abc.*drop --resume"):
        table.check_resumable({"rows": [{}], "model_fingerprint": "def"}, "abc", out)
    with pytest.raises(SystemExit, match="not recorded"):                       # written before fingerprints
        table.check_resumable({"rows": [{}]}, "abc", out)
