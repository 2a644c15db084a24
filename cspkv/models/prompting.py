"""Turning images and a question into model inputs, and the built-in demo images."""

from __future__ import annotations

import numpy as np


def chat_prompt(processor, question: str, n_images: int) -> str:
    """The question with one image placeholder per image, in the tokenizer's chat template.

    Images are written as the benchmark writes them (``Image k: <image> (end of image k)``), the
    layout the default model was trained on."""
    from cspkv.evaluation.easyvqa_tasks import IMAGE_TOKEN, image_line

    tokenizer = getattr(processor, "tokenizer", processor)
    placeholder = getattr(processor, "image_token", IMAGE_TOKEN)
    content = "".join(image_line(i + 1).replace(IMAGE_TOKEN, placeholder) + "\n" for i in range(n_images)) + question
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content


def load_images(paths, size: int) -> list[np.ndarray]:
    """Read image files as size x size RGB uint8 arrays (Pillow), resizing with bilinear filtering."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)))
        except FileNotFoundError:
            raise ValueError(f"image {path} does not exist") from None
        except UnidentifiedImageError:
            raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG, ...)") from None
    return images


def demo_images(size: int = 224) -> list[np.ndarray]:
    """Four synthetic images: a red square, a blue circle, a green triangle, a yellow square."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    shapes = [
        ((220, 30, 30), (abs(xx - 0.5) < 0.25) & (abs(yy - 0.5) < 0.25)),
        ((30, 60, 220), (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.09),
        ((30, 180, 60), (yy > 0.25) & (yy < 0.75) & (abs(xx - 0.5) < (yy - 0.25) / 2)),
        ((230, 210, 40), (abs(xx - 0.5) < 0.2) & (abs(yy - 0.5) < 0.2)),
    ]
    images = []
    for colour, mask in shapes:
        image = np.full((size, size, 3), 255, np.uint8)
        image[mask] = colour
        images.append(image)
    return images
