"""csp-export: trace LLaVA into static-shape ONNX graphs with KV pruning inside prefill."""

import json

import click

from cspkv.pruning import available_policies


def _params(cross_ratio, n, recent_ratio, window_ratio, policy):
    params = {}
    if window_ratio is not None:
        params["window_ratio"] = window_ratio
    if recent_ratio is not None:
        params["recent_ratio"] = recent_ratio
    if policy == "csp":
        if cross_ratio is not None:
            params["cross_ratio"] = cross_ratio
        if n is not None:
            params["n"] = n
    elif cross_ratio is not None or n is not None:
        raise click.UsageError("--cross-ratio and --n apply to --policy csp only")
    return params


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="default", show_default=True, help="default | tiny | llava | PATH (local HF LLaVA checkpoint).")
@click.option("--budget", type=float, default=0.5, show_default=True, help="Fraction of the prompt's KV entries kept, in (0, 1].")
@click.option("--policy", type=click.Choice(available_policies()), default="csp", show_default=True)
@click.option("--cross-ratio", type=float, default=None, help="csp: share of the selectable slots chosen by cross score (rho).")
@click.option("--n", type=float, default=None, help="csp: the n of n-softmax in prefill scoring.")
@click.option("--recent-ratio", type=float, default=None, help="beta: recent window = beta * observation window.")
@click.option("--window-ratio", type=float, default=None, help="observation window = ratio * prompt length.")
@click.option("--max-prompt", type=int, default=2048, show_default=True, help="P_max: the static prompt length.")
@click.option("--decode-slots", type=int, default=256, show_default=True, help="G: KV slots for generated tokens.")
@click.option("--n-decode", type=float, default=0.0, show_default=True, help="Decode-time n-softmax (adds a null slot) when > 0.")
@click.option("--precision", type=click.Choice(["fp32"]), default="fp32", show_default=True,
              help="fp16/int8 arrive with the engines issue.")
@click.option("--out", type=click.Path(), required=True, help="Output folder (graphs + manifest.json).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
def main(model, budget, policy, cross_ratio, n, recent_ratio, window_ratio, max_prompt, decode_slots,
         n_decode, precision, out, force):
    """Export LLaVA into static-shape ONNX graphs (vision, prefill with pruning, decode)."""
    from pathlib import Path

    from cspkv.export.exporter import ExportError, ExportPlan, export_model
    from cspkv.models.registry import ModelNotFound, load_model

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not force:
        raise click.ClickException(f"{target} already exists and is not empty: choose another --out or pass --force")
    try:
        click.echo(f"loading model {model!r} ...", err=True)
        net, processor, model_id = load_model(model)
        plan = ExportPlan.make(net, policy, _params(cross_ratio, n, recent_ratio, window_ratio, policy),
                               budget, max_prompt, decode_slots, n_decode)
        manifest = export_model(net, target, plan, model_id, force=force,
                                progress=lambda message: click.echo(message + " ...", err=True),
                                processor=processor)
    except (ExportError, ModelNotFound) as exc:
        raise click.ClickException(str(exc)) from None
    total = 0
    for name, meta in manifest["files"].items():
        total += meta["bytes"]
        click.echo(f"  {name:<14} {meta['bytes'] / 2**20:9.1f} MiB  ({manifest['export_seconds'][name[:-5]]:.1f} s)")
    slots = manifest["slots"]
    click.echo(f"wrote {target} ({total / 2**20:.1f} MiB): {policy} {json.dumps(plan.policy_params)}, "
               f"budget {budget} -> {slots['prompt_max']} prompt slots + {slots['decode']} decode slots"
               f"{' + null slot' if slots['null_slot'] else ''} = {slots['total']} per layer and KV head, "
               f"P_max {max_prompt}")
