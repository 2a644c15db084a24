"""Run one benchmark configuration in this (fresh) process and write its result as JSON.

    python -m cspkv.bench.worker SPEC.json RESULT.json

A process per configuration makes peak RSS a property of that configuration alone, and keeps one
runtime's allocator state or thread pool from colouring the next one's timings.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def run(spec: dict) -> dict:
    from cspkv.bench import runners
    from cspkv.bench.machine import peak_rss_bytes, rss_bytes

    threads = spec.get("threads")
    prompt = np.load(spec["prompt"])
    ids, pixels = prompt["ids"], prompt["pixels"]
    kind, new_tokens = spec["kind"], spec["new_tokens"]
    start = time.perf_counter()
    baseline_rss = rss_bytes()
    if kind in ("cspkv", "scaling_cspkv"):
        if kind == "cspkv":
            out = runners.run_cspkv(spec["folder"], ids, pixels, new_tokens, threads)
        else:
            out = {"points": runners.scaling_cspkv(spec["folder"], ids, pixels, new_tokens, spec["every"], threads)}
    elif kind == "ortgenai":        # the language model alone: the prompt's ids, image positions included
        out = runners.run_ortgenai(spec["folder"], ids, new_tokens, threads)
    else:
        import torch                # only the torch runtimes load it, so the others' peak RSS holds none of it

        if threads:
            torch.set_num_threads(threads)
        from cspkv.models.registry import load_model

        model = load_model(spec["model"])[0].float().eval()
        baseline_rss = rss_bytes()
        if kind == "hf_full":
            out = runners.run_hf_full(model, ids, pixels, new_tokens)
        elif kind == "hf_reference":
            out = runners.run_hf_reference(model, ids, pixels, new_tokens, spec["policy"], spec["budget"],
                                           spec["decode_slots"])
        elif kind == "scaling_hf_full":
            out = {"points": runners.scaling_hf_full(model, ids, pixels, new_tokens, spec["every"])}
        else:
            raise ValueError(f"unknown benchmark kind {kind!r}")
    out.update(peak_rss_bytes=peak_rss_bytes(), start_rss_bytes=baseline_rss,
               wall_s=time.perf_counter() - start)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    result = run(spec)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
