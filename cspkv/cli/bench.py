"""csp-bench: latency and memory benchmarks, side by side with the peers."""

import click

from cspkv.cli._common import not_built_yet


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(), default="results", show_default=True)
def main(out):
    """Benchmark decode latency, TTFT and KV memory (prints a table, writes JSON)."""
    not_built_yet("csp-bench", "benchmarks")
