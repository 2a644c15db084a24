"""Re-run recorded sweep prompts and compare every reply with the record.

For checking that a change to the sweep's code path (batched decoding, faster scoring) leaves its
results as they were: takes the first N recorded prompts of each task in
``results/eval_records.jsonl``, re-runs ``sweep.evaluate_item`` on the default model, and prints
per prompt how many of its replies (every policy and budget, and the blanked images) are identical,
each differing pair, and the time against the recorded time.

    python scripts/recheck_sweep_records.py --per-task 1
"""

from __future__ import annotations

import argparse
import time

from cspkv.evaluation import sweep
from cspkv.models.llava import LlavaReference
from cspkv.models.registry import load_model
from cspkv.pruning import get_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="results/eval_records.jsonl")
    parser.add_argument("--per-task", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=112)
    parser.add_argument("--unbatched", action="store_true", help="decode one cache at a time (the reference path)")
    args = parser.parse_args()

    model, processor, _ = load_model("default")
    records = sweep.read_records(args.records)
    if not records:
        raise SystemExit(f"no records in {args.records}: run csp-eval first")
    reference = LlavaReference(model)
    same = total = 0
    seen: dict = {}
    for record in records:
        if seen.get(record["task"], 0) >= args.per_task:
            continue
        seen[record["task"]] = seen.get(record["task"], 0) + 1
        index = int(record["sample_id"].rsplit("-", 1)[1])
        item = next(i for i in sweep.easyvqa_items([record["task"]], processor, index + 1)
                    if i.sample_id == record["sample_id"])
        if item.prompt_key != record.get("prompt_key"):
            raise SystemExit(f"{record['sample_id']}: the prompt changed since it was recorded")
        policies = list(record["cells"])
        budgets = sorted({float(b) for cells in record["cells"].values() for b in cells}, reverse=True)
        started = time.perf_counter()
        new = sweep.evaluate_item(reference, processor.tokenizer, item, {n: get_policy(n) for n in policies},
                                  budgets, args.max_new_tokens, batched=not args.unbatched)
        pairs = [(record["blank_reply"], new["blank_reply"])] + [
            (cell["reply"], new["cells"][name][budget]["reply"])
            for name, cells in record["cells"].items() for budget, cell in cells.items()]
        identical = sum(old == fresh for old, fresh in pairs)
        same, total = same + identical, total + len(pairs)
        print(f"{record['task']} {record['sample_id']} {record['length']} tokens: {identical}/{len(pairs)} identical, "
              f"{time.perf_counter() - started:.0f}s (recorded {record['seconds']:.0f}s)", flush=True)
        for old, fresh in pairs:
            if old != fresh:
                print(f"   recorded: {old}\n   now:      {fresh}")
    print(f"identical replies: {same}/{total}")


if __name__ == "__main__":
    main()
