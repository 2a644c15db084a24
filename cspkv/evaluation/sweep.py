"""The accuracy-against-budget sweep: every policy at every budget, one prefill per prompt.

Pruning happens after prefill and prefill uses the full cache, so one prefill per prompt scores the
keys for every policy at once (each policy keeps only its per-key scores); each (policy, budget)
then prunes and decodes from it. Baselines: the same model with the images blanked (zero
pixel_values, full cache) and the majority answer.

A benchmark is a list of :class:`EvalItem`: how to build the model inputs, how to score a reply,
and its task name. easy-vqa tasks and MileBench task folders both become EvalItems.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from cspkv.data.easyvqa import IMAGE_SIZE
from cspkv.durable import append_line
from cspkv.evaluation import answers, easyvqa_tasks
from cspkv.evaluation import milebench as mb
from cspkv.export.manifest import model_fingerprint
from cspkv.models.prompting import load_images
from cspkv.models.batched_decode import decode_batch
from cspkv.models.llava import LlavaReference, PrunedCache
from cspkv.pruning import get_policy
from cspkv.pruning.spec import parse_policy

FULL = "full"


@dataclass
class EvalItem:
    task: str
    sample_id: str
    build_inputs: Callable[[bool], dict]      # blank_images -> {"input_ids", "pixel_values"}
    score: Callable[[str], float]
    answer: str                               # for the majority baseline
    question_type: str                        # "multi-choice" | "open-ended"
    prompt_key: str = ""                      # prompt_digest(...): a record is reused only for the same key


def prompt_digest(*parts) -> str:
    """Short digest of what makes a prompt (its text, its image ids or paths); a changed prompt
    format then never reuses an earlier sweep's record for the same sample id."""
    import hashlib

    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def easyvqa_items(tasks: list[str], processor, limit: int, split: str = "test") -> list[EvalItem]:
    """The first ``limit`` prompts of each task from the test set or the development split."""
    items = []
    for task in tasks:
        for sample in easyvqa_tasks.eval_samples(task, limit, split):
            def build(blank, sample=sample):
                images = None
                if blank:
                    images = [torch.zeros(IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8).numpy()] * sample.n_images
                return easyvqa_tasks.build_prompt(sample, processor, images=images)

            items.append(EvalItem(task, sample.sample_id, build, lambda reply, s=sample: answers.score(s, reply),
                                  sample.answer, sample.question_type,
                                  prompt_digest(easyvqa_tasks.prompt_text(sample), sample.image_ids)))
    return items


def milebench_items(root, tasks: list[str], processor, limit: int, errors: list[str]) -> list[EvalItem]:
    """MileBench task folders under ``root`` (official layout); bad samples are skipped and
    reported in ``errors`` so the rest of the run continues."""
    from pathlib import Path

    items = []
    size = getattr(processor, "image_size", 224)
    for task in tasks:
        loaded = mb.load_task(Path(root) / task, skip_bad=True)
        errors.extend(str(e) for e in loaded.errors)
        for sample in loaded.samples[:limit]:
            def build(blank, sample=sample):
                images = load_images(sample.image_paths, size)
                if blank:
                    images = [im * 0 for im in images]
                text = sample.prompt.replace(mb.IMAGE_TOKEN, getattr(processor, "image_token", "<image>"))
                return dict(processor(text=text, images=images, return_tensors="pt"))

            def score(reply, sample=sample, kind=mb.scoring_kind(loaded.name, loaded.question_type)):
                pred = {"sample_id": sample.sample_id, "pred_response": reply, "gt_response": sample.answer,
                        "choice_list": sample.choices}
                return float(mb.sample_scores(kind, loaded.name, [pred])[0])

            items.append(EvalItem(task, str(sample.sample_id), build, score, sample.answer, loaded.question_type,
                                  prompt_digest(sample.prompt, tuple(map(str, sample.image_paths)))))
    return items


def majority_score(items: list[EvalItem]) -> float:
    """Accuracy of always giving the most common answer (open-ended: scored by the metric)."""
    if not items:
        return 0.0
    common = Counter(item.answer for item in items).most_common(1)[0][0]
    return sum(item.score(common) for item in items) / len(items)


def same_cache(a: PrunedCache, b: PrunedCache) -> bool:
    """Equal kept positions, keys and values: greedy decoding from either gives the same tokens."""
    return (a.n_entries == b.n_entries and torch.equal(a.positions, b.positions)
            and all(torch.equal(x, y) for x, y in zip(a.keys, b.keys))
            and all(torch.equal(x, y) for x, y in zip(a.values, b.values)))


