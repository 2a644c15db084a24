"""csp-run: generate with an exported engine folder and the fixed-budget KV runtime."""

import click

from cspkv.cli._common import not_built_yet


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", type=click.Path(), required=False, help="Folder written by csp-export.")
@click.option("--image", "images", multiple=True, type=click.Path(), help="Image file; repeat for several images.")
@click.option("--prompt", default=None, help="The question or instruction.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--policy", type=click.Choice(["ring", "rescore"]), default="ring", show_default=True, help="Decode-slot eviction policy.")
def main(engine, images, prompt, max_new_tokens, policy):
    """Run generation through the C-owned fixed-budget KV buffer."""
    not_built_yet("csp-run", "runtime")
