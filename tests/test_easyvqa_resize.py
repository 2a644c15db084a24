"""easy-vqa's numpy bilinear resize equals torch's interpolate(bilinear, align_corners=False) + round +
clamp, pixel for pixel: the images the default model was trained on, without torch at run time."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from cspkv.data import easyvqa
from cspkv.data.easyvqa import _fma, upscale


def torch_upscale(image: np.ndarray, size: int) -> np.ndarray:
    """torch's bilinear resize, rounded and clamped to uint8."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture
def torch_threads():
    """torch's multi-threaded kernel (with one thread it runs another, off by 1 on a few pixels)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("split", easyvqa.SPLITS)
def test_upscale_equals_torch_on_easyvqa_images(split, torch_threads):
    paths = easyvqa.image_paths(split)
    ids = sorted(paths)[::len(paths) // 120][:120]          # 120 images spread over the split
    for image_id in ids:
        with Image.open(paths[image_id]) as im:
            image = np.array(im.convert("RGB"))
        mine, theirs = upscale(image, 224), torch_upscale(image, 224)
        assert mine.dtype == np.uint8 and mine.shape == (224, 224, 3)
        assert np.array_equal(mine, theirs), f"{split} image {image_id}: {(mine != theirs).sum()} pixels differ"


@pytest.mark.parametrize("shape,size", [((64, 64, 3), 224), ((10, 37, 3), 224), ((64, 64, 3), 28), ((64, 64, 3), 64), ((20, 30, 3), 50),
                                        ((224, 224, 3), 224), ((3, 5, 3), 17)])
def test_upscale_equals_torch_on_random_images_of_other_sizes(shape, size, torch_threads):
    image = np.random.default_rng(sum(shape) + size).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(upscale(image, size), torch_upscale(image, size))


def _round_to_float32(value: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even)."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(c.view(np.int32)) & 1))


def test_fma_rounds_once():
    """a * b + c with one rounding: a separate float32 product and sum would lose the low bits."""
    a = np.array([1 + 2.0 ** -12], np.float32)
    c = np.array([-(1 + 2.0 ** -11)], np.float32)
    assert _fma(a, a, c)[0] == np.float32(2.0 ** -24)          # exact: (1 + 2^-12)^2 - (1 + 2^-11)
    assert (a * a + c)[0] == 0                                  # the float32 product loses the 2^-24
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(2000).astype(np.float32) for _ in range(2))
    z = (-x * y * (1 + rng.standard_normal(2000) * 1e-6)).astype(np.float32)   # cancellation: low bits matter
    exact = [_round_to_float32(Fraction(float(p)) * Fraction(float(q)) + Fraction(float(r))) for p, q, r in zip(x, y, z)]
    assert np.array_equal(_fma(x, y, z), np.array(exact, np.float32))
