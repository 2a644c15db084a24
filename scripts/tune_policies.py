"""Choose each policy's settings on the development split, then name the rows the test run needs.

    # 1. the grid on development prompts (train-split images; never the test prompts)
    csp-eval --split dev --tasks image_needle,counting,comparison --limit 12 --budgets 0.2,0.1 --no-blank \\
        --policies "$(python scripts/tune_policies.py grid)" --workers 2 --out results/tuning
    # 2. the choice: every setting's development score, the chosen one per policy
    python scripts/tune_policies.py choose results/tuning/eval_records.jsonl --out results/tuning
    # 3. layer-adaptive budgets on top of CSP's and the best baseline's choice, on the same prompts
    csp-eval --split dev ... --policies "$(python scripts/tune_policies.py layer-grid results/tuning/choice.json)" \\
        --out results/tuning/layers
    python scripts/tune_policies.py choose results/tuning/eval_records.jsonl results/tuning/layers/eval_records.jsonl \\
        --layers results/tuning/choice.json --out results/tuning
    # 4. the chosen settings on the test prompts (the untuned rows are the committed sweep's)
    csp-eval --split test ... --policies "$(python scripts/tune_policies.py test-policies results/tuning/choice_layers.json)"

The grid and the rule are :mod:`cspkv.evaluation.tuning`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspkv.evaluation import tuning
from cspkv.evaluation.paired import merge_records


def _read(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _choose(args) -> None:
    records = merge_records(args.records)
    if not records:
        raise SystemExit(f"no records in {', '.join(args.records)}: run the grid with csp-eval --split dev first")
    if any(not r["sample_id"].startswith("train-") for r in records):
        raise SystemExit("these records hold test prompts: choose settings on the development split only")
    grid = tuning.layer_grid(_read(args.layers)) if args.layers else None
    choice = tuning.choose(records, args.budgets.split(","), grid)
    if args.layers:   # the families given no layer trials keep their first choice
        choice["families"] = {**_read(args.layers)["families"], **choice["families"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "choice_layers" if args.layers else "choice"
    header = (f"Development split: {choice['prompts_per_task']} prompts per task (train-split images); "
              f"mean score over tasks, then budgets. Chosen settings in bold.\n\n")
    text = header + tuning.choice_table(choice)
    (out / f"{name}.json").write_text(json.dumps(choice, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("grid", help="print the grid as one csp-eval --policies value")
    layers = commands.add_parser("layer-grid", help="the layer-budget trials on top of a choice.json")
    layers.add_argument("choice")
    choose = commands.add_parser("choose", help="pick each policy's best setting from development records")
    choose.add_argument("records", nargs="+", help="development records (several runs are merged by prompt)")
    choose.add_argument("--budgets", default="0.2,0.1")
    choose.add_argument("--layers", default=None, metavar="CHOICE",
                        help="choose among the layer-budget trials on top of this choice.json instead of the grid")
    choose.add_argument("--out", required=True, help="folder for the choice's .json and .md")
    test = commands.add_parser("test-policies", help="the test run's rows from a choice's .json")
    test.add_argument("choice")
    args = parser.parse_args(argv)
    if args.command == "grid":
        print(tuning.grid_policies())
    elif args.command == "layer-grid":
        # the chosen settings themselves are already in the grid's records
        print(",".join(key for keys in tuning.layer_grid(_read(args.choice)).values() for key in keys[1:]))
    elif args.command == "choose":
        _choose(args)
    else:
        print(tuning.policies_for_test_run(_read(args.choice)))


if __name__ == "__main__":
    main()
