"""csp-export: build static-shape ONNX graphs (and engines) with pruning baked in."""

import click

from cspkv.cli._common import not_built_yet


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="default", show_default=True, help="default | llava | PATH to a local HF LLaVA checkpoint.")
@click.option("--budget", type=float, default=0.5, show_default=True, help="Fraction of the prompt's KV entries kept, in (0, 1].")
@click.option("--policy", default="csp", show_default=True, help="Pruning policy (see cspkv.pruning.available_policies()).")
@click.option("--out", type=click.Path(), default=None, help="Output folder for the graphs and manifest.json.")
def main(model, budget, policy, out):
    """Export LLaVA into static-shape ONNX graphs with KV pruning inside the prefill graph."""
    not_built_yet("csp-export", "export")
