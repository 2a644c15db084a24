"""csp-export: trace LLaVA into static-shape ONNX graphs with KV pruning inside prefill."""

import json

import click

from cspkv.pruning import available_policies


def _params(cross_ratio, n, recent_ratio, window_ratio, policy, recent_cap=None, pyramid=None):
    params = {}
    if window_ratio is not None:
        params["window_ratio"] = window_ratio
    if recent_ratio is not None:
        params["recent_ratio"] = recent_ratio
    if recent_cap is not None:
        params["recent_cap"] = recent_cap
    if pyramid is not None:
        params["pyramid"] = pyramid
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
@click.option("--recent-cap", type=float, default=None,
              help="Cap the recent window at this share of the kept entries (leaves room to select at small budgets).")
@click.option("--pyramid", type=float, default=None,
              help="Layer-adaptive budgets: the first layer keeps (1 + s) C, the last (1 - s) C, the same total.")
@click.option("--max-prompt", type=int, default=2048, show_default=True, help="P_max: the static prompt length.")
@click.option("--decode-slots", type=int, default=256, show_default=True, help="G: KV slots for generated tokens.")
@click.option("--n-decode", type=float, default=0.0, show_default=True, help="Decode-time n-softmax (adds a null slot) when > 0.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32", show_default=True,
              help="fp16: float16 graphs and K/V; int8: QDQ weight MatMuls (K/V fp32); int4: the language model's "
                   "linear weights in 4-bit blocks (K/V fp32). Non-fp32 exports an fp32 folder first (or takes "
                   "--from) and converts it.")
@click.option("--int8-flavour", type=click.Choice(["u8s8", "s8s8"]), default="u8s8", show_default=True,
              help="int8: u8s8 (uint8 activations, ONNX Runtime CPU) or s8s8 (symmetric int8, TensorRT).")
@click.option("--calibration", default="auto", show_default=True,
              help="int8: 'auto' builds (and caches) the built-in set for --model default / tiny; or the folder "
                   "of a saved calibration set (cspkv.quantize.calibration.record_calibration_set).")
@click.option("--int4-block-size", type=int, default=32, show_default=True,
              help="int4: weights per quantization block along K (a power of two >= 16; 32 is the GGUF block). "
                   "A linear layer whose K it does not divide stays float.")
@click.option("--from", "from_folder", type=click.Path(), default=None,
              help="Convert this existing fp32 export folder to --precision instead of exporting again.")
@click.option("--out", type=click.Path(), required=True, help="Output folder (graphs + manifest.json).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
def main(model, budget, policy, cross_ratio, n, recent_ratio, window_ratio, recent_cap, pyramid, max_prompt, decode_slots,
         n_decode, precision, int8_flavour, calibration, int4_block_size, from_folder, out, force):
    """Export LLaVA into static-shape ONNX graphs (vision, prefill with pruning, decode)."""
    from pathlib import Path

    _refuse_other_precisions_options(precision)
    if from_folder is not None or precision != "fp32":
        return _export_precision(model, budget, policy, _params(cross_ratio, n, recent_ratio, window_ratio, policy, recent_cap, pyramid),
                                 max_prompt, decode_slots, n_decode, precision, int8_flavour, calibration,
                                 from_folder, Path(out), force, int4_block_size)

    from cspkv.export.exporter import ExportError, ExportPlan, export_model
    from cspkv.models.registry import ModelNotFound, load_model

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not force:
        raise click.ClickException(f"{target} already exists and is not empty: choose another --out or pass --force")
    try:
        click.echo(f"loading model {model!r} ...", err=True)
        net, processor, model_id = load_model(model)
        plan = ExportPlan.make(net, policy, _params(cross_ratio, n, recent_ratio, window_ratio, policy, recent_cap, pyramid),
                               budget, max_prompt, decode_slots, n_decode)
        manifest = export_model(net, target, plan, model_id, force=force,
                                progress=lambda message: click.echo(message + " ...", err=True),
                                processor=processor)
    except (ExportError, ModelNotFound) as exc:
        raise click.ClickException(str(exc)) from None
    total = 0
    for name, meta in manifest["files"].items():
        total += meta["bytes"]
        seconds = manifest["export_seconds"].get(name.removesuffix(".onnx"))     # graphs only
        click.echo(f"  {name:<28} {meta['bytes'] / 2**20:9.1f} MiB" + (f"  ({seconds:.1f} s)" if seconds is not None else ""))
    slots = manifest["slots"]
    click.echo(f"wrote {target} ({total / 2**20:.1f} MiB): {policy} {json.dumps(plan.policy_params)}, "
               f"budget {budget} -> {slots['prompt_max']} prompt slots + {slots['decode']} decode slots"
               f"{' + null slot' if slots['null_slot'] else ''} = {slots['total']} per layer and KV head, "
               f"P_max {max_prompt}")


def _refuse_other_precisions_options(precision: str) -> None:
    """An option given on the command line for a precision other than --precision is refused."""
    from click.core import ParameterSource

    context = click.get_current_context()
    for name, flag, applies in (("int8_flavour", "--int8-flavour", "int8"), ("calibration", "--calibration", "int8"),
                                ("int4_block_size", "--int4-block-size", "int4")):
        if precision != applies and context.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{flag} applies to --precision {applies} only, not {precision}: drop {flag} "
                                   f"or pass --precision {applies}")


