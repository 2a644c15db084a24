"""csp-run: generate with pruning after prefill and a fixed number of KV slots.

`--engine DIR` runs an export folder on ONNX Runtime with the C-owned fixed-budget KV buffer and the
runtime's own processor, without torch or transformers (only an export that kept a transformers
processor, kind 'hf', loads transformers). `--model NAME` runs the PyTorch reference instead (same
pruning, same slot semantics).
"""

import time

import click
import numpy as np

MIB = 1024 * 1024
# The reference's defaults; an export fixes its own (plan.budget, plan.policy, plan.decode_slots).
DEFAULTS = {"budget": 0.5, "policy": "csp", "decode_slots": 16}


def checked_prompt(prompt: str | None, images) -> str | None:
    """The --prompt text, refused when empty or not valid UTF-8; None means the built-in demo."""
    if prompt is None:
        if images:
            raise click.UsageError("--image needs a --prompt: ask a question about the images")
        return None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:   # bytes the shell passed that are not UTF-8 (kept as surrogates)
        bad = prompt[exc.start].encode("utf-8", "surrogateescape")
        raise click.UsageError(f"--prompt is not valid UTF-8 text (byte 0x{bad.hex()} at character {exc.start}): "
                               "pass the question as UTF-8") from None
    if not prompt.strip():
        raise click.UsageError("--prompt is empty: ask a question, e.g. --prompt \"Which image shows a circle?\"")
    return prompt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", type=click.Path(), default=None, help="Folder written by csp-export.")
@click.option("--model", default=None, help="Run the PyTorch reference: default | tiny | llava | PATH.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Image file; repeat for several images.")
@click.option("--prompt", default=None, help="The question (default: a question about built-in demo images).")
@click.option("--policy", default=None,
              help=f"Pruning policy applied after prefill [reference default: {DEFAULTS['policy']}; an engine "
                   "prunes as it was exported].")
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True), default=None,
              help=f"Fraction of prompt KV entries kept, in (0, 1] [reference default: {DEFAULTS['budget']}; "
                   "fixed by an export].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--eviction", type=click.Choice(["ring", "rescore", "unbounded"]), default="ring", show_default=True,
              help="When the decode slots are full: overwrite the oldest generated token, evict the lowest-scored, "
                   "or grow (reference only).")
@click.option("--decode-slots", type=click.IntRange(min=1), default=None,
              help=f"Slots for generated tokens (ring/rescore) [reference default: {DEFAULTS['decode_slots']}; "
                   "fixed by an export].")