def evaluate_item(reference: LlavaReference, tokenizer, item: EvalItem, pruning: dict, budgets: list[float],
                  max_new_tokens: int, reuse_identical: bool = True, batched: bool = True,
                  decode_n: dict | None = None, blank: bool = True) -> dict:
    """One prompt's record: every (policy, budget) cell's reply, score and kept fraction, and the
    blanked-image reply (full cache). One full prefill serves every policy and budget.

    With ``reuse_identical`` a cell whose pruned cache equals one already planned (every policy at
    budget 1.0 keeps all of it) takes that cache's reply instead of decoding again: decoding is
    greedy and deterministic. With ``batched`` the distinct caches (and the blanked prompt's) are
    decoded together by ``decode_batch``; otherwise one by one by the reference decoder.
    ``decode_n`` maps a policy key to its decode-time n-softmax (the null slot): those caches are
    decoded one by one by the reference decoder, which has the slot. ``blank=False`` skips the
    blanked-image prompt (its reply and score are then None): tuning runs do not need it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    decode_n = decode_n or {}
    caches: list[PrunedCache] = []
    firsts: list[int] = []
    nulls: list[float] = []

    def plan(first: int, pruned, null: float = 0.0) -> int:
        """Index of the cache whose reply this cell takes (a new one unless an identical exists)."""
        if reuse_identical:
            for index, cache in enumerate(caches):
                if firsts[index] == first and nulls[index] == null and same_cache(cache, pruned):
                    return index
        caches.append(pruned)
        firsts.append(first)
        nulls.append(null)
        return len(caches) - 1

    started = time.perf_counter()
    inputs = item.build_inputs(False)
    # batched or not, the sweep decodes without the ring buffer's re-score: no window mass needed
    prefill = reference.prefill(inputs["input_ids"], inputs.get("pixel_values"), pruning, window_mass=False)
    length = int(prefill.length)
    first = int(prefill.logits[0].argmax())
    planned = {}
    for name in pruning:
        for budget in budgets if name != FULL else [1.0]:
            pruned = reference.prune(prefill, name, budget)
            planned[name, str(budget)] = (plan(first, pruned, decode_n.get(name, 0.0)), pruned.kept_entries / length)
    blank_index = None
    if blank:
        blanked = item.build_inputs(True)
        blank_prefill = reference.prefill(blanked["input_ids"], blanked.get("pixel_values"), {FULL: get_policy(FULL)},
                                          window_mass=False)  # the bare forward
        blank_index = plan(int(blank_prefill.logits[0].argmax()), reference.prune(blank_prefill, FULL, 1.0))
        del blank_prefill
    del prefill  # its full K/V and scores are not needed for decoding
    plain = [i for i, null in enumerate(nulls) if not null]
    tokens: list = [None] * len(caches)
    if batched:
        for index, reply in zip(plain, decode_batch(reference, [caches[i] for i in plain], [firsts[i] for i in plain],
                                                    max_new_tokens, eos_token_id=eos)):
            tokens[index] = reply
    for index, (cache, first, null) in enumerate(zip(caches, firsts, nulls)):
        if tokens[index] is None:
            tokens[index] = reference.decode(cache, first, max_new_tokens, decode_n=null, eos_token_id=eos).tokens
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    cells = {}
    for (name, budget), (index, kept) in planned.items():
        cells.setdefault(name, {})[budget] = {"reply": texts[index], "score": item.score(texts[index]),
                                              "kept_fraction": kept}
    blank_text = texts[blank_index] if blank_index is not None else None
    return {"task": item.task, "sample_id": item.sample_id, "length": length, "cells": cells,
            "blank_reply": blank_text, "blank_score": item.score(blank_text) if blank_text is not None else None,
            "seconds": round(time.perf_counter() - started, 4)}


def paired_ci95(differences: list[float]) -> float | None:
    """Half-width of the normal-approximation 95% interval of the mean of per-prompt differences
    (the same prompts scored two ways); None below two prompts."""
    import statistics

    if len(differences) < 2:
        return None
    return 1.96 * statistics.stdev(differences) / len(differences) ** 0.5


def aggregate(records: list[dict], items: list[EvalItem], policies: list[str], budgets: list[float]) -> dict:
    """Mean score and kept fraction per task, policy and budget, over the records of ``items``."""
    wanted = {(item.task, item.sample_id) for item in items}
    records = [r for r in records if (r["task"], r["sample_id"]) in wanted]
    totals: dict = {}
    blank: dict = {}
    gaps: dict = {}        # per prompt: full cache's score minus the blanked images'
    for record in records:
        for name in policies:
            for budget in budgets if name != FULL else [1.0]:
                cell = record["cells"][name][str(budget)]
                total = totals.setdefault(record["task"], {}).setdefault(name, {}).setdefault(str(budget), [0.0, 0.0, 0])
                total[0] += cell["score"]
                total[1] += cell["kept_fraction"]
                total[2] += 1
        if record.get("blank_score") is None:   # a run without the blanked-image baseline
            continue
        blank.setdefault(record["task"], []).append(record["blank_score"])
        if FULL in policies:
            gaps.setdefault(record["task"], []).append(record["cells"][FULL]["1.0"]["score"] - record["blank_score"])
    done = {(r["task"], r["sample_id"]) for r in records}
    scores = {task: {name: {budget: {"score": s / n, "kept_fraction": k / n} for budget, (s, k, n) in by_budget.items()}
                     for name, by_budget in by_policy.items()} for task, by_policy in totals.items()}
    baselines = {task: {"blank_images": sum(blank[task]) / len(blank[task]) if blank.get(task) else None,
                        "majority": majority_score([i for i in items if i.task == task and (i.task, i.sample_id) in done])}
                 for task in totals}
    for task, values in gaps.items():
        baselines[task]["full_minus_blank_ci95"] = paired_ci95(values)
    return {"scores": scores, "baselines": baselines,
            "prompts_per_task": dict(Counter(r["task"] for r in records)),
            # compute time of every prompt counted, across resumed runs
            "sweep_seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
            "question_types": {item.task: item.question_type for item in items if item.task in totals}}


def read_records(path) -> list[dict]:
    """Records written by an earlier (possibly interrupted) sweep; a torn last line is ignored."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run: that prompt is simply redone
    return records


