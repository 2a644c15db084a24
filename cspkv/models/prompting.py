"""Turning images and a question into model inputs, and the built-in demo images."""

from __future__ import annotations

import numpy as np


def chat_prompt(processor, question: str, n_images: int) -> str:
    """The question with one image placeholder per image, in the tokenizer's chat template.

    Images are written as the benchmark writes them (``Image k: <image> (end of image k)``), after
    the benchmark's system message: the layout the default model was trained on."""
    from cspkv.evaluation.easyvqa_tasks import IMAGE_TOKEN, SYSTEM_PROMPT, image_line

    tokenizer = getattr(processor, "tokenizer", processor)
    placeholder = getattr(processor, "image_token", IMAGE_TOKEN)
    content = "".join(image_line(i + 1).replace(IMAGE_TOKEN, placeholder) + "\n" for i in range(n_images)) + question
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
        except IsADirectoryError:
            raise ValueError(f"{path} is a folder, not an image file") from None
        except (OSError, Image.DecompressionBombError) as exc:  # truncated or corrupt image data
            raise ValueError(f"{path} cannot be decoded as an image ({exc}): pass an intact PNG or JPEG") from None
    return images


# The built-in demo: the first easy-vqa *test* image (never trained on) of each of these labels.
DEMO_LABELS = (("red", "rectangle"), ("blue", "circle"), ("green", "triangle"), ("yellow", "rectangle"))


def demo_images(size: int = 224) -> list[np.ndarray]:
    """Four easy-vqa test images, size x size: a red rectangle, a blue circle, a green triangle
    and a yellow rectangle (``DEMO_LABELS``), as the default model sees the benchmark's images."""
    from cspkv.evaluation.easyvqa_tasks import load_image, load_labels

    labels = load_labels("test")
    ids = [min(i for i, label in labels.items() if label == wanted) for wanted in DEMO_LABELS]
    return [np.array(load_image("test", image_id, size)) for image_id in ids]
