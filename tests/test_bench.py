"""csp-bench on the tiny model: prompts of exact length, every runtime's row, ratios and floors, the
report, and bad arguments. (Timings themselves are not asserted: they are benchmark output.)"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cspkv.bench import machine, report
from cspkv.bench.runners import kv_bytes_per_token
from cspkv.bench.suite import BenchConfig, WEIGHT_BYTES, run_bench, to_json, weight_elements
from cspkv.bench.workload import bench_prompt, images_for
from cspkv.models.tiny import IMAGE_TOKEN, tiny_llava


@pytest.mark.parametrize("length", [64, 100, 1100])
def test_bench_prompt_has_the_exact_length_and_its_images(length):
    model = tiny_llava()
    ids, pixels = bench_prompt(model, None, length)
    assert ids.dtype == np.int64 and ids.shape == (length,)
    assert len(pixels) == images_for(length)
    assert int((ids == IMAGE_TOKEN).sum()) == 16 * len(pixels)      # 16 tokens per tiny image


def test_bench_prompt_too_short_for_its_images_says_so():
    with pytest.raises(ValueError, match="cannot hold"):
        bench_prompt(tiny_llava(), None, 10)


def test_copy_bandwidth_is_a_plausible_rate():
    bw = machine.copy_bandwidth(megabytes=32, repeats=3)
    assert 0.1 < bw["gb_per_s"] < 10_000


def test_peak_rss_is_this_process_and_at_least_current():
    assert machine.peak_rss_bytes() >= machine.rss_bytes() > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = BenchConfig(model="tiny", lengths=(96,), budgets=(1.0, 0.5), precisions=("fp32",),
                         new_tokens=6, decode_slots=6, scaling_tokens=24, scaling_every=8, scaling_length=96,
                         peers=("hf_full", "hf_reference"),
                         exports_dir=str(tmp_path_factory.mktemp("bench-exports")))
    return run_bench(config, progress=lambda message: None)


def test_every_runtime_has_a_row_with_its_measurements(tiny_run):
    runtimes = {(r["runtime"], r["budget"]) for r in tiny_run.rows}
    assert runtimes == {("transformers full", 1.0), ("transformers+cspkv ref", 1.0), ("cspkv ort", 1.0),
                        ("transformers+cspkv ref", 0.5), ("cspkv ort", 0.5)}
    assert not tiny_run.notes
    for row in tiny_run.rows:
        assert row["steps"] == 5                      # new_tokens - 1 decode steps
        assert row["step_p90_ms"] >= row["step_median_ms"] > 0 and row["ttft_ms"] > 0
        assert row["peak_rss_bytes"] > 50 * 2**20
        if row["runtime"] == "cspkv ort":          # its TTFT includes the vision graph, reported apart
            assert 0 < row["vision_ms"] < row["ttft_ms"]
        else:
            assert row["vision_ms"] is None


def test_kv_bytes_are_what_each_runtime_holds(tiny_run):
    model = tiny_llava()
    per_token = kv_bytes_per_token(model.config.text_config)
    rows = {(r["runtime"], r["budget"]): r for r in tiny_run.rows}
    # transformers' cache holds every prompt token and all but the last generated one
    assert rows["transformers full", 1.0]["kv_bytes"] == (96 + 5) * per_token
    # the C buffer and the reference hold ceil(b * 96) prompt slots plus 6 decode slots
    for budget, kept in ((1.0, 96), (0.5, 48)):
        assert rows["cspkv ort", budget]["kv_bytes"] == (kept + 6) * per_token
        assert rows["transformers+cspkv ref", budget]["kv_bytes"] == (kept + 6) * per_token


def test_floor_and_ratios_follow_their_definitions(tiny_run):
    result = to_json(tiny_run, "csp-bench --model tiny")
    elements = weight_elements(tiny_llava())
    gbps = tiny_run.bandwidth["gb_per_s"]
    full = next(r for r in result["rows"] if r["runtime"] == "transformers full")
    assert full["step_vs_hf_full"] == 1.0
    for row in result["rows"]:
        floor = 1e3 * (elements * WEIGHT_BYTES[row["precision"]] + row["kv_bytes"]) / (gbps * 1e9)
        assert row["floor_ms"] == pytest.approx(floor)
        assert row["x_floor"] == pytest.approx(row["step_median_ms"] / floor)
        assert row["step_vs_hf_full"] == pytest.approx(row["step_median_ms"] / full["step_median_ms"])


def test_scaling_keeps_the_fixed_budget_flat_and_the_full_cache_growing(tiny_run):
    ours, theirs = tiny_run.scaling["cspkv ort"], tiny_run.scaling["transformers full"]
    assert [p["generated"] for p in ours] == [p["generated"] for p in theirs] == [8, 16]
    assert len({p["kv_bytes"] for p in ours}) == 1
    assert theirs[1]["kv_bytes"] - theirs[0]["kv_bytes"] == 8 * kv_bytes_per_token(tiny_llava().config.text_config)


def test_report_writes_table_json_and_plots(tiny_run, tmp_path):
    files = report.write(to_json(tiny_run, "csp-bench --model tiny"), tmp_path)
    table = files["markdown"].read_text()
    assert table.count("| cspkv ort | 96 |") == 2 and "Copy bandwidth" in table
    assert json.loads(files["json"].read_text())["command"] == "csp-bench --model tiny"
    for name in ("bench_scaling", "bench_latency"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--budgets", "1.5"], "budgets must be in (0, 1]"),
    (["--precisions", "int2"], "unknown precision 'int2'"),
    (["--lengths", "1k"], "comma-separated integers"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["--peers", "hf_full,vllm"], "unknown peer 'vllm'"),
])
def test_bad_arguments_are_refused_before_any_work(args, message, tmp_path):
    from cspkv.cli.bench import main

    # --out and --exports-dir in tmp_path: an argument that is wrongly accepted must not overwrite results/
    result = CliRunner().invoke(main, ["--model", "tiny", "--out", str(tmp_path), "--exports-dir", str(tmp_path),
                                       *args])
    assert result.exit_code != 0 and message in result.output


def _measured(ratio, planted=False):
    return {"ratio": ratio, "step_ms": 4.0 * ratio, "graph_ms": 4.0, "rounds": 30, "slots": 2048, "kv_mib": 16.0,
            "copy_cache_each_step": planted}


def test_latency_gate_needs_the_runtime_under_and_the_planted_copy_over_its_limit():
    from cspkv.bench.regression import LIMIT, gate

    ok, lines = gate(_measured(1.1), _measured(1.9, planted=True))
    assert ok and lines[0].startswith("CPU: ") and "margin +0.300" in lines[1] and lines[2].endswith("FAIL")
    ok, lines = gate(_measured(LIMIT + 0.01), _measured(1.9, planted=True))
    assert not ok and lines[1].endswith("FAIL")
    ok, lines = gate(_measured(1.1), _measured(LIMIT - 0.01, planted=True))     # blind to its own regression
    assert not ok and "cannot see that regression" in lines[-1]
    assert gate(_measured(1.1), None)[0]


def test_pipeline_step_with_the_planted_copy_gives_the_same_logits(exports):
    """The planted variant is slower, not different: the gate compares equal work."""
    from cspkv.models.tiny import multi_image_prompt
    from cspkv.engines.onnx_runtime import OnnxPipeline

    ids, pixels = multi_image_prompt(3, seed=1)
    plain = OnnxPipeline(exports("gqa", "csp", 0.5)).generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=6)
    copied = OnnxPipeline(exports("gqa", "csp", 0.5), copy_cache_each_step=True).generate(
        ids[0].numpy(), pixels.numpy(), max_new_tokens=6)
    assert plain.tokens == copied.tokens
    assert all(np.array_equal(a, b) for a, b in zip(plain.logits, copied.logits))


def test_cached_exports_are_reused_only_when_made_by_this_code(exports, tmp_path):
    """csp-bench's export cache: a folder whose graphs were traced by other code is rebuilt, never
    measured as if it were this code's."""
    import shutil

    from cspkv.bench.suite import Exports
    from cspkv.runtime.manifest import MANIFEST_NAME

    cache = Exports(None, "tiny", None, tmp_path / "cache", BenchConfig(model="tiny"), progress=lambda m: None)
    folder = tmp_path / "export"
    shutil.copytree(exports("gqa", "csp", 0.5), folder)
    assert cache._usable(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["graph_code"] = "0" * 64
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not cache._usable(folder)
