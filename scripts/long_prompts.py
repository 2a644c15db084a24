"""Long prompts on the default model: export at each P_max, readiness, prefill memory, TTFT, parity.

For each length P (the prompt fills P_max exactly: csp-bench's prompt, one easy-vqa image per 512
tokens up to 16, then filler text and the question; at the model's whole context the prompt gets
what the decode slots leave, 8,192 - 64 = 8,128 positions):

* csp-export at P_max = P (fp32, the given budget and policy): export time, file sizes, and the
  TensorRT-readiness check of every graph;
* the runtime in a fresh process (ONNX Runtime, one intra-op thread, the C buffer): RSS before the
  prefill, peak RSS after it (the prefill's peak memory is the difference), TTFT, 64 greedy tokens;
* the PyTorch reference on the same prompt and slots: kept sets per layer and head, max |logit
  difference| over the prefill and every decode step, and whether the greedy tokens are identical.

Prints a table and writes JSON; the slope of prefill memory against P says whether it grows
linearly.

    python scripts/long_prompts.py --lengths 2048,4096,8192 --out results/long_prompts.json
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's maxrss: across exec it keeps
    the forking parent's peak (here the reference process with torch and the model)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(folder: str, prompt: str, out: str, new_tokens: int) -> None:
    """The runtime alone (no torch): prefill + decode, memory and timing."""
    from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine

    data = np.load(prompt)
    pipeline = OnnxPipeline(OrtEngine(folder, threads=1), eviction="ring")
    before = status_mib("VmRSS")
    run = pipeline.generate(data["ids"], data["pixels"], max_new_tokens=new_tokens)
    peak = status_mib("VmHWM")
    np.savez(out, kept=run.kept, logits=np.stack(run.logits), tokens=np.asarray(run.tokens),
             ttft_s=run.ttft_s, step_ms=1e3 * float(np.median(run.step_s)), rss_before=before, rss_peak=peak,
             n_slots=pipeline.n_slots)


def write(args, rows, fit) -> None:
    import torch

    from cspkv.bench.machine import cpu_name

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": cpu_name(), "threads": 1, "policy": args.policy, "budget": args.budget,
        "decode_slots": args.decode_slots, "new_tokens": args.new_tokens, "model": "default",
        "torch": torch.__version__, "prefill_memory_fit": fit, "rows": rows}, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--policy", default="csp")
    parser.add_argument("--decode-slots", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", default="/tmp/cspkv-long-prompts")
    parser.add_argument("--out", default="results/long_prompts.json")
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "PROMPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.new_tokens)

    import torch

    from cspkv.bench.machine import cpu_name
    from cspkv.bench.workload import bench_prompt
    from cspkv.export.exporter import ExportPlan, export_model
    from cspkv.export.readiness import check_export
    from cspkv.models.default_model import load_default_model
    from cspkv.models.llava import LlavaReference
    from cspkv.pruning import get_policy

    torch.set_num_threads(2)
    model, processor = load_default_model()
    work = Path(args.work)
    rows = []
    context = model.config.text_config.max_position_embeddings
    for asked in [int(x) for x in args.lengths.split(",")]:
        # prompt and decode slots share the model's positions: at the whole context the prompt
        # takes what the decode slots leave
        length = min(asked, context - args.decode_slots)
        ids, pixels = bench_prompt(model, processor, length)
        folder = work / f"P{length}"
        plan = ExportPlan.make(model, args.policy, {}, args.budget, length, args.decode_slots, 0.0)
        start = time.perf_counter()
        manifest = export_model(model, folder, plan, "default", force=True, processor=processor)
        export_s = time.perf_counter() - start
        readiness = check_export(folder, manifest)
        prompt = work / f"prompt-{length}.npz"
        np.savez(prompt, ids=ids, pixels=pixels)
        result = work / f"run-{length}.npz"
        subprocess.run([sys.executable, __file__, "--new-tokens", str(args.new_tokens),
                        "--worker", str(folder), str(prompt), str(result)], check=True)
        run = np.load(result)

        reference = LlavaReference(model)
        start = time.perf_counter()
        prefill = reference.prefill(torch.from_numpy(ids)[None], torch.from_numpy(pixels),
                                    {args.policy: get_policy(args.policy)})
        reference_prefill_s = time.perf_counter() - start
        pruned = reference.prune(prefill, args.policy, args.budget)
        decoded = reference.decode(pruned, int(prefill.logits[0].argmax()), args.new_tokens, eviction="ring",
                                   decode_slots=int(run["n_slots"]) - pruned.n_entries)
        ref_logits = np.stack([prefill.logits[0].numpy()] + [l.numpy() for l in decoded.logits])
        ours, theirs = run["kept"], pruned.positions.numpy()
        same_rows = sum(np.array_equal(a, b) for a, b in zip(ours.reshape(-1, ours.shape[-1]),
                                                              theirs.reshape(-1, theirs.shape[-1])))
        diffs = np.abs(run["logits"] - ref_logits).max(axis=-1)
        rows.append({
            "prompt_tokens": int(len(ids)), "images": int(pixels.shape[0]), "p_max": length,
            "kept": int(pruned.n_entries), "slots": int(run["n_slots"]),
            "export_s": round(export_s, 1),
            "file_mib": {name: round(meta["bytes"] / 2**20, 1) for name, meta in manifest["files"].items()},
            "readiness_ok": all(r.ok for r in readiness.values()),
            "readiness_problems": {role: r.problems for role, r in readiness.items() if r.problems},
            "prefill_ops": readiness["prefill"].op_counts,
            "rss_before_prefill_mib": round(float(run["rss_before"]), 1),
            "rss_peak_mib": round(float(run["rss_peak"]), 1),
            "prefill_peak_mib": round(float(run["rss_peak"] - run["rss_before"]), 1),
            "ttft_s": round(float(run["ttft_s"]), 2), "decode_ms_median": round(float(run["step_ms"]), 2),
            "reference_prefill_s": round(reference_prefill_s, 1),
            "kept_rows_identical": f"{same_rows}/{ours.shape[0] * ours.shape[1]}",
            "kept_indices_equal": bool(np.array_equal(ours, theirs)),
            "max_logit_diff_prefill": float(diffs[0]), "max_logit_diff_decode": float(diffs[1:].max()),
            "tokens_identical": run["tokens"].tolist() == decoded.tokens,
            "tokens_equal_prefix": int(next((i for i, (a, b) in enumerate(zip(run["tokens"].tolist(), decoded.tokens))
                                             if a != b), len(decoded.tokens))),
        })
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "prefill_ops"}), flush=True)
        write(args, rows, {})
    lengths = np.array([r["p_max"] for r in rows], dtype=float)
    peaks = np.array([r["prefill_peak_mib"] for r in rows])
    fit = {}
    if len(rows) >= 2:
        linear = np.polyfit(lengths, peaks, 1)
        quadratic = np.polyfit(lengths, peaks, 2) if len(rows) >= 3 else [0.0, *linear]
        fit = {"mib_per_1k_tokens": round(1e3 * float(linear[0]), 1),
               "quadratic_term_mib_per_1k_tokens_sq": round(1e6 * float(quadratic[0]), 2)}
    write(args, rows, fit)
    print(f"CPU: {cpu_name()}; prefill memory fit: {fit}")
    print(f"{'P':>5} {'imgs':>4} {'export s':>8} {'MiB':>6} {'ready':>5} {'prefill MiB':>11} {'peak MiB':>8} "
          f"{'TTFT s':>6} {'step ms':>7} {'kept rows=':>10} {'dlogit':>8} {'tokens=':>7}")
    for r in rows:
        print(f"{r['p_max']:>5} {r['images']:>4} {r['export_s']:>8} {sum(r['file_mib'].values()):>6.0f} "
              f"{str(r['readiness_ok']):>5} {r['prefill_peak_mib']:>11} {r['rss_peak_mib']:>8} {r['ttft_s']:>6} "
              f"{r['decode_ms_median']:>7} {r['kept_rows_identical']:>10} "
              f"{max(r['max_logit_diff_prefill'], r['max_logit_diff_decode']):>8.1e} {str(r['tokens_identical']):>7}")


if __name__ == "__main__":
    main()
