"""Decode-step latency regression gate that holds on any CPU: a reference built into the same run.

What the runtime adds to a decode step is its own work around the graph: choosing the slots, the
attention bias, binding, writing the new K/V into the C buffer, the mass. The gate times the whole
step (:meth:`OnnxPipeline.step`) against the bare decode graph run on the same bound buffer
(:meth:`OrtEngine.run_decode_graph`), interleaved round by round in one process, so the CPU, its instruction
set, its caches and any load from other processes affect both alike. The statistic is the median
over rounds of (step time / graph time): near 1 when the runtime only does its bookkeeping, well
above when it does something the size of the cache per step. The planted regression
(``copy_cache_each_step``: hand the graph a fresh copy of the whole cache every step) is measured
the same way, and CI requires the limit to separate the two on the machine it runs on.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import numpy as np

from cspkv.bench.machine import cpu_name
from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine
from cspkv.export.exporter import ExportPlan, export_model

# Fail above this overhead ratio. Measured on a 2-core AMD EPYC (AVX2, no VNNI), one thread, five
# runs: the runtime 1.09-1.12 and the planted full-cache copy 1.82-1.95 on an idle machine; 1.10-1.11
# and 1.74-1.95 with a CPU spinner and a memory-copy loop running beside it. The limit sits between,
# near their geometric mean; CI also requires the planted copy to fail it on the machine it runs on.
LIMIT = 1.4
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


def export_small(folder: str | Path) -> None:
    model = small_model()
    plan = ExportPlan.make(model, "csp", {}, 1.0, 1024, 1024, 0.0)
    export_model(model, folder, plan, "latency-check", force=True)


def measure(folder: str | Path, copy_cache_each_step: bool = False, rounds: int = ROUNDS) -> dict:
    """Median over rounds of (full decode step / bare decode graph), one thread."""
    engine = OrtEngine(folder, threads=1, copy_cache_each_step=copy_cache_each_step)
    pipeline = OnnxPipeline(engine)
    ids = np.array([1] + list(range(100, 500)) * 3)[:900]                # text only (99 is the image token)
    pipeline.generate(ids, None, max_new_tokens=4)                      # fill the cache, warm up
    position = len(ids) + 4
    ratios, steps, graphs = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            pipeline.step(7, position)
            position += 1                       # the ring overwrites the oldest generated token
        t1 = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            engine.run_decode_graph()
        t2 = time.perf_counter()
        steps.append((t1 - t0) / STEPS_PER_ROUND)
        graphs.append((t2 - t1) / STEPS_PER_ROUND)
        ratios.append(steps[-1] / graphs[-1])
    return {"ratio": statistics.median(ratios), "step_ms": 1e3 * statistics.median(steps),
            "graph_ms": 1e3 * statistics.median(graphs), "rounds": rounds, "slots": pipeline.n_slots,
            "kv_mib": pipeline.buffer.nbytes / 2**20, "copy_cache_each_step": copy_cache_each_step}


def describe(measured: dict, limit: float = LIMIT) -> str:
    verdict = "PASS" if measured["ratio"] <= limit else "FAIL"
    what = "planted full-cache copy" if measured["copy_cache_each_step"] else "runtime"
    return (f"{what}: step {measured['step_ms']:.3f} ms / bare graph {measured['graph_ms']:.3f} ms = "
            f"{measured['ratio']:.3f} (limit {limit}, margin {limit - measured['ratio']:+.3f}; {measured['rounds']} "
            f"rounds, {measured['slots']} slots, {measured['kv_mib']:.1f} MiB KV): {verdict}")


def gate(runtime: dict, planted: dict | None, limit: float = LIMIT) -> tuple[bool, list[str]]:
    """The runtime must pass; the planted copy, when measured, must fail (else this machine's gate
    could not see the regression it exists for, and that is a failure too)."""
    lines = [f"CPU: {cpu_name()} ({platform.machine()})", describe(runtime, limit)]
    ok = runtime["ratio"] <= limit
    if planted is not None:
        lines.append(describe(planted, limit))
        if planted["ratio"] <= limit:
            ok = False
            lines.append("the planted full-cache copy passes the limit here: the gate cannot see that regression "
                         "on this machine")
    return ok, lines
