#!/usr/bin/env python
"""Train the default model's LLaVA projector on easy-VQA *train-split* prompts (CPU, seeded).

Only ``multi_modal_projector`` (Linear-GELU-Linear, ~0.55 M parameters) is trained; the DINOv2
tower and SmolLM2 stay frozen (no LoRA). Two phases, both on train-split images only:

1. alignment (a few minutes): the projector is regressed (MSE) onto word embeddings of the
   frozen LM, patch by patch: patches covered by the shape -> the colour word (" red"), background
   patches -> the shape word (" triangle"). An image then reads to the LM roughly like
   "triangle triangle red red ...", which a 135M LM can use with almost no end-to-end steps.
2. end-to-end (the rest of the wall clock): next-token loss on the answer tokens of 1-3 image
   prompts in the benchmark's own format (``cspkv.evaluation.easyvqa_tasks``, train split),
   gradients flowing through the frozen LM into the projector.

The projector is written (fp32, ~2.2 MB, atomically) to ``cspkv/models/weights/projector.safetensors``
after phase 1 and then every ``--ckpt-minutes``, and at the end. Everything is seeded: alignment
runs a fixed number of steps and end-to-end step i always sees the same prompt, so a run stopped
by the clock is a prefix of the same run; ``--max-steps`` reproduces it exactly. Run e.g.::

    nohup python scripts/train_projector.py --minutes 40 > /tmp/train_projector.log 2>&1 &
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cspkv.evaluation import easyvqa_tasks as ev  # noqa: E402
from cspkv.models import default_model as dm  # noqa: E402

TRAIN_MIX = (  # (task, weight, min_images, max_images)
    ("attribute", 0.30, 1, 3),
    ("describe", 0.15, 1, 2),
    ("image_needle", 0.15, 2, 3),
    ("comparison", 0.15, 2, 3),
    ("counting", 0.17, 2, 3),
    ("text_needle", 0.08, 2, 2),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_base_model():
    """The default model with its *untrained* (seeded-init) projector, whatever projector file exists."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.UntrainedProjectorWarning)
        model, processor = dm.load_default_model()
    trained = dm.init_projector(model.model.multi_modal_projector, Path("/nonexistent/projector.safetensors"))
    assert not trained
    return model.eval(), processor


def save_projector(projector, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().float().contiguous().clone() for k, v in projector.state_dict().items()}
    save_file(state, str(tmp), metadata={"trained_by": "scripts/train_projector.py"})
    os.replace(tmp, path)


class FeatureCache:
    """Frozen DINOv2 patch features ([256, 384], fp16) per train image, computed on demand."""

    def __init__(self, model, processor, split: str = "train"):
        self.model, self.processor, self.split = model, processor, split
        self.cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def get(self, ids) -> torch.Tensor:
        missing = [i for i in dict.fromkeys(ids) if i not in self.cache]
        for start in range(0, len(missing), 8):
            chunk = missing[start:start + 8]
            pixels = self.processor.preprocess_images([ev.load_image(self.split, i) for i in chunk])
            hidden = self.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
            for i, h in zip(chunk, hidden):
                self.cache[i] = h.to(torch.float16)
        return torch.stack([self.cache[i] for i in ids]).float()


def foreground_mask(image_id: int) -> torch.Tensor:
    """[256] bool: patches (14x14 of the 224 image) mostly covered by the shape."""
    image = ev.load_image("train", image_id).astype(np.int32)
    background = np.median(image.reshape(-1, 3), axis=0)
    fg = np.abs(image - background).sum(-1) > 90
    frac = fg.reshape(16, 14, 16, 14).mean(axis=(1, 3))
    return torch.from_numpy(frac.reshape(-1) > 0.5)


def word_ids(tokenizer) -> dict[str, int]:
    # First token of " word" (" teal" is " te" + "al"; its first piece stands in for it).
    return {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ev.COLORS + ev.SHAPES}


