"""Choosing each policy's settings on the development split, with the same number of trials each.

The grid (:data:`GRID`) gives CSP and every tuned baseline five settings: its defaults, the recent
window capped at half the budget (``recent_cap=0.5``, which leaves room to select at budget 0.1),
and three more of its own knobs (CSP: rho and n; SnapKV: the pooling kernel; LOOK-M: the merge and
a tighter cap; H2O: its recent share). :func:`choose` reads a sweep's records of the grid on the
development prompts and picks, per policy, the setting with the best mean score (tasks weighted
equally, then budgets); for CSP it also reports the best rho per task, as the paper tunes it.
"""

from __future__ import annotations

from cspkv.pruning.spec import parse_policy, with_settings

GRID = {
    "csp": ["csp", "csp(recent_cap=0.5)", "csp(cross_ratio=0.25,recent_cap=0.5)",
            "csp(cross_ratio=0.75,recent_cap=0.5)", "csp(n=0,recent_cap=0.5)"],
    "snapkv": ["snapkv", "snapkv(recent_cap=0.5)", "snapkv(kernel_size=1,recent_cap=0.5)",
               "snapkv(kernel_size=9,recent_cap=0.5)", "snapkv(kernel_size=9)"],
    "lookm": ["lookm", "lookm(recent_cap=0.5)", "lookm(merge=True,recent_cap=0.5)", "lookm(recent_cap=0.25)",
              "lookm(merge=True)"],
    "h2o": ["h2o", "h2o(recent_cap=0.5)", "h2o(recent_cap=0.25)", "h2o(recent_cap=0.75)", "h2o(recent_ratio=0.5)"],
}


def grid_keys() -> dict[str, list[str]]:
    """The grid's settings as the sweep records them (canonical keys)."""
    return {family: [parse_policy(spec).key for spec in specs] for family, specs in GRID.items()}


def grid_policies() -> str:
    """The grid as one csp-eval --policies value (with the full cache as the reference row)."""
    return ",".join(["full"] + [spec for specs in GRID.values() for spec in specs])


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def dev_scores(records: list[dict], key: str, budgets: list[str]) -> dict:
    """One setting's development scores: per task and budget, per budget (tasks weighted equally),
    and overall (budgets weighted equally). Records without the setting's cell are left out."""
    by_task: dict = {}
    for record in records:
        cells = record["cells"].get(key, {})
        for budget in budgets:
            if budget in cells:
                by_task.setdefault(record["task"], {}).setdefault(budget, []).append(cells[budget]["score"])
    per_task = {task: {b: _mean(v) for b, v in by_budget.items()} for task, by_budget in sorted(by_task.items())}
    per_budget = {b: _mean(s[b] for s in per_task.values() if b in s) for b in budgets}
    return {"by_task": per_task, "by_budget": per_budget,
            "mean": _mean(v for v in per_budget.values() if v is not None)}


def choose(records: list[dict], budgets: list[str], grid: dict[str, list[str]] | None = None) -> dict:
    """Each family's best setting on the development records (the first in grid order wins a tie,
    so a default beats a setting that does no better); for CSP also the best setting per task."""
    grid = grid or grid_keys()
    families = {}
    for family, keys in grid.items():
        scored = {key: dev_scores(records, key, budgets) for key in keys}
        ranked = [key for key in keys if scored[key]["mean"] is not None]
        if not ranked:
            continue
        best = max(ranked, key=lambda key: (scored[key]["mean"], -keys.index(key)))
        families[family] = {"chosen": best, "default": keys[0], "settings": scored}
    per_task = {}
    if "csp" in families:
        settings = families["csp"]["settings"]
        tasks = sorted({task for s in settings.values() for task in s["by_task"]})
        for task in tasks:
            def task_mean(key):
                found = settings[key]["by_task"].get(task, {})
                return _mean(found.values()) if found else float("-inf")
            per_task[task] = max(grid["csp"], key=lambda key: (task_mean(key), -grid["csp"].index(key)))
    return {"families": families, "csp_per_task": per_task, "budgets": budgets,
            "prompts_per_task": {task: sum(1 for r in records if r["task"] == task)
                                 for task in sorted({r["task"] for r in records})}}


def choice_table(choice: dict) -> str:
    """Markdown: every setting's development score per budget, the chosen one in bold."""
    budgets = choice["budgets"]
    lines = ["| policy | setting | " + " | ".join(f"budget {b}" for b in budgets) + " | mean |",
             "|---|---|" + "---|" * (len(budgets) + 1)]
    for family, found in choice["families"].items():
        for key, scored in found["settings"].items():
            mark = "**" if key == found["chosen"] else ""
            cells = [f"{scored['by_budget'][b]:.3f}" if scored["by_budget"].get(b) is not None else "–" for b in budgets]
            mean = "–" if scored["mean"] is None else f"{scored['mean']:.3f}"
            lines.append(f"| {family} | {mark}{key}{mark} | " + " | ".join(cells) + f" | {mark}{mean}{mark} |")
    if choice["csp_per_task"]:
        lines += ["", "CSP's best setting per task (the paper's per-task tuning): "
                  + "; ".join(f"{task}: {key}" for task, key in choice["csp_per_task"].items())]
    return "\n".join(lines) + "\n"


def policies_for_test_run(choice: dict) -> str:
    """The test run's rows: CSP's and the best baseline's chosen settings, and CSP's with the
    decode-time null slot (csp-eval --policies; a default is already among the committed sweep's cells)."""
    chosen = [choice["families"][f]["chosen"] for f in ("csp", best_baseline(choice))]
    rows = [key for key in chosen if key != parse_policy(key).name]
    return ",".join(rows + [with_settings(choice["families"]["csp"]["chosen"], decode_n=1)])


# Layer-adaptive budgets, tried on top of each policy's chosen setting (the same two slopes each).
PYRAMID_SLOPES = (0.3, 0.6)


def best_baseline(choice: dict) -> str:
    """The baseline family whose chosen setting scored best on the development split."""
    baselines = {f: found for f, found in choice["families"].items() if f != "csp"}
    return max(baselines, key=lambda f: baselines[f]["settings"][baselines[f]["chosen"]]["mean"])


def layer_grid(choice: dict, families: list[str] | None = None) -> dict[str, list[str]]:
    """{family: [chosen, chosen with each pyramid slope]} for CSP and the best baseline by default."""
    families = families or ["csp", best_baseline(choice)]
    return {f: [choice["families"][f]["chosen"]] + [with_settings(choice["families"][f]["chosen"], pyramid=s)
                                                     for s in PYRAMID_SLOPES] for f in families}
