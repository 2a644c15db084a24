"""onnxruntime-genai as a csp-bench peer, on the tiny model: its builder's folder from the model's own
language model, its greedy tokens against transformers' on the same ids, the static K/V buffer it
reports, its rows in the suite (fresh worker processes), and a skipped row when it is not installed."""

import importlib.metadata

import pytest
import torch

from cspkv.bench import ortgenai
from cspkv.bench.runners import kv_bytes_per_token, run_ortgenai
from cspkv.bench.suite import BenchConfig, run_bench, to_json, weight_elements
from cspkv.bench.workload import bench_prompt
from cspkv.models.tiny import IMAGE_TOKEN, tiny_llava

LENGTH, NEW = 96, 8
MISSING = ortgenai.missing_reason()
needs_peer = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def peer_models(tmp_path_factory):
    model = tiny_llava().float().eval()
    return model, ortgenai.OrtGenaiModels(model, None, "tiny", tmp_path_factory.mktemp("ortgenai"),
                                          progress=lambda message: None)


@needs_peer
def test_fp32_peer_decodes_the_same_greedy_tokens_as_transformers(peer_models):
    model, folders = peer_models
    ids, _ = bench_prompt(model, None, LENGTH)
    assert (ids == IMAGE_TOKEN).any()          # image positions go in as their id, like any other token
    out = run_ortgenai(str(folders.folder("fp32")), ids, NEW, threads=1)
    with torch.no_grad():                       # the LLaVA model itself, on ids alone (no pixels)
        expected = model.generate(input_ids=torch.from_numpy(ids)[None], max_new_tokens=NEW, min_new_tokens=NEW,
                                  do_sample=False)[0, LENGTH:].tolist()
    assert out["token_ids"] == expected
    assert out["tokens"] == NEW and len(out["step_ms"]) == NEW - 1 and out["ttft_ms"] > 0
    # one static buffer per layer, K and V, of prompt + new tokens positions, fp32
    assert out["max_length"] == LENGTH + NEW and out["kv_dtype"] == "float32"
    assert out["kv_bytes"] == (LENGTH + NEW) * kv_bytes_per_token(model.config.text_config)


@needs_peer
def test_int4_peer_holds_fewer_weight_bytes_and_still_runs(peer_models):
    model, folders = peer_models
    fp32, int4 = folders.folder("fp32"), folders.folder("int4")
    size = {f: sum(p.stat().st_size for p in f.glob("model.onnx*")) for f in (fp32, int4)}
    assert size[int4] < 0.5 * size[fp32]
    ids, _ = bench_prompt(model, None, LENGTH)
    out = run_ortgenai(str(int4), ids, NEW, threads=1)
    assert out["tokens"] == NEW and out["kv_bytes"] == (LENGTH + NEW) * kv_bytes_per_token(model.config.text_config)


@needs_peer
def test_folders_are_cached_by_weights(peer_models):
    model, folders = peer_models
    again = ortgenai.OrtGenaiModels(model, None, "tiny", folders.base.parent, progress=lambda m: None)
    assert again.folder("fp32") == folders.folder("fp32")
    other = tiny_llava(seed=1)
    assert ortgenai.weights_key(other) != ortgenai.weights_key(model)


@needs_peer
def test_suite_rows_for_both_precisions_with_their_floors(peer_models):
    _, folders = peer_models                    # the same weights: the suite reuses the fixture's folders
    config = BenchConfig(model="tiny", lengths=(LENGTH,), budgets=(1.0,), precisions=(), new_tokens=NEW,
                         scaling_tokens=0, peers=("ortgenai",), threads=1, exports_dir=str(folders.base.parent))
    run = run_bench(config, progress=lambda message: None)
    result = to_json(run, "csp-bench --model tiny --peers ortgenai")
    rows = {r["runtime"]: r for r in result["rows"]}
    assert set(rows) == {"onnxruntime-genai fp32", "onnxruntime-genai int4"} and not run.notes
    per_token = kv_bytes_per_token(tiny_llava().config.text_config)
    elements = weight_elements(tiny_llava())
    for precision in ("fp32", "int4"):
        row = rows[f"onnxruntime-genai {precision}"]
        assert row["precision"] == precision and row["steps"] == NEW - 1 and row["peak_rss_bytes"] > 0
        assert row["kv_bytes"] == (LENGTH + NEW) * per_token
        assert row["version"] == importlib.metadata.version("onnxruntime-genai")
        floor_bytes = elements * ortgenai.WEIGHT_BYTES[precision] + row["kv_bytes"]
        floor = 1e3 * floor_bytes / (run.bandwidth["gb_per_s"] * 1e9)
        assert row["floor_ms"] == pytest.approx(floor)


def test_a_missing_peer_is_a_skipped_row_with_its_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(ortgenai, "missing_reason", lambda: "onnxruntime-genai is not installed: pip install it")
    config = BenchConfig(model="tiny", lengths=(64,), budgets=(1.0,), precisions=(), new_tokens=4,
                         scaling_tokens=0, peers=("ortgenai",), exports_dir=str(tmp_path))
    result = to_json(run_bench(config, progress=lambda message: None), "csp-bench")
    assert result["rows"] == []
    assert result["notes"] == ["onnxruntime-genai not run: onnxruntime-genai is not installed: pip install it"]


def test_missing_reason_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    reason = ortgenai.missing_reason()
    assert reason.startswith("onnxruntime-genai is not installed") and "pip install" in reason