def align(model, processor, feats: FeatureCache, args) -> None:
    labels = ev.load_labels("train")
    rng = random.Random(args.seed)
    ids = rng.sample(sorted(labels), args.align_images + 64)
    train_ids, val_ids = ids[:-64], ids[-64:]
    embed = model.get_input_embeddings().weight.detach()
    wid = word_ids(processor.tokenizer)

    def batch(id_list):
        x = feats.get(id_list)
        targets = []
        for i in id_list:
            color, shape = labels[i]
            mask = foreground_mask(i)
            targets.append(torch.where(mask, wid[color], wid[shape]))
        return x, torch.stack(targets)

    log(f"align: extracting features of {len(ids)} train images")
    t0 = time.time()
    xs, ts = [], []
    for s in range(0, len(train_ids), 32):
        x, t = batch(train_ids[s:s + 32])
        xs.append(x)
        ts.append(t)
    x_train, t_train = torch.cat(xs), torch.cat(ts)
    x_val, t_val = batch(val_ids)
    color_ids = torch.tensor([wid[c] for c in ev.COLORS])
    log(f"align: features done in {time.time() - t0:.0f}s; "
        f"foreground patch fraction {torch.isin(t_train, color_ids).float().mean():.2f}")
    projector = model.model.multi_modal_projector
    opt = torch.optim.Adam(projector.parameters(), lr=args.align_lr)
    gen = torch.Generator().manual_seed(args.seed)
    step, t0 = 0, time.time()
    embed_norm = embed.norm(dim=-1, keepdim=True)
    while step < args.align_steps and time.time() - t0 < args.align_minutes * 60:
        perm = torch.randperm(len(x_train), generator=gen)
        for s in range(0, len(perm), 16):
            idx = perm[s:s + 16]
            out = projector(x_train[idx])
            loss = ((out - embed[t_train[idx]]) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                with torch.no_grad():
                    pv = projector(x_val)
                    vloss = ((pv - embed[t_val]) ** 2).sum(-1).mean()
                    words = torch.tensor(sorted(wid.values()))
                    near = (pv @ (embed[words] / embed_norm[words]).T).argmax(-1)
                    acc = (words[near] == t_val).float().mean()
                log(f"align step {step} loss {loss.item():.4f} val {vloss.item():.4f} "
                    f"val nearest-word acc {acc.item():.3f}")
            if step >= args.align_steps or time.time() - t0 > args.align_minutes * 60:
                break


def make_training_example(step: int, args, processor):
    rng = random.Random(f"{args.seed}:mix:{step}")
    task, _, lo, hi = rng.choices(TRAIN_MIX, weights=[m[1] for m in TRAIN_MIX])[0]
    sample = ev.generate_samples(task, 1, split="train", seed=args.seed * 1_000_003 + step,
                                 min_images=lo, max_images=hi)[0]
    tokenizer = processor.tokenizer
    messages = [{"role": "system", "content": "You answer questions about images."},
                {"role": "user", "content": ev.prompt_text(sample)}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Multiple choice: the letter alone is the target (what follows it, "A. circle" or "A", is
    # scored the same). Open-ended: the reference text and <|im_end|>, so replies stop.
    answer = sample.answer if sample.choices is not None else sample.answer + tokenizer.eos_token
    expanded = prompt.replace(ev.IMAGE_TOKEN, ev.IMAGE_TOKEN * processor.num_image_tokens)
    p_ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return sample, torch.tensor([p_ids + a_ids]), len(p_ids)


def end_to_end(model, processor, feats: FeatureCache, args, deadline: float, ckpt) -> None:
    projector = model.model.multi_modal_projector
    embed_layer = model.get_input_embeddings()
    lm = model.model.language_model
    opt = torch.optim.Adam(projector.parameters(), lr=args.lr)
    image_token = processor.image_token_id
    step, window, per_task = 0, [], {}
    while time.time() < deadline and (args.max_steps is None or step < args.max_steps):
        sample, ids, n_prompt = make_training_example(step, args, processor)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            embeds = embed_layer(ids)
        image_feats = projector(feats.get(list(sample.image_ids))).reshape(-1, embeds.shape[-1])
        mask = (ids == image_token)[0]
        embeds = embeds.clone()
        embeds[0, mask] = image_feats
        hidden = lm(inputs_embeds=embeds).last_hidden_state
        logits = model.lm_head(hidden[0, n_prompt - 1:-1])
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, n_prompt:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(loss.item())
        per_task.setdefault(sample.task, []).append(loss.item())
        if step % args.log_every == 0:
            tasks = " ".join(f"{t}={np.mean(v[-20:]):.3f}" for t, v in sorted(per_task.items()))
            log(f"e2e step {step} loss(last {len(window)}) {np.mean(window):.4f} lr {lr:.1e} | {tasks}")
            window = []
        ckpt(step)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget for everything")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on end-to-end steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--align-images", type=int, default=384)
    parser.add_argument("--align-steps", type=int, default=650, help="alignment steps (16 images each)")
    parser.add_argument("--align-minutes", type=float, default=10.0, help="safety cap on alignment time")
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--skip-align", action="store_true")
    parser.add_argument("--init", type=Path, default=None, help="start from this projector file")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=int, default=10, help="linear lr warm-up steps")
    parser.add_argument("--ckpt-minutes", type=float, default=8.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=dm.PROJECTOR_PATH)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    start = time.time()
    deadline = start + args.minutes * 60
    log(f"args {vars(args)}")
    model, processor = load_base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    if args.init is not None:
        dm.init_projector(projector, args.init)
        log(f"initialised projector from {args.init}")
    for p in projector.parameters():
        p.requires_grad_(True)
    log(f"model loaded in {time.time() - start:.0f}s; projector params "
        f"{sum(p.numel() for p in projector.parameters())}")
    feats = FeatureCache(model, processor)
    if not args.skip_align:
        align(model, processor, feats, args)
    save_projector(projector, args.out)
    log(f"checkpoint ({'initial' if args.skip_align else 'after alignment'}) -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    last = [time.time()]

    def ckpt(step: int) -> None:
        if time.time() - last[0] >= args.ckpt_minutes * 60:
            save_projector(projector, args.out)
            last[0] = time.time()
            log(f"checkpoint step {step} -> {args.out}")

    end_to_end(model, processor, feats, args, deadline, ckpt)
    save_projector(projector, args.out)
    log(f"final checkpoint -> {args.out}; total {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
