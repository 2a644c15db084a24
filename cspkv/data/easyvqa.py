"""easy-VQA's images and labels (PyPI ``easy-vqa``, MIT).

4,000 train / 1,000 test 64x64 PNGs, each showing one shape (circle, rectangle, triangle) in one of
eight colours on a noisy light background. Its questions give every image's colour and shape (read
off by :func:`load_labels`; the ~10% of images whose questions do not pin both down are left out).
Images are upscaled to 224x224 (bilinear, numpy) for the default model's DINOv2 tower.
"""

from __future__ import annotations

import functools
import re

import numpy as np

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


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` rounded once to float32, as a fused multiply-add computes it. The float32 product is
    exact in float64; the float64 sum is rounded to odd (TwoSum gives its error), which makes the final
    rounding to float32 exact."""
    product = a.astype(np.float64) * b.astype(np.float64)
    addend = np.broadcast_to(c, product.shape).astype(np.float64)
    total = product + addend
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)
    even = (total.view(np.int64) & 1) == 0
    total = np.where((error != 0) & even, np.nextafter(total, np.copysign(np.inf, error)), total)
    return total.astype(np.float32)


def _taps(n_in: int, n_out: int):
    """Per output pixel, the two source pixels and their weights of a bilinear resize with half-pixel
    centres (align_corners=False), in float32 as torch's CPU kernel computes them."""
    f = np.float32
    centres = np.arange(n_out, dtype=f) + f(0.5)
    source = np.maximum(_fma(np.full(n_out, f(n_in) / f(n_out), f), centres, np.full(n_out, f(-0.5))), f(0))
    first = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    weight = np.clip(source - first.astype(f), f(0), f(1))
    return first, first + (first < n_in - 1), f(1) - weight, weight


def upscale(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize of an HxWx3 uint8 image to size x size with numpy.

    Equal, pixel for pixel, to ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    then round and clamp, as torch's multi-threaded CPU kernels (built with FMA) compute it, in float32
    throughout (tests/test_easyvqa_resize.py compares them). torch picks its kernel by output size:
    above 128 output rows + columns, each two-tap sum ``p * w0 + q * w1`` is ``fma(p, w0, q * w1)``,
    across a row first, then between rows; up to 128, the four taps are summed at once with the
    weights' products. (On one thread torch always runs the second, which differs from the first by 1
    on about 11 pixels of a 224 x 224 image.)"""
    rows0, rows1, h0, h1 = _taps(image.shape[0], size)
    cols0, cols1, w0, w1 = _taps(image.shape[1], size)
    x = np.asarray(image).astype(np.float32)
    w0, w1, h0, h1 = w0[None, :, None], w1[None, :, None], h0[:, None, None], h1[:, None, None]
    if 2 * size > 128:
        across = _fma(x[:, cols0], w0, x[:, cols1] * w1)   # every source row, resized across
        out = _fma(across[rows0], h0, across[rows1] * h1)
    else:
        top, bottom = x[rows0], x[rows1]
        out = _fma(top[:, cols0], h0 * w0, top[:, cols1] * (h0 * w1))
        out = _fma(bottom[:, cols1], h1 * w1, _fma(bottom[:, cols0], h1 * w0, out))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


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