def _echo_files(manifest: dict, target) -> None:
    total = 0
    for name, meta in manifest["files"].items():
        total += meta["bytes"]
        click.echo(f"  {name:<14} {meta['bytes'] / 2**20:9.1f} MiB")
    click.echo(f"wrote {target} ({total / 2**20:.1f} MiB): precision {manifest['precision']}, "
               f"K/V {manifest['kv_dtype']}, from fp32 model {manifest['source']['fingerprint'][:12]}")


def _export_precision(model, budget, policy, params, max_prompt, decode_slots, n_decode, precision, flavour,
                      calibration, from_folder, target, force, block_size=32):
    """--precision fp16|int8|int4 (exports fp32 to a temporary folder first), or --from FP32_FOLDER."""
    import tempfile
    from pathlib import Path

    from cspkv.quantize.calibration import HOW_TO, CalibrationError
    from cspkv.quantize.convert import PrecisionError, convert_export
    from cspkv.export.exporter import ExportError, ExportPlan, export_model
    from cspkv.runtime.manifest import ManifestError
    from cspkv.models.registry import ModelNotFound, load_model

    if precision == "fp32":
        raise click.UsageError("--from converts an fp32 export: give --precision fp16, int8 or int4")
    if target.exists() and any(target.iterdir()) and not force:
        raise click.ClickException(f"{target} already exists and is not empty: choose another --out or pass --force")
    if precision == "int4":
        from cspkv.quantize.int4 import Int4Error, check_block_size

        try:
            check_block_size(block_size)
        except Int4Error as exc:
            raise click.UsageError(f"--int4-block-size: {exc}") from None
    if precision == "int8" and calibration == "auto" and from_folder is None and model not in ("default", "tiny"):
        raise click.ClickException(f"--precision int8 needs calibration data and --model {model} has none "
                                   f"built in.\n{HOW_TO}")
    if precision == "int8" and calibration != "auto" and not Path(calibration).is_dir():
        raise click.ClickException(f"--calibration {calibration}: no such folder.\n{HOW_TO}")
    progress = lambda message: click.echo(message + " ...", err=True)  # noqa: E731
    try:
        if from_folder is not None:
            manifest = convert_export(from_folder, target, precision, flavour, calibration, force, progress,
                                      block_size=block_size)
        else:
            click.echo(f"loading model {model!r} ...", err=True)
            net, processor, model_id = load_model(model)
            plan = ExportPlan.make(net, policy, params, budget, max_prompt, decode_slots, n_decode)
            with tempfile.TemporaryDirectory(prefix="cspkv-fp32-") as tmp:
                fp32 = Path(tmp) / "fp32"
                export_model(net, fp32, plan, model_id, progress=progress, processor=processor)
                manifest = convert_export(fp32, target, precision, flavour, calibration, force, progress,
                                          block_size=block_size)
    except (ExportError, ModelNotFound, PrecisionError, ManifestError, CalibrationError) as exc:
        raise click.ClickException(str(exc)) from None
    _echo_files(manifest, target)
