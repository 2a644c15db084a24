"""The prefill and decode graphs read one copy of the language model's weights (weights.bin), and the
engine that hands them that copy answers exactly as the graphs loaded on their own."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cspkv.engines.onnx_runtime import OrtEngine
from cspkv.runtime.manifest import TABLE_FILE, WEIGHTS_FILE, ManifestError, file_sha256


def _external(graph: onnx.GraphProto) -> dict:
    """name -> (location, offset, length) of the initializers stored outside the graph file."""
    out = {}
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            out[tensor.name] = (info["location"], int(info["offset"]), int(info["length"]))
    return out


def test_prefill_and_decode_read_each_weight_once_from_one_file(exports):
    folder = exports("gqa", "csp", 0.5)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["weights"] == {"file": WEIGHTS_FILE, "table": TABLE_FILE}
    table = json.loads((folder / TABLE_FILE).read_text())
    graphs = {role: onnx.load(str(folder / f"{role}.onnx"), load_external_data=False).graph
              for role in ("prefill", "decode")}
    refs = {role: _external(graph) for role, graph in graphs.items()}
    for role, ref in refs.items():
        assert ref and {location for location, _, _ in ref.values()} == {WEIGHTS_FILE}
        for name, (_, offset, length) in ref.items():
            assert table[name][:2] == [offset, length], (role, name)
    # every decode weight is a prefill weight: the same name, the same bytes of the one file
    decode_matmul_weights = {n.input[1] for n in graphs["decode"].node if n.op_type == "MatMul"} & set(refs["decode"])
    assert decode_matmul_weights and decode_matmul_weights <= set(refs["prefill"])
    # no tensor is stored twice
    blob = (folder / WEIGHTS_FILE).read_bytes()
    contents = [blob[offset:offset + length] for offset, length, _, _ in table.values()]
    assert len(set(contents)) == len(contents)
    assert set(table) == set(refs["prefill"]) | set(refs["decode"])


def test_the_shared_copy_answers_as_the_graphs_loaded_on_their_own(exports):
    folder = exports("gqa", "csp", 0.5)
    engine = OrtEngine(folder)
    alone = {role: ort.InferenceSession(str(folder / f"{role}.onnx"), providers=["CPUExecutionProvider"])
             for role in ("prefill", "decode")}
    rng = np.random.default_rng(0)
    length = engine.max_prompt - 3
    ids = rng.integers(3, engine.manifest["model"]["vocab_size"] - 1, length)
    modality = np.zeros(length, np.int64)
    shared = engine.prefill(ids, modality, None)
    feed = {"input_ids": np.pad(ids, (0, 3))[None], "image_embeds": np.zeros((1, engine.max_prompt, engine.hidden_size),
                                                                            np.float32),
            "modality": np.zeros((1, engine.max_prompt), np.int64), "valid_length": np.array([length], np.int64)}
    own = dict(zip([o.name for o in alone["prefill"].get_outputs()], alone["prefill"].run(None, feed)))
    for name in ("logits", "kv", "slot_mass"):
        np.testing.assert_allclose(shared[name], own[name], rtol=1e-5, atol=1e-5, err_msg=name)
    kv = rng.standard_normal(engine._kv_shape).astype(np.float32)
    bias = np.zeros_like(engine.bias)
    step = engine.decode(5, length, kv, bias)
    feed = {"token": np.array([[5]], np.int64), "position": np.array([length], np.int64), "bias": bias}
    for layer in range(kv.shape[0]):
        feed[f"past_key_{layer}"], feed[f"past_value_{layer}"] = kv[layer, 0], kv[layer, 1]
    for shared_out, own_out in zip(step, alone["decode"].run(None, feed)):
        np.testing.assert_allclose(shared_out, own_out, rtol=1e-5, atol=1e-5)


def _rehash(work, manifest, name):
    manifest["files"][name] = {"sha256": file_sha256(work / name), "bytes": (work / name).stat().st_size}
    (work / "manifest.json").write_text(json.dumps(manifest))


def test_a_bad_weights_file_or_table_is_refused_in_one_line(exports, tmp_path):
    folder = exports("gqa", "csp", 0.5)
    manifest = json.loads((folder / "manifest.json").read_text())
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    (work / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:-64])        # truncated
    with pytest.raises(ManifestError, match="weights.bin has .* bytes, manifest.json says .* re-run csp-export"):
        OrtEngine(work)
    shutil.copyfile(folder / WEIGHTS_FILE, work / WEIGHTS_FILE)
    table = json.loads((folder / TABLE_FILE).read_text())
    name = next(iter(table))
    (work / TABLE_FILE).write_text(json.dumps({**table, name: [table[name][0] + 1, *table[name][1:]]}))
    with pytest.raises(ManifestError, match="weights.json (has|does not match).* re-run csp-export"):
        OrtEngine(work)
    # a table that was re-hashed by hand still has to fit the file
    size = (work / WEIGHTS_FILE).stat().st_size
    (work / TABLE_FILE).write_text(json.dumps({**table, name: [size, *table[name][1:]]}))
    _rehash(work, json.loads(json.dumps(manifest)), TABLE_FILE)
    with pytest.raises(ManifestError, match=f"{name} .* does not fit weights.bin"):
        OrtEngine(work)
    (work / TABLE_FILE).write_text(json.dumps({**table, name: [0, 4, "complex64", [1]]}))
    _rehash(work, json.loads(json.dumps(manifest)), TABLE_FILE)
    with pytest.raises(ManifestError, match=r"expected \[offset, bytes, dtype, shape\]"):
        OrtEngine(work)
