"""Export the default model at several budgets and compare the runtime with the PyTorch reference.

For each budget: csp-export (timed, file sizes), then one multi-image prompt through the runtime
(ONNX Runtime + the C KV buffer, ring decode slots small enough to overflow) and through the
reference with the same slot count: kept indices per layer and head, max |logit diff| per step,
and whether the greedy tokens are identical. Prints a table and writes JSON.

    python scripts/default_model_parity.py --budgets 1.0,0.5,0.2 --images 4 --out results/default_parity.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="1.0,0.5,0.2")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-prompt", type=int, default=1152)
    parser.add_argument("--decode-slots", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--policy", default="csp")
    parser.add_argument("--work", default="/tmp/cspkv-default-parity")
    parser.add_argument("--out", default="results/default_parity.json")
    args = parser.parse_args()

    from cspkv.export.exporter import ExportPlan, export_model
    from cspkv.models.default_model import load_default_model
    from cspkv.models.llava import LlavaReference
    from cspkv.models.prompting import chat_prompt, demo_images
    from cspkv.pruning import get_policy
    from cspkv.engines.onnx_runtime import OnnxPipeline

    model, processor = load_default_model()
    images = (demo_images() * 4)[: args.images]
    question = "Which image shows the blue circle? Describe every image in one sentence each."
    inputs = processor(text=chat_prompt(processor, question, len(images)), images=images)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        folder = Path(args.work) / f"{args.policy}-{budget}"
        plan = ExportPlan.make(model, args.policy, {}, budget, args.max_prompt, args.decode_slots, 0.0)
        start = time.perf_counter()
        manifest = export_model(model, folder, plan, "default", force=True, processor=processor)
        export_s = time.perf_counter() - start
        pipeline = OnnxPipeline(folder, eviction="ring")
        run = pipeline.generate(ids[0].numpy(), pixels.numpy(), max_new_tokens=args.new_tokens)
        reference = LlavaReference(model)
        prefill = reference.prefill(ids, pixels, {args.policy: get_policy(args.policy)})
        pruned = reference.prune(prefill, args.policy, budget)
        decoded = reference.decode(pruned, int(prefill.logits[0].argmax()), args.new_tokens, eviction="ring",
                                   decode_slots=pipeline.n_slots - pruned.n_entries)
        ref_logits = [prefill.logits[0].numpy()] + [l.numpy() for l in decoded.logits]
        ours, theirs = run.kept, pruned.positions.numpy()
        overlap = [len(set(a) & set(b)) / len(b) for a, b in zip(ours.reshape(-1, ours.shape[-1]),
                                                                   theirs.reshape(-1, theirs.shape[-1]))]
        # where the sets differ, how far apart are the reference's own scores of the swapped keys?
        scores = [prefill.scores[args.policy][layer][0] for layer in range(len(prefill.scores[args.policy]))]
        gaps = []
        for layer in range(ours.shape[0]):
            for head in range(ours.shape[1]):
                only_ours = set(ours[layer, head]) - set(theirs[layer, head])
                only_ref = set(theirs[layer, head]) - set(ours[layer, head])
                if only_ours:
                    # smallest relative gap over the score channels (csp: self, cross): a swap
                    # between keys whose scores agree to float precision is a tie broken by rounding
                    gap = min(abs(float(ch[list(only_ref)].max()) - float(ch[list(only_ours)].min()))
                              / max(float(ch.abs().max()), 1e-30) for ch in scores[layer][head])
                    gaps.append(gap)
        diffs = [float(np.abs(a - b).max()) for a, b in zip(run.logits, ref_logits)]
        rows.append({
            "budget": budget, "prompt_tokens": int(ids.shape[1]), "kept": int(pruned.n_entries),
            "slots": pipeline.n_slots, "decode_slots_free": pipeline.n_slots - pruned.n_entries,
            "ring_overflowed": pipeline.n_slots - pruned.n_entries < args.new_tokens,
            "kept_indices_equal": bool(np.array_equal(run.kept, pruned.positions.numpy())),
            "kept_rows_identical": f"{sum(o == 1.0 for o in overlap)}/{len(overlap)}",
            "kept_overlap_min": round(min(overlap), 5),
            "swapped_score_gap_rel_max": max(gaps) if gaps else 0.0,
            "max_logit_diff_prefill": diffs[0], "max_logit_diff_decode": max(diffs[1:]),
            "tokens_identical": run.tokens == decoded.tokens, "new_tokens": len(run.tokens),
            "export_s": round(export_s, 1), "export_s_per_graph": manifest["export_seconds"],
            "file_mib": {name: round(meta["bytes"] / 2**20, 1) for name, meta in manifest["files"].items()},
            "runtime_ttft_s": round(run.ttft_s, 2), "runtime_decode_ms_median": round(1e3 * float(np.median(run.step_s)), 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "default (SmolLM2-135M 4-bit GGUF dequantised + DINOv2-S + projector)",
                                          "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"{'budget':>6} {'kept':>5} {'slots':>5} {'idx=':>5} {'prefill dlogit':>14} {'decode dlogit':>13} {'tokens=':>7} {'export s':>8}")
    for r in rows:
        print(f"{r['budget']:>6} {r['kept']:>5} {r['slots']:>5} {str(r['kept_indices_equal']):>5} "
              f"{r['max_logit_diff_prefill']:>14.2e} {r['max_logit_diff_decode']:>13.2e} "
              f"{str(r['tokens_identical']):>7} {r['export_s']:>8}")


if __name__ == "__main__":
    main()