def interleave(items: list[EvalItem]) -> list[EvalItem]:
    """Round-robin over tasks (each task's order kept), so a sweep cut short covers every task evenly."""
    by_task: dict = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    queues = list(by_task.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


def sweep_setting(fingerprint: str, max_new_tokens: int) -> dict:
    """What a record must match to be reused: the weights (``model_fingerprint``) and decoding."""
    return {"model": fingerprint, "max_new_tokens": max_new_tokens}


def reusable_records(records_path, items: list[EvalItem], policies: list[str], budgets: list[float],
                     setting: dict, blank: bool = False) -> dict:
    """Records in ``records_path`` that a sweep of ``items`` can reuse, by (task, sample_id): same
    ``setting``, same ``prompt_key``, every cell this sweep needs (and, with ``blank``, the
    blanked-image reply). None: an empty dict."""
    if records_path is None:
        return {}

    def reusable(record):  # same weights and decoding, and every cell this sweep needs
        if blank and record.get("blank_score") is None:
            return False
        return all(record.get(k) == v for k, v in setting.items()) and all(
            str(b) in record["cells"].get(name, {}) for name in policies for b in (budgets if name != FULL else [1.0]))

    keys = {(item.task, item.sample_id): item.prompt_key for item in items}
    return {(r["task"], r["sample_id"]): r for r in read_records(records_path)
            if reusable(r) and r.get("prompt_key", "") == keys.get((r["task"], r["sample_id"]))}


def make_record(reference: LlavaReference, tokenizer, item: EvalItem, pruning: dict, budgets: list[float],
                max_new_tokens: int, setting: dict, decode_n: dict | None = None, blank: bool = True) -> dict:
    """The line ``eval_records.jsonl`` holds for one prompt: its evaluation, the setting, its prompt key."""
    return {**evaluate_item(reference, tokenizer, item, pruning, budgets, max_new_tokens, decode_n=decode_n,
                            blank=blank),
            **setting, "prompt_key": item.prompt_key}


def policy_specs(policies: list[str]) -> tuple[dict, dict]:
    """``({key: policy}, {key: decode_n})`` for policy specs (names, or names with settings)."""
    specs = [parse_policy(p) for p in policies]
    return {s.key: s.policy for s in specs}, {s.key: s.decode_n for s in specs if s.decode_n}


def run_sweep(model, processor, items: list[EvalItem], policies: list[str], budgets: list[float],
              max_new_tokens: int = 8, progress: Callable[[str], None] = lambda message: None,
              records_path=None, minutes: float | None = None, blank: bool = True) -> dict:
    """Scores per task, policy and budget (plus kept fractions), and the two baselines.

    With ``records_path`` every prompt's record is appended to that JSON-lines file as soon as it
    is done, and prompts already recorded there (for the same policies and budgets) are not
    redone: an interrupted sweep resumes where it stopped. With ``minutes`` no new prompt is
    started after that much wall time; the result covers the prompts done (``prompts_per_task``).

    A record is reused for the same weights (``model_fingerprint``, which ignores where the model
    was loaded from) and the same ``max_new_tokens``.
    """
    import json

    reference = LlavaReference(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    pruning, decode_n = policy_specs(policies)
    policies = list(pruning)
    setting = sweep_setting(model_fingerprint(model), max_new_tokens)
    done = reusable_records(records_path, items, policies, budgets, setting, blank)
    started = time.perf_counter()
    for index, item in enumerate(interleave(items)):
        if minutes is not None and time.perf_counter() - started > minutes * 60:
            progress(f"[{index + 1}/{len(items)}] time budget of {minutes} min spent: stopping")
            break
        if (item.task, item.sample_id) in done:
            progress(f"[{index + 1}/{len(items)}] {item.task} {item.sample_id} (recorded earlier)")
            continue
        record = make_record(reference, tokenizer, item, pruning, budgets, max_new_tokens, setting, decode_n, blank)
        done[(item.task, item.sample_id)] = record
        if records_path is not None:
            append_line(records_path, json.dumps(record))
        progress(f"[{index + 1}/{len(items)}] {item.task} {item.sample_id} ({record['length']} tokens, "
                 f"{time.perf_counter() - started:.0f}s)")
    result = aggregate(list(done.values()), items, policies, budgets)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def timing_note(result: dict) -> str:
    """This run's wall time and the compute time summed over every record it counts: a resumed run
    that only rewrites the tables takes no time itself, yet its table stands on hours of prompts."""
    prompts = sum(result["prompts_per_task"].values())
    per_prompt = result["sweep_seconds"] / prompts if prompts else 0.0
    return (f"this run {result['wall_seconds']} s; its {prompts} prompts took {result['sweep_seconds']:.0f} s "
            f"in all ({per_prompt:.1f} s a prompt), summed over the records")


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _plus_minus(half_width: float | None) -> str:
    return "" if half_width is None else f" ± {half_width:.3f}"


def overview_table(result: dict, budgets: list[float], policies: list[str]) -> str:
    """Full cache against the two baselines per task, then each policy's mean over tasks per budget."""
    lines = ["| task | type | prompts | full cache | images blanked | majority | full − blanked (± 95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for task, by_policy in result["scores"].items():
        base, full = result["baselines"][task], by_policy.get(FULL, {}).get("1.0")
        if full is None:
            continue
        lines.append(f"| {task} | {result['question_types'][task]} | {result['prompts_per_task'][task]} | "
                     f"{full['score']:.3f} | {_score(base['blank_images'])} | {base['majority']:.3f} | "
                     + ("–" if base["blank_images"] is None else
                        f"{full['score'] - base['blank_images']:+.3f}{_plus_minus(base.get('full_minus_blank_ci95'))}")
                     + " |")
    lines += ["", "Mean over tasks (kept fraction of the prompt's KV entries in brackets):", "",
              "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name in policies:
        cells = []
        for budget in budgets:
            found = [by_policy[name][str(budget)] for by_policy in result["scores"].values()
                     if str(budget) in by_policy.get(name, {})]
            cells.append(f"{sum(c['score'] for c in found) / len(found):.3f} "
                         f"({sum(c['kept_fraction'] for c in found) / len(found):.2f})" if found else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(result: dict, budgets: list[float], policies: list[str]) -> str:
    lines = [overview_table(result, budgets, policies)]
    for task, by_policy in result["scores"].items():
        base = result["baselines"][task]
        lines.append(f"### {task} ({result['question_types'][task]}, {result['prompts_per_task'][task]} prompts; "
                     f"images blanked {_score(base['blank_images'])}, majority {base['majority']:.3f})\n")
        lines.append("| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for name in policies:
            cells = [by_policy.get(name, {}).get(str(b)) for b in budgets]
            lines.append(f"| {name} | " + " | ".join(f"{c['score']:.3f}" if c else "–" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, budgets: list[float], out_dir) -> list[str]:
    """One PNG per task: score against budget, a line per policy (full cache as a level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, by_policy in result["scores"].items():
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for name, by_budget in by_policy.items():
            if name == FULL:   # budget 1.0 only, whichever budgets the others ran at
                axis.axhline(by_budget["1.0"]["score"], color="black", linestyle="--", label="full cache")
                continue
            xs = [b for b in budgets if str(b) in by_budget]
            axis.plot(xs, [by_budget[str(b)]["score"] for b in xs], marker="o", label=name)
        if result["baselines"][task]["blank_images"] is not None:
            axis.axhline(result["baselines"][task]["blank_images"], color="grey", linestyle=":", label="images blanked")
        axis.set_xlabel("budget (fraction of prompt KV kept)")
        axis.set_ylabel("score")
        axis.set_title(task)
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = f"{out_dir}/{task}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
