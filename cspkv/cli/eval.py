"""csp-eval: accuracy sweeps over policies and budgets, and the MileBench scorer (`csp-eval score`)."""

import click


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="default", show_default=True, help="default | llava | PATH (local HF LLaVA).")
@click.option("--tasks", default="all", show_default=True, help="Comma-separated tasks, or all.")
@click.option("--policies", default="full,random,streaming_llm,h2o,snapkv,lookm,csp", show_default=True)
@click.option("--budgets", default="1.0,0.5,0.2,0.1", show_default=True)
@click.option("--limit", type=int, default=200, show_default=True, help="Prompts per task.")
@click.option("--split", type=click.Choice(["test", "dev"]), default="test", show_default=True,
              help="easy-vqa prompts: the test set, or the development split over train-split images (for tuning).")
@click.option("--max-new-tokens", type=int, default=112, show_default=True,
              help="Reply length cap; the default model's worked replies (16-image counting) reach ~110 tokens.")
@click.option("--milebench", type=click.Path(exists=True, file_okay=False), default=None,
              help="A MileBench data folder (official layout): evaluate its tasks instead of easy-vqa's.")
@click.option("--blank/--no-blank", default=True, show_default=True,
              help="Also run each prompt with its images blanked (the no-image baseline); tuning runs skip it.")
@click.option("--out", type=click.Path(), default="results", show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Append each prompt's result to OUT/eval_records.jsonl and skip prompts already recorded "
                   "there, so an interrupted sweep continues where it stopped.")
@click.option("--minutes", type=float, default=None,
              help="Start no new prompt after this many minutes (tasks are taken round-robin); with --resume "
                   "a later run carries on.")
@click.option("--workers", type=int, default=None,
              help="Evaluate on N Ray workers, each loading the model once (a local Ray runtime unless --address); "
                   "left out or 1, the sweep runs in this process. Needs the [ray] extra.")
@click.option("--address", default=None,
              help="Join this Ray cluster (HOST:PORT from `ray start --head`, or auto) instead of starting one here.")
@click.option("--threads-per-worker", type=int, default=None,
              help="Torch/OpenMP threads of each Ray worker (and the CPUs it claims).  [default: 1]")
@click.pass_context
def main(ctx, model, tasks, policies, budgets, limit, split, max_new_tokens, milebench, blank, out, resume, minutes, workers,
         address, threads_per_worker):
    """Evaluate pruning policies against budgets; `csp-eval score` scores MileBench predictions."""
    if ctx.invoked_subcommand is not None:
        return
    import json
    import shlex
    import sys
    from pathlib import Path

    from cspkv.durable import write_atomic
    from cspkv.evaluation import sweep
    from cspkv.heap import keep_freed_heap
    from cspkv.models.registry import ModelNotFound, load_model
    from cspkv.pruning import available_policies, check_budget
    from cspkv.pruning.spec import split_specs

    if split != "test" and milebench is not None:
        raise click.UsageError("--split dev draws easy-vqa prompts; MileBench folders have no development split")
    try:
        policy_list = list(sweep.policy_specs(split_specs(policies))[0])  # keys: settings in a fixed order
    except ValueError as exc:
        raise click.UsageError(f"--policies: {exc} (policies: {', '.join(available_policies())})") from None
    try:
        budget_list = [float(b) for b in budgets.split(",") if b]
        for budget in budget_list:
            check_budget(budget)
    except ValueError as exc:
        raise click.UsageError(f"--budgets: {exc}") from None
    distributed = _check_distribution(workers, address, threads_per_worker)
    keep_freed_heap()  # the sweep frees and re-allocates 10-100 MB score buffers every layer
    errors: list[str] = []
    try:
        if milebench is None:
            from cspkv.evaluation.easyvqa_tasks import TASKS, check_task

            task_list = list(TASKS) if tasks == "all" else tasks.split(",")
            for task in task_list:
                check_task(task)
        else:
            task_list = (sorted(p.name for p in Path(milebench).iterdir() if p.is_dir()) if tasks == "all"
                         else tasks.split(","))
        net, processor, model_id = load_model(model)
        if processor is None:
            raise click.ClickException(f"--model {model} has no processor: evaluate a real model")
        if milebench is None:
            items = sweep.easyvqa_items(task_list, processor, limit, split)
        else:
            items = sweep.milebench_items(milebench, task_list, processor, limit, errors)
    except (ValueError, ModelNotFound) as exc:  # unknown task, missing data or model
        raise click.ClickException(str(exc)) from None
    for error in errors:
        click.echo(f"skipped: {error}", err=True)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    records = target / "eval_records.jsonl"
    if not resume and records.exists():
        records.unlink()
    if distributed:
        from functools import partial

        from cspkv.evaluation import distributed as dist
        from cspkv.export.manifest import model_fingerprint

        fingerprint = model_fingerprint(net)
        del net  # the workers hold their own copies
        with click.progressbar(length=len(items), label="prompts", file=sys.stderr) as bar:
            try:
                result = dist.run_sweep_distributed(
                    partial(dist.load_named_model, model_id), fingerprint, items, policy_list, budget_list,
                    max_new_tokens, workers=workers or 1, address=address, threads_per_worker=threads_per_worker or 1,
                    progress=lambda message: bar.update(1), notice=lambda message: click.echo(message, err=True),
                    records_path=records, minutes=minutes, blank=blank)
            except dist.ClusterError as exc:
                raise click.ClickException(str(exc)) from None
    else:
        with click.progressbar(length=len(items), label="prompts", file=sys.stderr) as bar:
            result = sweep.run_sweep(net, processor, items, policy_list, budget_list, max_new_tokens,
                                     progress=lambda message: bar.update(1), records_path=records,
                                     minutes=minutes, blank=blank)
    result["model"] = model_id
    result["command"] = "csp-eval " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["skipped"] = errors
    write_atomic(target / "eval.json", json.dumps(result, indent=2) + "\n")
    table, timing = sweep.markdown_table(result, budget_list, policy_list), sweep.timing_note(result)
    write_atomic(target / "eval.md", f"`{result['command']}` ({timing})\n\n{table}")
    plots = sweep.plot(result, budget_list, target)
    click.echo(table)
    click.echo(f"wrote {target / 'eval.json'}, {target / 'eval.md'} and {len(plots)} plots ({timing})")
    if result.get("failed"):
        listed = ", ".join(f"{f['task']} {f['sample_id']} ({f['error']})" for f in result["failed"][:5])
        raise click.ClickException(f"{len(result['failed'])} prompts failed, left out of the tables: {listed}; "
                                   "run the same command again to retry them (recorded prompts are kept)")


