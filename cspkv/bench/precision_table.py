"""Accuracy, decode latency and size of an export at each KV budget and precision (ONNX Runtime, CPU).

    python scripts/precision_table.py                       # default model, budgets 1.0/0.5/0.2
    python scripts/precision_table.py --model tiny --n-per-task 2 --max-prompt 256 --out /tmp/p.json

For every budget: export fp32 once (reused from --work when the plan matches), convert it to each
precision (fp16, int8-u8s8, int8-s8s8 calibrated on the easy-VQA TRAIN split and cached, int4), then run the
easy-VQA benchmark's TEST prompts through OnnxPipeline and score them with answers.score.
Prompt selection: for each task, the first --n-per-task prompts of test_samples(task) whose token
count is <= --max-prompt (the same prompts for every budget and precision; the chosen sample ids are in
the JSON). The tiny model has no benchmark: its rows give agreement with fp32 only (synthetic prompts).

Reported per (budget, precision): accuracy (mean score: MC accuracy, ROUGE-L for describe), agreement
with fp32 (same first generated token -- the answer letter of a multiple-choice prompt -- and
identical generated tokens), median per-step decode latency, median TTFT, graph bytes, and
KV buffer bytes. Prints Markdown tables (the rows; accuracy per task; each task's paired loss against fp32
with a 95% bootstrap interval) and writes JSON (after every row, so --resume continues);
--tables-only prints the tables of an existing JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cspkv.durable import write_atomic
from cspkv.engines.onnx_runtime import OnnxPipeline, OrtEngine
from cspkv.evaluation import answers
from cspkv.evaluation import easyvqa_tasks as tasks
from cspkv.export.exporter import ExportPlan, export_model, load_processor
from cspkv.export.manifest import model_fingerprint, traced_by_this_code
from cspkv.models.registry import load_model
from cspkv.models.tiny import multi_image_prompt
from cspkv.quantize.convert import convert_export
from cspkv.quantize.int8 import INT8_FLAVOUR_FP32_TYPES, INT8_FP32_GRAPHS
from cspkv.runtime.manifest import ManifestError, read_manifest

PRECISIONS = ("fp32", "fp16", "int8-u8s8", "int8-s8s8", "int4")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fp32_export(model_name, budget, args, work: Path) -> Path:
    folder = work / f"budget-{budget}-fp32"
    if not hasattr(fp32_export, "model"):  # loaded and hashed once, for every budget
        fp32_export.model = load_model(model_name)
        fp32_export.fingerprint = model_fingerprint(fp32_export.model[0])
    net, processor, model_id = fp32_export.model
    try:
        manifest = read_manifest(folder, verify_hashes=False)
        plan = manifest["plan"]
        # Same plan, same weights and same graph code: an export of weights since retrained, or
        # one traced by other code, is never reused.
        if (plan["budget"], plan["max_prompt"], plan["decode_slots"]) == (budget, args.max_prompt, args.decode_slots) \
                and manifest["model"]["fingerprint"] == fp32_export.fingerprint \
                and traced_by_this_code(manifest):
            log(f"reusing {folder}")
            return folder
    except (ManifestError, KeyError):
        pass
    plan = ExportPlan.make(net, "csp", {}, budget, args.max_prompt, args.decode_slots, 0.0)
    start = time.perf_counter()
    export_model(net, folder, plan, model_id, force=True, processor=processor, progress=log)
    log(f"exported {folder} in {time.perf_counter() - start:.0f} s")
    return folder


def check_resumable(previous: dict, fingerprint: str, out: Path) -> None:
    """Refuse to add rows to a JSON whose rows came from other weights (or from before the weights'
    fingerprint was recorded): a table mixing two models' rows would compare nothing."""
    if previous.get("rows") and previous.get("model_fingerprint") != fingerprint:
        raise SystemExit(f"{out} holds rows of other weights (model fingerprint "
                         f"{previous.get('model_fingerprint', 'not recorded')}, now {fingerprint}): "
                         "drop --resume or write to another --out")


def int8_fp32_parts(manifest: dict) -> tuple[list[str], list[str]] | None:
    """(projection types, graphs) an int8 export kept fp32, from its manifest; None for another precision."""
    if not manifest.get("precision", "").startswith("int8"):
        return None
    conversion = manifest["conversion"]
    return conversion["exclude_module_types"], sorted(r for r, g in conversion["graphs"].items() if not g["quantized"])


