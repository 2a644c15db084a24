"""CSP against each other policy on the sweep's records: paired differences with 95% intervals.

Every record scores the same prompt under every policy, so differences are paired per prompt. For
each budget this prints the mean score difference (CSP minus the other policy) over all recorded
prompts (each task weighted by its prompt count), with a normal-approximation 95% interval, and how
many prompts CSP won, tied and lost.

    python scripts/compare_policies.py results/eval_records.jsonl
"""

from __future__ import annotations

import sys

from cspkv.evaluation.sweep import paired_ci95, read_records


def main(path: str = "results/eval_records.jsonl", against: str = "csp") -> None:
    records = read_records(path)
    if not records:
        raise SystemExit(f"no records in {path}: run csp-eval first")
    budgets = [b for b in records[0]["cells"][against] if b != "1.0"]
    others = [name for name in records[0]["cells"] if name not in (against, "full")]
    print(f"{len(records)} prompts; {against} minus each policy, mean over prompts (± 95% CI) [won/tied/lost]")
    print("| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name in others:
        cells = []
        for budget in budgets:
            diffs = [r["cells"][against][budget]["score"] - r["cells"][name][budget]["score"] for r in records]
            won, lost = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            cells.append(f"{sum(diffs) / len(diffs):+.3f} ± {paired_ci95(diffs):.3f} "
                         f"[{won}/{len(diffs) - won - lost}/{lost}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
