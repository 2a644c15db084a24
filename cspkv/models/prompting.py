"""The prompt format the default model was trained on, image files as model inputs, and the
built-in demo.

A prompt is a system message and one user message in the tokenizer's chat template. The user
message lists the images, each written ``Image k: <image> (end of image k)``, then the question and,
for multiple choice, lettered options. Training, evaluation, csp-run and the benchmarks all build
their prompts here, so the model sees at test time exactly what it learned on.
"""

from __future__ import annotations

import numpy as np

from cspkv.data.easyvqa import load_image, load_labels
from cspkv.runtime.processor import load_images as read_images

IMAGE_TOKEN = "<image>"
# How image files are brought to the model's image size (Pillow's filter; exports record it).
RESIZE_FILTER = "bilinear"
# The system message of every training conversation and benchmark prompt (and csp-run's prompts).
SYSTEM_PROMPT = "You answer questions about images."
CONTEXT_FORMATS = ("labelled", "prefix")
CONTEXT_FORMAT = "labelled"  # the benchmark's (see image_line)
# The built-in demo: the first easy-vqa *test* image (never trained on) of each of these labels.
DEMO_LABELS = (("red", "rectangle"), ("blue", "circle"), ("green", "triangle"), ("yellow", "rectangle"))


def image_line(k: int, context_format: str = CONTEXT_FORMAT) -> str:
    """How image ``k`` (1-based) enters the prompt.

    ``labelled`` (the benchmark's format) names the image before and after its tokens. The
    trailing label sits right after the image, so its tokens can gather what the image shows; a
    question that starts from content ("which image shows the red triangle?") then finds the
    image's number next to that content. With the number only in front (``prefix``, the format the
    first 380 training steps used), the 256 image tokens themselves have to carry their number,
    and the default model never learned that (image_needle stayed at chance).
    """
    if context_format == "prefix":
        return f"Image {k}: {IMAGE_TOKEN}"
    if context_format == "labelled":
        return f"Image {k}: {IMAGE_TOKEN} (end of image {k})"
    raise ValueError(f"unknown context format {context_format!r}; use one of {CONTEXT_FORMATS}")


def option_letter(index: int) -> str:
    if not 0 <= index < 26:
        raise ValueError(f"option index must be in 0..25, got {index}")
    return chr(65 + index)


def question_text(question: str, choices) -> str:
    """The question and, for multiple choice, the lettered options."""
    parts = [f"Question: {question}"]
    if choices is not None:
        parts.append("Options:\n" + "\n".join(f"{option_letter(i)}. {c}" for i, c in enumerate(choices)))
        parts.append("Answer with the option's letter.")
    return "\n".join(parts)


def chat_text(tokenizer, user: str, system: str | None = None) -> str:
    """``user`` after the system message in the tokenizer's chat template, ending with the assistant
    turn's header so the next token is the answer; without a template, plain text ending in
    "Answer:"."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system or SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (system + "\n" if system else "") + user + "\nAnswer:"


def chat_prompt(processor, question: str, n_images: int) -> str:
    """``question`` about ``n_images`` images, one placeholder each (the processor's image token)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    placeholder = getattr(processor, "image_token", IMAGE_TOKEN)
    content = "".join(image_line(i + 1).replace(IMAGE_TOKEN, placeholder) + "\n" for i in range(n_images)) + question
    return chat_text(tokenizer, content)


def load_images(paths, size: int) -> list[np.ndarray]:
    """Read image files as size x size RGB uint8 arrays (Pillow), resized with ``RESIZE_FILTER``."""
    return read_images(paths, size, RESIZE_FILTER)


def demo_images(size: int = 224) -> list[np.ndarray]:
    """Four easy-vqa test images, size x size: a red rectangle, a blue circle, a green triangle
    and a yellow rectangle (``DEMO_LABELS``), as the default model sees the benchmark's images."""
    labels = load_labels("test")
    ids = [min(i for i, label in labels.items() if label == wanted) for wanted in DEMO_LABELS]
    return [np.array(load_image("test", image_id, size)) for image_id in ids]


def demo_question() -> str:
    """The benchmark's image_needle wording; the blue circle is image 2 of :func:`demo_images`."""
    return question_text("Which image shows the blue circle?", ("1", "2", "3", "4"))
