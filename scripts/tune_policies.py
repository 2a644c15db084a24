"""Choose each policy's settings on the development split, then name the rows the test run needs.

    # 1. the grid on development prompts (train-split images; never the test prompts)
    csp-eval --split dev --tasks image_needle,counting,comparison --limit 12 --budgets 0.2,0.1 --no-blank \\
        --policies "$(python scripts/tune_policies.py grid)" --workers 2 --out results/tuning
    # 2. the choice: every setting's development score, the chosen one per policy
    python scripts/tune_policies.py choose results/tuning/eval_records.jsonl --out results/tuning
    # 3. the chosen settings on the test prompts (the untuned rows are the committed sweep's)
    csp-eval --split test ... --policies "$(python scripts/tune_policies.py test-policies results/tuning/choice.json)"

The grid and the rule are :mod:`cspkv.evaluation.tuning`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspkv.evaluation import tuning
from cspkv.evaluation.sweep import read_records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("grid", help="print the grid as one csp-eval --policies value")
    choose = commands.add_parser("choose", help="pick each policy's best setting from development records")
    choose.add_argument("records", nargs="+")
    choose.add_argument("--budgets", default="0.2,0.1")
    choose.add_argument("--out", required=True, help="folder for choice.json and choice.md")
    test = commands.add_parser("test-policies", help="the test run's rows from a choice.json")
    test.add_argument("choice")
    args = parser.parse_args(argv)
    if args.command == "grid":
        print(tuning.grid_policies())
    elif args.command == "choose":
        records = [r for path in args.records for r in read_records(path)]
        if not records:
            raise SystemExit(f"no records in {', '.join(args.records)}: run the grid with csp-eval --split dev first")
        if any(not r["sample_id"].startswith("train-") for r in records):
            raise SystemExit("these records hold test prompts: choose settings on the development split only")
        choice = tuning.choose(records, args.budgets.split(","))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
        table = tuning.choice_table(choice)
        header = (f"Development split: {choice['prompts_per_task']} prompts per task (train-split images); "
                  f"mean score over tasks, then budgets. Chosen settings in bold.\n\n")
        (out / "choice.md").write_text(header + table)
        print(header + table)
    else:
        print(tuning.policies_for_test_run(json.loads(Path(args.choice).read_text())))


if __name__ == "__main__":
    main()
