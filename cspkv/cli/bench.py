"""csp-bench: decode latency, TTFT and memory of the cspkv runtime beside the peers, in one run."""

import shlex
import sys

import click


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    for v in values:
        if not 0.0 < v <= 1.0:
            raise click.BadParameter(f"budgets must be in (0, 1], got {v}")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="default", show_default=True, help="default | tiny | llava | PATH.")
@click.option("--lengths", default="512,1024,2048,4096", show_default=True, help="Prompt lengths (tokens).")
@click.option("--budgets", default="1.0,0.5,0.2", show_default=True)
@click.option("--precisions", default="fp32,fp16,int8", show_default=True, help="Of the cspkv runtime (fp32, fp16, int8, int4).")
@click.option("--policy", default="csp", show_default=True, help="Pruning policy of the exports and the reference.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="Generated tokens per configuration.")
@click.option("--decode-slots", type=int, default=64, show_default=True, help="Ring slots for generated tokens.")
@click.option("--scaling-tokens", type=int, default=4096, show_default=True,
              help="Generated length of the scaling run (0 skips it).")
@click.option("--scaling-every", type=int, default=256, show_default=True)
@click.option("--scaling-length", type=int, default=1024, show_default=True, help="Prompt length of the scaling run.")
@click.option("--peers", default="hf_full,hf_reference,kvpress,ortgenai", show_default=True,
              help="Peers beside cspkv: hf_full (transformers generate), hf_reference (transformers + cspkv "
                   "pruning), kvpress, ortgenai (onnxruntime-genai fp32 and int4; skipped if not installed).")
@click.option("--kvpress-python", type=click.Path(), default=None,
              help="Python of an environment with kvpress (transformers < 5.3); see scripts/bench_kvpress.py.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads for every runtime (default: each runtime's own, all cores).")
@click.option("--exports-dir", type=click.Path(), default=None, help="Where export folders are cached.")
@click.option("--out", type=click.Path(), default="results", show_default=True)
def main(model, lengths, budgets, precisions, policy, new_tokens, decode_slots, scaling_tokens, scaling_every,
         scaling_length, peers, kvpress_python, threads, exports_dir, out):
    """Benchmark decode latency per token, TTFT, tokens/s, KV bytes and peak RSS; writes
    OUT/bench.json, OUT/bench.md and PNG plots, and prints the table."""
    from pathlib import Path

    from cspkv.bench import report
    from cspkv.bench.suite import PEERS, BenchConfig, WEIGHT_BYTES, run_bench, to_json

    precision_list = tuple(p for p in precisions.split(",") if p)
    unknown = [p for p in precision_list if p not in WEIGHT_BYTES]
    if unknown:
        raise click.BadParameter(f"unknown precision {unknown[0]!r}: choose from {', '.join(WEIGHT_BYTES)}")
    peer_list = tuple(p for p in peers.split(",") if p)
    unknown = [p for p in peer_list if p not in PEERS]
    if unknown:
        raise click.BadParameter(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)}")
    if new_tokens < 2:
        raise click.BadParameter("--new-tokens must be >= 2 (the first token comes from prefill)")
    config = BenchConfig(model=model, lengths=_ints(lengths), budgets=_floats(budgets), precisions=precision_list,
                         policy=policy, new_tokens=new_tokens, decode_slots=decode_slots,
                         scaling_tokens=scaling_tokens, scaling_every=scaling_every, scaling_length=scaling_length,
                         peers=peer_list, kvpress_python=kvpress_python, threads=threads)
    if exports_dir:
        config.exports_dir = exports_dir
    try:
        run = run_bench(config, progress=lambda message: click.echo(message, err=True))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    result = to_json(run, "csp-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    files = report.write(result, Path(out))
    click.echo(report.markdown(result))
    click.echo("wrote " + ", ".join(str(p) for p in files.values()), err=True)
