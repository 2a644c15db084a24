"""easy-VQA's images and labels (PyPI ``easy-vqa``, MIT).

4,000 train / 1,000 test 64x64 PNGs, each showing one shape (circle, rectangle, triangle) in one of
eight colours on a noisy light background. Its questions give every image's colour and shape (read
off by :func:`load_labels`; the ~10% of images whose questions do not pin both down are left out).
Images are upscaled to 224x224 (bilinear) for the default model's DINOv2 tower.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import torch

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
SPLITS = ("train", "test")
IMAGE_SIZE = 224


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown easy-vqa split {split!r}; use 'train' or 'test'")


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError("the easy-vqa tasks need the PyPI package 'easy-vqa': pip install easy-vqa==1.0") from exc
    return easy_vqa


@functools.lru_cache(maxsize=None)
def load_labels(split: str) -> dict[int, tuple[str, str]]:
    """``{image_id: (colour, shape)}`` for the images whose easy-VQA questions determine both.

    A question naming an attribute answers it directly ("what color is the shape?" -> red,
    "what is the blue shape?" -> blue + its answer) or says yes/no to it ("is there not a red
    shape?"); an attribute is known when it is named positively or all but one value is excluded.
    """
    check_split(split)
    evqa = _easy_vqa()
    questions, answers, image_ids = (evqa.get_train_questions if split == "train" else evqa.get_test_questions)()
    vocab = set(COLORS) | set(SHAPES)
    positive: dict[int, set] = {}
    negative: dict[int, set] = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        words = [w for w in re.findall(r"[a-z]+", question) if w in vocab]
        pos, neg = positive.setdefault(image_id, set()), negative.setdefault(image_id, set())
        if answer in vocab:
            pos.add(answer)
            pos.update(words)
        elif answer in ("yes", "no") and len(words) == 1:
            negated = " not " in f" {question} " or question.startswith("is no ")
            (pos if (answer == "yes") != negated else neg).add(words[0])
    labels = {}
    for image_id in sorted(positive):
        attrs = []
        for values in (COLORS, SHAPES):
            named = positive[image_id] & set(values)
            candidates = named or (set(values) - negative[image_id])
            if len(candidates) != 1 or named & negative[image_id]:
                break
            attrs.append(next(iter(candidates)))
        else:
            labels[image_id] = (attrs[0], attrs[1])
    return labels


@functools.lru_cache(maxsize=None)
def image_paths(split: str) -> dict[int, str]:
    """``{image_id: PNG path}`` of one split."""
    evqa = _easy_vqa()
    return (evqa.get_train_image_paths if split == "train" else evqa.get_test_image_paths)()


def upscale(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize of an HxWx3 uint8 image to size x size (torch, no torchvision)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@functools.lru_cache(maxsize=4096)
def load_image(split: str, image_id: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One easy-VQA image as a size x size x 3 uint8 array (Pillow reads the PNG)."""
    check_split(split)
    from PIL import Image

    with Image.open(image_paths(split)[image_id]) as im:
        array = np.array(im.convert("RGB"))
    out = upscale(array, size)
    out.flags.writeable = False  # cached: callers share it
    return out
