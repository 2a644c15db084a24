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
