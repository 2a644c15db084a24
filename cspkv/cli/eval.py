"""csp-eval: accuracy sweeps over policies and budgets, and the MileBench scorer (`csp-eval score`)."""

import click

from cspkv.cli._common import not_built_yet


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="default", show_default=True)
@click.option("--tasks", default="all", show_default=True)
@click.option("--policies", default="full,random,streaming_llm,h2o,snapkv,lookm,csp", show_default=True)
@click.option("--budgets", default="1.0,0.5,0.2,0.1", show_default=True)
@click.option("--out", type=click.Path(), default="results", show_default=True)
@click.pass_context
def main(ctx, model, tasks, policies, budgets, out):
    """Evaluate pruning policies against budgets; `csp-eval score` scores MileBench predictions."""
    if ctx.invoked_subcommand is None:
        not_built_yet("csp-eval (the sweep)", "evaluation")


@main.command("score")
@click.option("--task", "task_name", required=True, help="MileBench task name, e.g. ALFRED or TextNeedleInAHaystack.")
@click.option("--pred", "pred_path", required=True, type=click.Path(dir_okay=False),
              help="pred.json (or pred_with_extracted.json) written by the MileBench generation run.")
@click.option("--annotation", "annotation_path", type=click.Path(dir_okay=False), default=None,
              help="The task's MileBench JSON (e.g. MileBench/ALFRED/ALFRED.json): supplies choice_list and "
                   "the image-quantity levels. Not needed for a pred_with_extracted.json.")
@click.option("--question-type", type=click.Choice(["open-ended", "multi-choice"]), default=None,
              help="Only needed without --annotation, for a task whose predictions carry no choice_list.")
def score(task_name, pred_path, annotation_path, question_type):
    """Score MileBench predictions exactly like MileBench's evaluate.py; prints eval.json as one JSON line."""
    import json

    # Imported here so the sweep's start-up does not pay for the scorer.
    from cspkv.evaluation.milebench import MileBenchFormatError, load_annotation, score_predictions

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
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(
            f"cannot score {pred_path}: {exc}. Check that --pred and --annotation belong to task {task_name}; "
            "without --annotation, multi-choice predictions must carry choice_list and open-ended ones need "
            "--question-type open-ended."
        )
    if "image_quantity_level-Accuracy" not in result:
        click.echo("note: no image-quantity levels known; pass --annotation for the per-level breakdown.", err=True)
    click.echo(json.dumps(result))
