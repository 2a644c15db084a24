"""One policy against the others on sweep records: paired differences with 95% intervals.

Every record scores the same prompt under every policy, so differences are paired per prompt. For
each budget this prints the mean score difference (``--against`` minus each other policy) over the
prompts that hold both (each task weighted by its prompt count), with a normal-approximation 95%
interval, and how many prompts it won, tied and lost. Several record files are merged by prompt
(same weights, decoding and prompt text), so a tuned setting run later compares with the committed
sweep's cells of the same prompts.

    python scripts/compare_policies.py results/eval_records.jsonl
    python scripts/compare_policies.py results/eval_records.jsonl results/tuned/eval_records.jsonl \\
        --against "csp(recent_cap=0.5)" --tasks image_needle,counting,comparison --budgets 0.2,0.1
"""

from __future__ import annotations

import argparse

from cspkv.evaluation.paired import merge_records, standing_table
from cspkv.pruning.spec import parse_policy, split_specs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="*", default=["results/eval_records.jsonl"])
    parser.add_argument("--against", default="csp", help="the policy (key) compared with every other")
    parser.add_argument("--policies", default=None, help="comma-separated keys to compare with (default: all)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    parser.add_argument("--budgets", default=None, help="comma-separated budgets (default: all but 1.0)")
    args = parser.parse_args(argv)
    records = merge_records(args.records)
    if not records:
        raise SystemExit(f"no records in {', '.join(args.records)}: run csp-eval first")
    tasks = set(args.tasks.split(",")) if args.tasks else None
    against = parse_policy(args.against).key                  # settings in the records' order
    budgets = args.budgets.split(",") if args.budgets else sorted(
        {b for r in records for b in r["cells"].get(against, {}) if b != "1.0"}, reverse=True)
    others = ([parse_policy(p).key for p in split_specs(args.policies)] if args.policies else
              sorted({n for r in records for n in r["cells"]} - {against, "full"}))
    counted = [r for r in records if tasks is None or r["task"] in tasks]
    print(f"{len(counted)} prompts; {against} minus each policy, mean over prompts (± 95% CI) [won/tied/lost]")
    print(standing_table(counted, against, others, budgets))


if __name__ == "__main__":
    main()