def attention_quantized(manifest: dict) -> bool:
    """An int8 export whose attention MatMuls are quantized too (its manifest has no count of the
    activation MatMuls kept fp32): never reused, as csp-export no longer builds that form."""
    graphs = manifest.get("conversion", {}).get("graphs", {})
    return any(g["quantized"] and "activation_matmuls_fp32" not in g for g in graphs.values())


def converted(fp32: Path, precision: str, work: Path, keep_fp32: list[str] | None = None,
              fp32_graphs: list[str] | None = None) -> Path:
    if precision == "fp32":
        return fp32
    int8 = precision.startswith("int8")
    keep_fp32, fp32_graphs = (keep_fp32, fp32_graphs) if int8 else (None, None)
    suffix = f"-keep-{'+'.join(keep_fp32) or 'none'}" if keep_fp32 is not None else ""
    suffix += f"-fp32-{'+'.join(fp32_graphs) or 'none'}" if fp32_graphs is not None else ""
    folder = work / fp32.name.replace("-fp32", f"-{precision}{suffix}")
    source = read_manifest(fp32, verify_hashes=False)
    try:
        manifest = read_manifest(folder, verify_hashes=False)
        wanted = (list(INT8_FLAVOUR_FP32_TYPES[precision[5:]] if keep_fp32 is None else keep_fp32),
                  sorted(INT8_FP32_GRAPHS if fp32_graphs is None else fp32_graphs)) if int8 else None
        if int8_fp32_parts(manifest) == wanted and not attention_quantized(manifest) and \
                manifest["source"]["files"] == {n: m["sha256"] for n, m in source["files"].items()} \
                and traced_by_this_code(manifest):
            log(f"reusing {folder}")
            return folder
    except (ManifestError, KeyError):
        pass
    start = time.perf_counter()
    convert_export(fp32, folder, precision, force=True, progress=log, keep_fp32_types=keep_fp32,
                   keep_fp32_graphs=fp32_graphs)
    log(f"converted {folder} in {time.perf_counter() - start:.0f} s")
    return folder


def benchmark_prompts(model_name: str, args, fp32: Path):
    """[(id, input_ids, pixel_values, sample or None)]: easy-VQA TEST prompts that fit, or tiny ones."""
    if model_name == "tiny":
        prompts = []
        for i in range(args.n_per_task * 6):
            ids, pixels = multi_image_prompt(1 + i % 6, seed=1000 + i)
            if ids.shape[1] <= args.max_prompt:
                prompts.append((f"tiny-{i}", ids[0].numpy(), pixels.numpy(), None))
        return prompts, None
    processor = load_processor(fp32, read_manifest(fp32, verify_hashes=False))
    prompts = []
    for task in args.tasks or tasks.TASKS:
        kept = 0
        for sample in tasks.test_samples(task):
            inputs = tasks.build_prompt(sample, processor)
            ids = inputs["input_ids"][0].numpy()
            if len(ids) > args.max_prompt:
                continue
            prompts.append((sample.sample_id, ids, inputs["pixel_values"].numpy(), sample))
            kept += 1
            if kept == args.n_per_task:
                break
    return prompts, processor


def run_rows(folder: Path, prompts, processor, args) -> dict:
    pipeline = OnnxPipeline(OrtEngine(folder, threads=args.threads))
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = getattr(tokenizer, "eos_token_id", None)
    steps, ttfts, items = [], [], []
    for prompt_id, ids, pixels, sample in prompts:
        result = pipeline.generate(ids, pixels, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                   keep_logits=False)
        steps += result.step_s
        ttfts.append(result.ttft_s)
        text = tokenizer.decode(result.tokens, skip_special_tokens=True) if tokenizer is not None else None
        item = {"id": prompt_id, "tokens": result.tokens, "prompt_tokens": len(ids), "text": text}
        if sample is not None:
            item["task"] = sample.task
            item["score"] = answers.score(sample, text)
        items.append(item)
    manifest = read_manifest(folder, verify_hashes=False)
    scores = [i["score"] for i in items if "score" in i]
    kept_types, fp32_graphs = int8_fp32_parts(manifest) or (None, None)
    return {"precision": manifest.get("precision", "fp32"), "kv_dtype": manifest.get("kv_dtype", "float32"),
            "int8_keep_fp32_types": kept_types, "int8_fp32_graphs": fp32_graphs,
            "accuracy": float(np.mean(scores)) if scores else None,
            "decode_ms_median": 1e3 * statistics.median(steps) if steps else None,
            "decode_steps": len(steps), "ttft_s_median": statistics.median(ttfts),
            "graph_bytes": sum(m["bytes"] for m in manifest["files"].values()),
            "graph_bytes_each": {n: m["bytes"] for n, m in manifest["files"].items()},
            "kv_buffer_bytes": pipeline.buffer.nbytes, "items": items}


