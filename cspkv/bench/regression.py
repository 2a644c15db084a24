"""Decode-step latency regression check, robust to a noisy shared machine.

The runtime's decode step on a small fixed model is timed together with a reference workload (a
fixed float32 matrix product and a memory copy, about as long as a step) in the same process,
interleaved round by round, so load from other processes slows both alike. The statistic is the
median over rounds of (step time / reference time); CI compares it with a committed baseline and
fails when it is more than ``tolerance`` above it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

BASELINE = Path(__file__).with_name("latency_baseline.json")
# Fail above baseline * 1.45. Measured on the 2-core CI machine: the real step's ratio 12.0-16.2
# (16.2 with two other heavy jobs running), the planted full-cache copy 21.6-24.0 under the same
# loads, i.e. the limit sits between them with ~12% and ~19% to spare.
TOLERANCE = 0.45
ROUNDS, STEPS_PER_ROUND = 30, 20


def small_model():
    """A 4-layer LLaVA (hidden 256, 8 KV heads of 32: KV 4 x 2 x 8 x S x 32, 16 MiB at S = 2048)
    whose cache is large against its weights, so a step that copied the cache would show."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    text = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99,
                                                     vision_feature_layer=-1)).eval()


def reference_workload(a: np.ndarray, b: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    np.matmul(a, b)
    np.copyto(dst, src)


def measure(folder: str | Path, copy_cache_each_step: bool = False, rounds: int = ROUNDS) -> dict:
    from cspkv.engines.onnx_runtime import OrtEngine
    from cspkv.runtime.pipeline import OnnxPipeline

    pipeline = OnnxPipeline(OrtEngine(folder, threads=1), copy_cache_each_step=copy_cache_each_step)
    ids = np.array([1] + list(range(100, 500)) * 3)[:900]                # text only (99 is the image token)
    pipeline.generate(ids, None, max_new_tokens=4)                      # fill the cache, warm up
    position = len(ids) + 4
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((192, 192), np.float32), rng.standard_normal((192, 192), np.float32)
    src, dst = rng.standard_normal(1 << 18).astype(np.float32), np.empty(1 << 18, np.float32)
    ratios, steps, refs = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            pipeline._decode(7, position)
        t1 = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            reference_workload(a, b, src, dst)
        t2 = time.perf_counter()
        steps.append((t1 - t0) / STEPS_PER_ROUND)
        refs.append((t2 - t1) / STEPS_PER_ROUND)
        ratios.append(steps[-1] / refs[-1])
    return {"ratio": statistics.median(ratios), "step_ms": 1e3 * statistics.median(steps),
            "reference_ms": 1e3 * statistics.median(refs), "rounds": rounds,
            "slots": pipeline.n_slots, "kv_mib": pipeline.buffer.nbytes / 2**20,
            "copy_cache_each_step": copy_cache_each_step}


def export_small(folder: str | Path) -> None:
    from cspkv.export.exporter import ExportPlan, export_model

    model = small_model()
    plan = ExportPlan.make(model, "csp", {}, 1.0, 1024, 1024, 0.0)
    export_model(model, folder, plan, "latency-check", force=True)


def check(measured: dict, baseline_path: Path = BASELINE, tolerance: float = TOLERANCE) -> tuple[bool, str]:
    baseline = json.loads(baseline_path.read_text())
    limit = baseline["ratio"] * (1 + tolerance)
    ok = measured["ratio"] <= limit
    line = (f"decode step {measured['step_ms']:.3f} ms / reference {measured['reference_ms']:.3f} ms = "
            f"ratio {measured['ratio']:.3f} (baseline {baseline['ratio']:.3f}, limit {limit:.3f}, "
            f"{measured['rounds']} rounds, {measured['slots']} slots, "
            f"{measured['kv_mib']:.1f} MiB KV on {platform.machine()}): {'PASS' if ok else 'FAIL'}")
    return ok, line