def main(engine, model, images, prompt, policy, budget, max_new_tokens, eviction, decode_slots):
    """Generate with KV pruning after prefill and a fixed number of decode slots."""
    prompt = checked_prompt(prompt, images)
    if engine is not None:
        if model is not None:
            raise click.UsageError("give either --engine DIR or --model NAME, not both")
        if eviction == "unbounded":
            raise click.UsageError("an engine has a fixed number of slots: use --eviction ring or rescore")
        return _run_engine(engine, images, prompt, max_new_tokens, eviction,
                           {"budget": budget, "policy": policy, "decode_slots": decode_slots})
    if model is None:
        raise click.UsageError("give --model default|tiny|PATH (PyTorch reference) or --engine DIR")
    budget = DEFAULTS["budget"] if budget is None else budget
    policy = policy or DEFAULTS["policy"]
    decode_slots = DEFAULTS["decode_slots"] if decode_slots is None else decode_slots
    from cspkv.models.llava import generate, generate_from_ids
    from cspkv.models.registry import ModelNotFound, load_model
    from cspkv.pruning import available_policies

    if policy not in available_policies():
        raise click.UsageError(f"--policy {policy!r} is not a pruning policy; choose one of "
                               f"{', '.join(available_policies())}")
    try:
        net, processor, _ = load_model(model)
    except (ModelNotFound, ImportError) as exc:
        raise click.ClickException(str(exc)) from None
    decode = dict(policy=policy, budget=budget, max_new_tokens=max_new_tokens, eviction=eviction,
                  decode_slots=None if eviction == "unbounded" else decode_slots)
    start = time.perf_counter()
    try:
        if processor is None:                    # the tiny model: a synthetic multi-image prompt
            if images or prompt:
                raise click.UsageError(f"--model {model} has no processor: --image/--prompt need a real model")
            import torch

            vision = net.config.vision_config          # tiny models drop CLS: one token per patch
            ids, pixels = synthetic_prompt(4, net.config.image_token_id, (vision.image_size // vision.patch_size) ** 2,
                                           vision.image_size, net.config.text_config.vocab_size)
            result = generate_from_ids(net, torch.from_numpy(ids)[None], torch.from_numpy(pixels), **decode)
            answer = " ".join(map(str, result.tokens))
        else:
            from cspkv.models.prompting import chat_prompt, demo_images, demo_question, load_images

            size = getattr(processor, "image_size", None) or net.config.vision_config.image_size
            pictures = load_images(images, size) if images else demo_images(size)
            question = prompt or demo_question()
            result = generate(net, processor, pictures, chat_prompt(processor, question, len(pictures)), **decode)
            answer = result.text
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    elapsed = time.perf_counter() - start
    from cspkv.bench.runners import kv_bytes_per_token

    per_slot = kv_bytes_per_token(net.config.text_config)
    full_bytes = (result.prompt_len + len(result.tokens)) * per_slot
    click.echo(answer)
    click.echo(f"[{model}] prompt {result.prompt_len} tokens | kept {result.kept_per_layer[0]} entries per layer "
               f"and KV head ({policy}, budget {budget}) | {len(result.tokens)} tokens in {elapsed:.1f}s | "
               f"KV {result.slots * per_slot / MIB:.2f} MiB fixed ({result.slots} slots) vs "
               f"{full_bytes / MIB:.2f} MiB full cache", err=True)


def refuse_export_overrides(plan: dict, given: dict) -> None:
    """An export fixed its budget, pruning policy and decode slots at export time: a different value
    on the command line is refused rather than silently ignored."""
    fixed = {"budget": ("--budget", plan["budget"], "plan.budget"),
             "policy": ("--policy", plan["policy"], "plan.policy"),
             "decode_slots": ("--decode-slots", plan["decode_slots"], "plan.decode_slots")}
    for key, value in given.items():
        flag, exported, field = fixed[key]
        if value is not None and value != exported:
            raise click.UsageError(f"{flag} {value} differs from this export's {exported} ({field}), which was fixed "
                                   f"when it was exported: drop {flag}, or re-run csp-export with {flag} {value}")


def synthetic_prompt(n_images: int, image_token_id: int, image_tokens: int, image_size: int, vocab_size: int,
                     text_len: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What a model without a processor (the tiny test models) runs on: input_ids [L] with
    ``n_images`` runs of ``image_tokens`` image tokens between random text tokens, and random
    pixel_values [n_images, 3, image_size, image_size]."""
    rng = np.random.default_rng(seed)

    def text():
        drawn = rng.integers(0, vocab_size - 1, text_len)
        return drawn + (drawn >= image_token_id)            # any token but the image token

    parts = [part for _ in range(n_images) for part in (text(), np.full(image_tokens, image_token_id))]
    ids = np.concatenate([*parts, text()]).astype(np.int64)
    return ids, rng.standard_normal((n_images, 3, image_size, image_size), dtype=np.float32)


def engine_processor(folder, manifest: dict):
    """The export's processor: the runtime's own for kind 'default' (no torch), transformers' for
    kind 'hf' (needs the full install)."""
    from cspkv.runtime.processor import PROCESSOR_KIND, Processor

    spec = manifest["processor"]
    if spec["kind"] == PROCESSOR_KIND:
        return Processor(folder, spec)
    try:
        from cspkv.export.exporter import load_processor
    except ImportError as exc:
        raise click.ClickException(f"this export's processor (kind {spec['kind']!r}) runs through transformers, "
                                   f"which this install lacks ({exc}): pip install 'cspkv[full]'") from None
    return load_processor(folder, manifest)


def _run_engine(folder, images, prompt, max_new_tokens, eviction, given):
    from cspkv.engines.onnx_runtime import OnnxPipeline
    from cspkv.runtime.manifest import ManifestError, read_manifest

    try:
        refuse_export_overrides(read_manifest(folder, verify_hashes=False)["plan"], given)
        pipeline = OnnxPipeline(folder, eviction=eviction)
    except (ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    manifest = pipeline.manifest
    plan = manifest["plan"]
    n_images = len(images) if images else 4
    if n_images * plan["image_tokens"] > plan["max_prompt"]:
        raise click.ClickException(
            f"{n_images} images take {n_images} x {plan['image_tokens']} = {n_images * plan['image_tokens']} prompt "
            f"tokens, but this export takes at most {plan['max_prompt']} (plan.max_prompt): use fewer images or "
            "re-export with a larger --max-prompt")
    spec = manifest["processor"]
    try:
        if spec is None:
            if images or prompt:
                raise click.UsageError("this export has no processor (tiny model): --image/--prompt need a real model")
            model = manifest["model"]
            ids, pixels = synthetic_prompt(4, model["image_token_id"], plan["image_tokens"], plan["image_size"],
                                           model["vocab_size"])
            decode, eos = str, None
        else:
            from cspkv.models.prompting import chat_prompt, demo_images, demo_question
            from cspkv.runtime.processor import load_images

            processor = engine_processor(pipeline.engine.folder, manifest)
            size = plan["image_size"]
            pictures = load_images(images, size, spec.get("resize_filter", "bilinear")) if images \
                else demo_images(size)
            inputs = processor(text=chat_prompt(processor, prompt or demo_question(), len(pictures)),
                               images=pictures, return_tensors="np")
            ids, pixels = np.asarray(inputs["input_ids"][0]), np.asarray(inputs["pixel_values"], np.float32)
            tokenizer = getattr(processor, "tokenizer", processor)
            eos = tokenizer.eos_token_id
            decode = lambda token: tokenizer.decode([token], skip_special_tokens=True)  # noqa: E731
        result = pipeline.generate(ids, pixels, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   on_token=lambda token: click.echo(decode(token) + ("" if spec else " "), nl=False))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo()
    click.echo(f"[{manifest['model'].get('id', folder)}] {result.summary()}", err=True)


if __name__ == "__main__":
    main()