def agreement(row, rows) -> tuple[float | None, float | None]:
    """(first generated token, all generated tokens) identical to the fp32 row of the same budget."""
    reference = next((r for r in rows if r["budget"] == row["budget"] and r["precision"] == "fp32"), None)
    if reference is None or reference is row:
        return None, None
    pairs = list(zip(row["items"], reference["items"]))
    first = float(np.mean([a["tokens"][:1] == b["tokens"][:1] for a, b in pairs]))
    return first, float(np.mean([a["tokens"] == b["tokens"] for a, b in pairs]))


def table(rows) -> str:
    lines = ["| budget | precision | accuracy | 1st token = fp32 | all tokens = fp32 | decode ms/step (median) "
             "| TTFT s (median) | graphs MiB | KV buffer MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        first, every = agreement(row, rows)
        first = "n/a" if first is None else f"{first:.2f}"
        every = "n/a" if every is None else f"{every:.2f}"
        lines.append(f"| {row['budget']} | {row['precision']} | {accuracy} | {first} | {every} | {row['decode_ms_median']:.1f} "
                     f"| {row['ttft_s_median']:.2f} | {row['graph_bytes'] / 2**20:.1f} "
                     f"| {row['kv_buffer_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def per_task(row) -> dict[str, float]:
    """Mean score per benchmark task of one row's items."""
    by_task: dict[str, list[float]] = {}
    for item in row["items"]:
        if "task" in item:
            by_task.setdefault(item["task"], []).append(item["score"])
    return {task: float(np.mean(scores)) for task, scores in by_task.items()}


def task_table(rows) -> str:
    """Accuracy per task (rows) at each budget and precision (columns), as in the evaluation's table;
    the last column is the largest loss of any int8/fp16 cell against fp32 at the same budget."""
    columns = [(r["budget"], r["precision"]) for r in rows]
    cells = {(r["budget"], r["precision"]): per_task(r) for r in rows}
    tasks = sorted({t for c in cells.values() for t in c})
    if not tasks:
        return ""
    lines = ["| task | " + " | ".join(f"{b} {p}" for b, p in columns) + " | worst loss vs fp32 |",
             "|---|" + "---|" * (len(columns) + 1)]
    for task in tasks:
        losses = [cells[budget, "fp32"][task] - cells[budget, precision][task] for budget, precision in columns
                  if precision != "fp32" and (budget, "fp32") in cells and task in cells[budget, precision]]
        worst = f"{max(losses):+.3f}" if losses else "n/a"
        lines.append(f"| {task} | " + " | ".join(f"{cells[c].get(task, float('nan')):.3f}" for c in columns)
                     + f" | {worst} |")
    return "\n".join(lines)


def paired_loss(reference: dict, row: dict, task: str, draws: int = 10_000, seed: int = 0) -> dict | None:
    """fp32 minus ``row`` on one task's prompts, matched by prompt id: the mean loss, a 95% paired
    bootstrap interval of it (seeded), and how many prompts scored lower / higher than fp32.

    A score moves in coarse steps on a few dozen prompts (one describe word is 1/3 of a prompt), so
    a loss near the 2-point bar needs its interval beside it to say whether the bar is really missed.
    """
    fp32 = {i["id"]: i["score"] for i in reference["items"] if i.get("task") == task}
    diffs = np.array([fp32[i["id"]] - i["score"] for i in row["items"] if i.get("task") == task and i["id"] in fp32])
    if diffs.size == 0:
        return None
    means = diffs[np.random.default_rng(seed).integers(0, diffs.size, (draws, diffs.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"prompts": int(diffs.size), "loss": float(diffs.mean()), "ci95": [float(low), float(high)],
            "worse": int((diffs > 0).sum()), "better": int((diffs < 0).sum())}


def loss_table(rows) -> str:
    """Per task, budget and non-fp32 precision: the paired loss against fp32 in points, its 95%
    bootstrap interval and the prompts that got worse / better."""
    fp32 = {r["budget"]: r for r in rows if r["precision"] == "fp32"}
    lines = ["| task | budget | precision | prompts | loss vs fp32 (points) | 95% CI | worse / better |",
             "|---|---|---|---|---|---|---|"]
    for task in sorted({i["task"] for r in rows for i in r["items"] if "task" in i}):
        for row in rows:
            if row["precision"] == "fp32" or row["budget"] not in fp32:
                continue
            loss = paired_loss(fp32[row["budget"]], row, task)
            if loss is not None:
                low, high = (100 * x for x in loss["ci95"])
                lines.append(f"| {task} | {row['budget']} | {row['precision']} | {loss['prompts']} "
                             f"| {100 * loss['loss']:+.1f} | [{low:+.1f}, {high:+.1f}] | {loss['worse']} / {loss['better']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def print_tables(rows) -> None:
    print(table(rows))
    print("\n" + task_table(rows))
    print("\n" + loss_table(rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", choices=["default", "tiny"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.2])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--n-per-task", type=int, default=2, help="test prompts per task (6 tasks)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="benchmark tasks to run (default: all six); e.g. more prompts of one noisy task")
    parser.add_argument("--max-prompt", type=int, default=1536, help="export P_max; longer prompts are skipped")
    parser.add_argument("--decode-slots", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--work", type=Path, default=None, help="export folders (default ~/.cache/cspkv/precision-table/MODEL)")
    parser.add_argument("--out", type=Path, default=Path("results/precision.json"))
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out")
    parser.add_argument("--int8-keep-fp32", nargs="*", default=None, metavar="TYPE",
                        help="decoder projection types the int8 rows keep fp32 (default: the flavour's, down_proj k_proj v_proj, "
                             "and q_proj for s8s8); "
                             "e.g. down_proj")
    parser.add_argument("--int8-fp32-graphs", nargs="*", default=None, metavar="ROLE",
                        help="graphs the int8 rows copy as fp32 (default: the package's, decode); e.g. nothing")
    parser.add_argument("--tables-only", action="store_true",
                        help="print the tables of the rows already in --out and exit (runs nothing)")
    args = parser.parse_args(argv)
    if args.tables_only:
        if not args.out.is_file():
            parser.error(f"--tables-only reads {args.out}, which does not exist: give the JSON with --out")
        print_tables(json.loads(args.out.read_text())["rows"])
        return 0
    if args.tasks and args.model != "tiny":
        unknown = sorted(set(args.tasks) - set(tasks.TASKS))
        if unknown:
            parser.error(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(tasks.TASKS)}")
    if "fp32" not in args.precisions:
        args.precisions = ["fp32", *args.precisions]   # the agreement column needs it
    work = args.work or Path.home() / ".cache" / "cspkv" / "precision-table" / args.model
    work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else {}
    rows = list(previous.get("rows", []))
    done = {(r["budget"], r["precision"]) for r in rows}
    started = time.perf_counter()
    prompts = processor = None
    for budget in args.budgets:
        fp32 = fp32_export(args.model, budget, args, work)
        fingerprint = fp32_export.fingerprint  # the export's weights: reused only when they match
        check_resumable(previous, fingerprint, args.out)
        if prompts is None:
            prompts, processor = benchmark_prompts(args.model, args, fp32)
            log(f"{len(prompts)} prompts, {min(len(p[1]) for p in prompts)}-{max(len(p[1]) for p in prompts)} tokens")
        for precision in args.precisions:
            if (budget, precision) in done:
                continue
            folder = converted(fp32, precision, work, args.int8_keep_fp32, args.int8_fp32_graphs)
            start = time.perf_counter()
            row = {"budget": budget, **run_rows(folder, prompts, processor, args)}
            row["first_token_agreement"], row["agreement"] = agreement(row, rows)
            row["eval_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            log(f"budget {budget} {precision}: accuracy {row['accuracy']}, decode {row['decode_ms_median']:.1f} ms/step "
                f"({row['eval_seconds']} s)")
            payload = {"model": args.model, "model_fingerprint": fingerprint, "selection": {
                "prompts": "easy-VQA test_samples(task) in order, first N per task with <= max_prompt tokens"
                           if args.model != "tiny" else "tiny synthetic multi_image_prompt",
                "n_per_task": args.n_per_task, "tasks": args.tasks or "all", "max_prompt": args.max_prompt,
                "ids": [p[0] for p in prompts]},
                "settings": {"decode_slots": args.decode_slots, "max_new_tokens": args.max_new_tokens,
                             "threads": args.threads, "runtime": "onnxruntime CPUExecutionProvider",
                             "int8_keep_fp32": "package default" if args.int8_keep_fp32 is None else args.int8_keep_fp32,
                             "int8_fp32_graphs": "package default" if args.int8_fp32_graphs is None else args.int8_fp32_graphs},
                "rows": rows, "seconds": round(time.perf_counter() - started, 1) + previous.get("seconds", 0)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.out, json.dumps(payload, indent=1) + "\n")   # a kill leaves the last table
    print_tables(rows)
    print(f"\n{len(prompts)} prompts ({args.n_per_task} per task, <= {args.max_prompt} tokens); JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
