"""The runtime: C-owned KV buffer + ONNX Runtime, against the PyTorch reference; memory; bad input."""

import json
import shutil

import numpy as np
import pytest

from cspkv.runtime.manifest import ManifestError
from cspkv.models.tiny import multi_image_prompt
from cspkv.engines.onnx_runtime import OnnxPipeline
from test_export import reference_run

NEW_TOKENS = 64


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("eviction", ["ring", "rescore"])
def test_runtime_equals_reference_with_the_decode_ring_overflowing(models, exports, budget, eviction):
    pipeline = OnnxPipeline(exports("gqa", "csp", budget), eviction=eviction)
    ids, pixels = multi_image_prompt(10, seed=21)               # 227 of 256 prompt tokens
    result = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=NEW_TOKENS)
    pruned, ref_logits, ref_tokens = reference_run(models["gqa"], "csp", budget, ids, pixels,
                                                   pipeline.n_slots, NEW_TOKENS, eviction=eviction)
    assert pipeline.n_slots - pruned.n_entries < NEW_TOKENS      # the decode slots overflowed
    assert result.tokens == ref_tokens
    assert max(float(np.abs(a - b).max()) for a, b in zip(result.logits, ref_logits)) < 1e-4
    assert int(pipeline.buffer.n_valid().max()) <= pipeline.n_slots


def test_runtime_decode_time_n_softmax_null_slot(models, exports):
    pipeline = OnnxPipeline(exports("gqa", "csp", 0.5, decode_n=1.0))
    assert pipeline.n_slots == pipeline.max_keep + 12 + 1
    ids, pixels = multi_image_prompt(10, seed=22)
    result = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=NEW_TOKENS)
    _, ref_logits, ref_tokens = reference_run(models["gqa"], "csp", 0.5, ids, pixels, pipeline.n_slots,
                                              NEW_TOKENS, decode_n=1.0)
    assert result.tokens == ref_tokens
    assert max(float(np.abs(a - b).max()) for a, b in zip(result.logits, ref_logits)) < 1e-4


def test_teacher_forcing_feeds_the_given_tokens(exports):
    pipeline = OnnxPipeline(exports("gqa", "csp", 0.5))
    ids, pixels = multi_image_prompt(4, seed=23)
    greedy = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=12)
    # fed its own choices, teacher forcing is greedy decoding: same logits at every position
    forced = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=50, forced_tokens=greedy.tokens)
    assert forced.tokens == greedy.tokens and len(forced.logits) == 12
    assert max(float(np.abs(a - b).max()) for a, b in zip(forced.logits, greedy.logits)) == 0.0
    # fed another token at step 3, positions 0-3 agree and position 4 on sees the other token
    other = list(greedy.tokens)
    other[3] = (other[3] + 1) % pipeline.manifest["model"]["vocab_size"]
    changed = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=12, forced_tokens=other)
    assert all(np.array_equal(a, b) for a, b in zip(changed.logits[:4], greedy.logits[:4]))
    assert not np.array_equal(changed.logits[4], greedy.logits[4])
    with pytest.raises(ValueError, match="forced_tokens is empty"):
        pipeline.generate(ids[0].numpy(), pixels.numpy(), forced_tokens=[])


def test_onnx_runtime_reads_the_c_buffer_in_place(exports):
    pipeline = OnnxPipeline(exports("gqa", "csp", 0.5))
    # one K and one V block per layer, back to back in the C buffer: layer l, part p at
    # kv_ptr + (2 l + p) * block bytes
    block = pipeline.heads * pipeline.n_slots * pipeline.head_dim * 4
    expected = [pipeline.buffer.kv_ptr + i * block for i in range(2 * pipeline.layers)]
    assert [value.data_ptr() for value in pipeline.engine._kv_values] == expected
    ids, pixels = multi_image_prompt(2, seed=3)
    pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=4)
    assert [value.data_ptr() for value in pipeline.engine._kv_values] == expected   # never rebound or copied


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_soak_ten_thousand_decode_steps_keep_memory_flat(exports):
    pipeline = OnnxPipeline(exports("gqa", "csp", 0.2), eviction="rescore")
    ids, pixels = multi_image_prompt(4, seed=5)
    pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=200, keep_logits=False)  # warm up
    samples = []
    result = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=10_000, keep_logits=False,
                               on_token=lambda token: samples.append(_rss_bytes()) if len(samples) < 10_001 else None)
    assert len(result.tokens) == 10_000
    after_warmup, final = samples[1000], samples[-1]
    assert final - after_warmup < 2 * 2**20, (after_warmup, final)   # < 2 MiB drift over 9,000 steps
    assert pipeline.buffer.nbytes == result.kv_bytes


def test_bad_requests_leave_the_runtime_usable(exports, tmp_path):
    pipeline = OnnxPipeline(exports("gqa", "csp", 0.5))
    too_long, pixels = multi_image_prompt(12)
    with pytest.raises(ValueError, match="at most 256"):
        pipeline.generate(too_long[0].numpy(), pixels.numpy())
    ids, pixels = multi_image_prompt(2)
    with pytest.raises(ValueError, match="resize them to 28x28"):
        pipeline.generate(ids[0].numpy(), pixels[..., :14].numpy())
    with pytest.raises(ValueError, match="shape \\[N, 3, 28, 28\\]"):
        pipeline.generate(ids[0].numpy(), pixels[0].numpy())
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=0)
    result = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=5)
    again = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=5)
    assert len(result.tokens) == 5 and result.tokens == again.tokens    # reset between requests


def test_runtime_refuses_an_export_for_another_abi(exports, tmp_path):
    copy = tmp_path / "other-abi"
    shutil.copytree(exports("gqa", "csp", 0.5), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["runtime_abi"] = 999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="runtime ABI 999.*re-export"):
        OnnxPipeline(copy)
    with pytest.raises(ValueError, match="eviction must be 'ring' or 'rescore'"):
        OnnxPipeline(exports("gqa", "csp", 0.5), eviction="lru")


def test_csp_run_engine_cli(exports):
    from click.testing import CliRunner

    from cspkv.cli.run import main

    runner = CliRunner()
    result = runner.invoke(main, ["--engine", str(exports("gqa", "csp", 0.5)), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "MiB fixed" in result.output
    bad = runner.invoke(main, ["--engine", "/nonexistent"])
    assert bad.exit_code != 0 and "not a folder" in bad.output