def _check_distribution(workers, address, threads_per_worker) -> bool:
    """Whether the sweep runs on Ray workers; a bad combination, a missing Ray or an unreachable
    --address stops here, before the model loads."""
    if workers is not None and workers < 1:
        raise click.UsageError(f"--workers {workers}: give at least 1 (1 without --address runs in this process)")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise click.UsageError(f"--threads-per-worker {threads_per_worker}: give at least 1")
    if address is not None and workers is None:
        raise click.UsageError("--address needs --workers N: how many workers to start on the cluster")
    distributed = address is not None or (workers or 1) > 1
    if threads_per_worker is not None and not distributed:
        raise click.UsageError("--threads-per-worker sets the threads of Ray workers: add --workers N (N > 1) "
                               "or --address")
    if distributed:
        from cspkv.evaluation.distributed import ClusterError, check_address, ray_installed

        if not ray_installed():
            raise click.ClickException("--workers/--address need Ray, which is not installed: "
                                       "pip install 'cspkv[ray]', or leave them out to run in this process")
        if address is not None:
            try:
                check_address(address)
            except ClusterError as exc:
                raise click.ClickException(str(exc)) from None
    return distributed


@main.command("score")
@click.option("--task", "task_name", required=True, help="MileBench task name, e.g. ALFRED or TextNeedleInAHaystack.")
@click.option("--pred", "pred_path", required=True, type=click.Path(dir_okay=False),
              help="pred.json (or pred_with_extracted.json) written by the MileBench generation run.")
@click.option("--annotation", "annotation_path", type=click.Path(dir_okay=False), default=None,
              help="The task's MileBench JSON (e.g. MileBench/ALFRED/ALFRED.json): supplies choice_list and "
                   "the image-quantity levels. Not needed for a pred_with_extracted.json.")
@click.option("--question-type", type=click.Choice(["open-ended", "multi-choice"]), default=None,
              help="Only for a task of your own whose annotation declares none; MileBench's tasks are known.")
def score(task_name, pred_path, annotation_path, question_type):
    """Score MileBench predictions exactly like MileBench's evaluate.py; prints eval.json as one JSON line."""
    import json

    # Imported here so the sweep's start-up does not pay for the scorer.
    from cspkv.evaluation.milebench import MILEBENCH_TASKS, MileBenchFormatError, load_annotation, score_predictions

    if task_name not in MILEBENCH_TASKS and annotation_path is None:
        raise click.UsageError(f"--task {task_name!r} is not a MileBench task ({', '.join(sorted(MILEBENCH_TASKS, key=str.lower))}); "
                               "for a task of your own, pass its annotation JSON with --annotation")
    try:
        with open(pred_path, encoding="utf-8") as fh:
            predictions = json.load(fh)
    except FileNotFoundError:
        raise click.ClickException(f"{pred_path}: prediction file not found; pass the pred.json of a MileBench run.")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{pred_path}: not valid JSON ({exc}); regenerate or fix the prediction file.")

    try:
        annotation = load_annotation(annotation_path) if annotation_path else None
    except MileBenchFormatError as exc:
        raise click.ClickException(f"{exc}; pass the task's MileBench JSON, e.g. MileBench/{task_name}/{task_name}.json.")

    try:
        result = score_predictions(task_name, predictions, annotation, question_type=question_type)
    except ValueError as exc:
        raise click.ClickException(f"cannot score {pred_path}: {exc}") from None
    except (KeyError, TypeError) as exc:   # an annotation or prediction missing a field MileBench has
        raise click.ClickException(
            f"cannot score {pred_path}: {type(exc).__name__} {exc}: check that --pred and --annotation are MileBench "
            f"files of task {task_name}; without --annotation, multi-choice predictions must carry choice_list") from None
    if "image_quantity_level-Accuracy" not in result:
        click.echo("note: no image-quantity levels known; pass --annotation for the per-level breakdown.", err=True)
    click.echo(json.dumps(result))
