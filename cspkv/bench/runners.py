"""One benchmark configuration per function: the cspkv runtime on ONNX Runtime, transformers' own
``generate`` with the full cache, transformers with the cspkv PyTorch reference pruning, and
onnxruntime-genai's Generator on the language model (its folders: :mod:`cspkv.bench.ortgenai`).
(kvpress runs in its own environment: scripts/bench_kvpress.py.)

Each returns the raw timings (TTFT, every decode step) and the K/V bytes held after the last
token; :mod:`cspkv.bench.worker` runs one of them in a fresh process so peak RSS is its own. Each
runner imports what it runs inside the function, so a worker process loads only its own runtime.
"""

from __future__ import annotations

import time

import numpy as np


def _result(ttft_s: float, step_s: list[float], kv_bytes: int, **extra) -> dict:
    return {"ttft_ms": 1e3 * ttft_s, "step_ms": [1e3 * s for s in step_s], "kv_bytes": int(kv_bytes), **extra}


def kv_bytes_per_token(config, element_bytes: int = 4) -> int:
    """K and V of one position across every layer and KV head."""
    from cspkv.models.static_llama import DecoderShape

    shape = DecoderShape(config)
    return shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim * element_bytes


def run_cspkv(folder: str, ids: np.ndarray, pixels: np.ndarray, new_tokens: int, threads: int | None = None,
              on_token=None) -> dict:
    """The fixed-budget runtime: OrtEngine (CPU provider) + the C ring buffer."""
    from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine

    pipeline = OnnxPipeline(OrtEngine(folder, threads=threads))
    result = pipeline.generate(ids, pixels, max_new_tokens=new_tokens, keep_logits=False, on_token=on_token)
    return _result(result.ttft_s, result.step_s, result.kv_bytes, tokens=len(result.tokens),
                   slots=pipeline.n_slots, kv_dtype=str(pipeline.buffer.dtype), vision_ms=1e3 * result.vision_s)


def run_ortgenai(model_dir: str, ids: np.ndarray, new_tokens: int, threads: int | None = None) -> dict:
    """onnxruntime-genai's Generator (CPU, greedy, exactly ``new_tokens`` tokens) on a folder its model
    builder wrote. Its K/V is one static buffer per layer of max_length = prompt + new tokens positions
    (past_present_share_buffer), allocated before prefill; kv_bytes is that buffer's size."""
    import json

    import onnxruntime_genai as og

    config = og.Config(model_dir)
    config.clear_providers()                                     # the CPU provider
    if threads:
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    total = len(ids) + new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    generator = og.Generator(model, params)
    stamps = [time.perf_counter()]
    generator.append_tokens(ids[None].astype(np.int32))          # prefill
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()                          # the first picks from prefill's logits
        tokens.append(int(generator.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    with open(f"{model_dir}/genai_config.json") as f:
        decoder = json.load(f)["model"]["decoder"]
    buffer = generator.get_input(decoder["inputs"]["past_key_names"] % 0)   # [1, kv heads, max_length, head dim]
    kv_bytes = decoder["num_hidden_layers"] * 2 * buffer.nbytes
    return _result(stamps[1] - stamps[0], list(np.diff(stamps[1:])), kv_bytes, tokens=len(tokens),
                   token_ids=tokens, max_length=int(buffer.shape[2]), kv_dtype=str(buffer.dtype),
                   ortgenai_version=og.__version__)


class _StepClock:
    """A logits processor that only notes the time: generate calls it once per new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def run_hf_full(model, ids: np.ndarray, pixels: np.ndarray, new_tokens: int) -> dict:
    """transformers' own generate (greedy, its default dynamic cache: the full cache)."""
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock()
    input_ids = torch.from_numpy(ids)[None]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pixel_values=torch.from_numpy(pixels) if len(pixels) else None,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]))
    generated = out.shape[1] - input_ids.shape[1]
    stamps = clock.stamps
    held = (len(ids) + generated - 1) * kv_bytes_per_token(model.config.text_config)
    return _result(stamps[0] - start, list(np.diff(stamps)), held, tokens=generated)


def run_hf_reference(model, ids: np.ndarray, pixels: np.ndarray, new_tokens: int, policy: str,
                     budget: float, decode_slots: int) -> dict:
    """transformers prefill + the cspkv PyTorch reference pruning + its slot-buffer decode (ring)."""
    import torch

    from cspkv.models.llava import LlavaReference
    from cspkv.pruning import get_policy

    reference = LlavaReference(model)
    start = time.perf_counter()
    with torch.no_grad():
        prefill = reference.prefill(torch.from_numpy(ids)[None],
                                    torch.from_numpy(pixels) if len(pixels) else None,
                                    {policy: get_policy(policy)})
        pruned = reference.prune(prefill, policy, budget)
        first = int(prefill.logits[0].argmax())
        ttft = time.perf_counter() - start
        decoded = reference.decode(pruned, first, new_tokens, eviction="ring", decode_slots=decode_slots)
    held = decoded.slots * kv_bytes_per_token(model.config.text_config)
    return _result(ttft, decoded.step_s, held, tokens=len(decoded.tokens), slots=decoded.slots)


def scaling_hf_full(model, ids: np.ndarray, pixels: np.ndarray, new_tokens: int, every: int) -> list[dict]:
    """Greedy decoding with transformers' dynamic (full) cache, sampled every ``every`` tokens:
    decode latency (median over the last ``every`` steps), K/V bytes held, RSS."""
    import torch

    from cspkv.bench.machine import rss_bytes

    per_token = kv_bytes_per_token(model.config.text_config)
    points, window = [], []
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids)[None], use_cache=True,
                    pixel_values=torch.from_numpy(pixels) if len(pixels) else None)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(1, new_tokens):
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True)   # transformers 5.24 name
            token = out.logits[:, -1:].argmax(-1)
            window.append(time.perf_counter() - start)
            if step % every == 0:
                points.append({"generated": step, "step_ms": 1e3 * float(np.median(window)),
                               "kv_bytes": (len(ids) + step) * per_token, "rss_bytes": rss_bytes()})
                window = []
    return points


def scaling_cspkv(folder: str, ids: np.ndarray, pixels: np.ndarray, new_tokens: int, every: int,
                  threads: int | None = None) -> list[dict]:
    """The same sampling over the fixed-budget runtime (the ring buffer keeps its size)."""
    from cspkv.bench.machine import rss_bytes
    from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine

    pipeline = OnnxPipeline(OrtEngine(folder, threads=threads))
    points, last = [], [time.perf_counter(), 0]
    window: list[float] = []

    def on_token(_token):
        now = time.perf_counter()
        last[1] += 1
        if last[1] > 1:
            window.append(now - last[0])
        last[0] = now
        step = last[1] - 1
        if step and step % every == 0:
            points.append({"generated": step, "step_ms": 1e3 * float(np.median(window)),
                           "kv_bytes": pipeline.buffer.nbytes, "rss_bytes": rss_bytes()})
            window.clear()

    pipeline.generate(ids, pixels, max_new_tokens=new_tokens, keep_logits=False, on_token=on_token)
    return points
