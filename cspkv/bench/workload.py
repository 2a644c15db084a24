"""Benchmark prompts of an exact token length: images first (one per 512 tokens, up to 16), then a
filler passage, then the question, so every length has the same shape of content."""

from __future__ import annotations

import numpy as np
import torch

from cspkv.models.prompting import chat_prompt, demo_images
from cspkv.models.tiny import multi_image_prompt

MAX_IMAGES = 16
FILLER = ("The museum keeps its maps in a cool dry room. Visitors may ask to see them on weekday "
          "mornings, and the archivist explains how each one was drawn and restored. ")
QUESTION = "Describe the images in order, one sentence each."


def images_for(length: int) -> int:
    return max(1, min(MAX_IMAGES, length // 512))


def _splice(ids: np.ndarray, filler: np.ndarray, image_token: int, length: int) -> np.ndarray:
    """Insert filler tokens after the last image token until the prompt has ``length`` tokens."""
    missing = length - len(ids)
    if missing < 0:
        raise ValueError(f"a {length}-token benchmark prompt cannot hold {images_for(length)} images "
                         f"and the question ({len(ids)} tokens): use a longer length")
    reps = -(-missing // max(1, len(filler)))
    padding = np.tile(filler, reps)[:missing]
    cut = int(np.flatnonzero(ids == image_token).max()) + 1
    return np.concatenate([ids[:cut], padding, ids[cut:]]).astype(np.int64)


def bench_prompt(model, processor, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [length] int64, pixel_values [n_images, 3, H, W] float32) for ``model``."""
    image_token = model.config.image_token_id
    n_images = images_for(length)
    if processor is None:                                  # the tiny random model: synthetic tokens
        ids, pixels = multi_image_prompt(n_images, seed=length)
        filler = np.arange(2, 90, dtype=np.int64)          # below the tiny model's image token (99)
        return _splice(ids[0].numpy(), filler, image_token, length), pixels.numpy()
    size = getattr(processor, "image_size", None) or model.config.vision_config.image_size
    demo = demo_images(size)
    pictures = [demo[i % len(demo)] for i in range(n_images)]
    encoded = processor(images=pictures, text=chat_prompt(processor, QUESTION, n_images), return_tensors="pt")
    tokenizer = getattr(processor, "tokenizer", processor)
    filler = np.asarray(tokenizer(FILLER, add_special_tokens=False)["input_ids"], np.int64)
    ids = encoded["input_ids"][0].numpy()
    pixels = encoded["pixel_values"]
    pixels = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    return _splice(ids, filler, image_token, length), pixels.astype(np.float32)
