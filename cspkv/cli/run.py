"""csp-run: generate with pruning and a fixed-budget KV cache.

Today it runs the PyTorch reference (`--model`); running an exported engine folder through the C
runtime (`--engine`) arrives with the runtime issue.
"""

import time

import click

from cspkv.cli._common import not_built_yet

MIB = 1024 * 1024


def _load_model(name: str):
    if name == "tiny":
        from cspkv.models.tiny import tiny_llava

        return tiny_llava(n_heads=4, n_kv_heads=2, n_layers=2)
    raise click.ClickException(
        f"--model {name!r} is not available yet: the default model and local checkpoints arrive "
        "with the evaluation issue; use --model tiny (a small random LLaVA built from a config)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", type=click.Path(), default=None, help="Folder written by csp-export (runtime issue).")
@click.option("--model", default=None, help="Run the PyTorch reference on this model: tiny.")
@click.option("--image", "images", multiple=True, type=click.Path(), help="Image file; repeat for several images.")
@click.option("--prompt", default=None, help="The question or instruction.")
@click.option("--n-images", type=int, default=4, show_default=True, help="tiny model: synthetic images in the prompt.")
@click.option("--prune", "prune_policy", default="csp", show_default=True, help="Pruning policy applied after prefill.")
@click.option("--budget", type=float, default=0.5, show_default=True, help="Fraction of prompt KV entries kept, in (0, 1].")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--policy", type=click.Choice(["ring", "rescore", "unbounded"]), default="ring", show_default=True,
              help="Decode-slot policy: overwrite the oldest generated token, evict the lowest-scored, or grow.")
@click.option("--decode-slots", type=int, default=16, show_default=True, help="Slots for generated tokens (ring/rescore).")
def main(engine, model, images, prompt, n_images, prune_policy, budget, max_new_tokens, policy, decode_slots):
    """Generate with KV pruning after prefill and a fixed number of decode slots."""
    if engine is not None:
        not_built_yet("csp-run --engine", "runtime")
    if model is None:
        raise click.UsageError("give --model tiny (PyTorch reference) or --engine DIR")
    from cspkv.models.llava import generate_from_ids
    from cspkv.models.tiny import multi_image_prompt

    if images or prompt:
        raise click.UsageError("--image/--prompt need the default model (evaluation issue); "
                               "--model tiny builds its own synthetic prompt")
    net = _load_model(model)
    ids, pixels = multi_image_prompt(n_images)
    start = time.perf_counter()
    try:
        result = generate_from_ids(net, ids, pixels, policy=prune_policy, budget=budget,
                                   max_new_tokens=max_new_tokens, mode=policy,
                                   decode_slots=None if policy == "unbounded" else decode_slots)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    elapsed = time.perf_counter() - start
    cfg = net.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_slot = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4   # fp32 bytes
    full_bytes = (result.prompt_len + len(result.tokens)) * per_slot
    click.echo(f"tokens: {result.tokens}")
    click.echo(f"prompt {result.prompt_len} tokens ({n_images} images) | kept {result.kept_per_layer[0]} "
               f"entries/layer/head ({prune_policy}, budget {budget}) | {len(result.tokens)} tokens in "
               f"{elapsed:.2f}s | KV {result.slots * per_slot / MIB:.3f} MiB fixed vs "
               f"{full_bytes / MIB:.3f} MiB full cache")
