"""Paired comparisons of policies over the same prompts, across one or several sweeps' records.

Every record scores one prompt under several policies, so differences are paired per prompt. Records
of the same prompt from different runs (a tuned setting run later beside the committed sweep) are
merged by (task, sample_id) when they agree on the weights, the decoding and the prompt key, so a
later run need not redo the cells an earlier one holds.
"""

from __future__ import annotations

from cspkv.evaluation.sweep import paired_ci95, read_records

SAME = ("model", "max_new_tokens", "prompt_key")


def merge_records(paths) -> list[dict]:
    """One record per prompt with the cells of every file; a prompt recorded under other weights,
    decoding or prompt text in two files raises ValueError naming it."""
    merged: dict = {}
    for path in paths:
        for record in read_records(path):
            key = (record["task"], record["sample_id"])
            if key not in merged:
                merged[key] = {**record, "cells": {name: dict(c) for name, c in record["cells"].items()}}
                continue
            known = merged[key]
            differ = [field for field in SAME if known.get(field) != record.get(field)]
            if differ:
                raise ValueError(f"{key[0]} {key[1]}: recorded with different {', '.join(differ)} in {path}; "
                                 "compare records of the same weights and prompts only")
            for name, cells in record["cells"].items():
                known["cells"].setdefault(name, {}).update(cells)
    return list(merged.values())


def paired(records: list[dict], first: str, second: str, budget: str, tasks=None) -> dict | None:
    """``first`` minus ``second`` at ``budget`` over the prompts that hold both: mean, 95% half-width,
    won / tied / lost prompts. None when no prompt holds both."""
    diffs = [r["cells"][first][budget]["score"] - r["cells"][second][budget]["score"] for r in records
             if (tasks is None or r["task"] in tasks)
             and budget in r["cells"].get(first, {}) and budget in r["cells"].get(second, {})]
    if not diffs:
        return None
    won, lost = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"mean": sum(diffs) / len(diffs), "ci95": paired_ci95(diffs), "won": won,
            "tied": len(diffs) - won - lost, "lost": lost, "prompts": len(diffs)}


def cell(result: dict | None) -> str:
    if result is None:
        return "–"
    half = "" if result["ci95"] is None else f" ± {result['ci95']:.3f}"
    return f"{result['mean']:+.3f}{half} [{result['won']}/{result['tied']}/{result['lost']}]"


def standing_table(records: list[dict], against: str, others: list[str], budgets: list[str], tasks=None) -> str:
    """Markdown: ``against`` minus each other policy per budget, paired, ± 95% CI [won/tied/lost]."""
    lines = ["| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name in others:
        lines.append(f"| {name} | " + " | ".join(cell(paired(records, against, name, b, tasks)) for b in budgets) + " |")
    return "\n".join(lines) + "\n"
