"""Reading and scoring replies to the easy-vqa tasks: option letters, worked replies, ROUGE-L.

The default model answers image_needle, counting and comparison with a *worked reply*: it reads
the images one by one, then answers after ", so " (``image 3 red, image 7 blue, so no``). A 135M
model learns "what colour is image k" but not to search all images for one (needle), to hold two
images' attributes at once (comparison) or to count across images in one token; written out, each
step is an attribute read it can do. It also makes pruning matter for these tasks: every token after
the first is decoded from the pruned cache, while a one-token answer comes from the full prefill.
"""

from __future__ import annotations

import re

from cspkv.evaluation.easyvqa_tasks import TaskSample
from cspkv.evaluation.rouge import rouge_l_f
from cspkv.models.prompting import option_letter

WORKED_TASKS = ("image_needle", "counting", "comparison")
ANSWER_MARK = ", so "
_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[\s.):,]|$)")
_WORKED_START = re.compile(r"^\s*image \d+ [a-z]")


def extract_choice(text: str, choices) -> str | None:
    """The option letter a reply names: a leading letter ("B", "B.", "(B) ...") or an option's exact text."""
    letters = [option_letter(i) for i in range(len(choices))]
    found = _LETTER.match(text)
    if found and found.group(1) in letters:
        return found.group(1)
    reply = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    hits = [letters[i] for i, c in enumerate(choices) if str(c).lower() in reply]
    if len(hits) == 1:
        return hits[0]
    if reply and reply[0].upper() in letters and len(reply[0]) == 1:
        return reply[0].upper()
    return None


def needle_steps(labels, target: int) -> str:
    """Images read in order up to and including the one asked for (0-based ``target``)."""
    return ", ".join(f"image {k + 1} {colour} {shape}" for k, (colour, shape) in enumerate(labels[: target + 1]))


def count_steps(labels, attribute_index: int, value: str) -> str:
    """Every image's attribute, each match followed by the running count in brackets."""
    steps, count = [], 0
    for k, label in enumerate(labels):
        step = f"image {k + 1} {label[attribute_index]}"
        if label[attribute_index] == value:
            count += 1
            step += f" ({count})"
        steps.append(step)
    return ", ".join(steps)


def comparison_steps(labels, attribute_index: int, first: int, second: int) -> str:
    """The two images' attribute (0-based indices)."""
    return ", ".join(f"image {k + 1} {labels[k][attribute_index]}" for k in (first, second))


def worked_reply(steps: str, answer: str) -> str:
    return f"{steps}{ANSWER_MARK}{answer}"


def final_answer(reply: str) -> str:
    """The part of a reply after its last ", so "; all of it when it is not a worked reply; ""
    for a worked reply cut off before its ", so " (its steps name image numbers and colours,
    which must not count as an answer)."""
    if ANSWER_MARK in reply:
        return reply.rsplit(ANSWER_MARK, 1)[-1]
    return "" if _WORKED_START.match(reply) else reply


def worked_answer(sample: TaskSample) -> str | None:
    """The worked reply the default model is trained to give for ``sample`` (None: answered directly)."""
    if sample.task not in WORKED_TASKS:
        return None
    if sample.task == "image_needle":
        steps = needle_steps(sample.labels, sample.target_images[0] - 1)
    elif sample.task == "counting":
        steps = count_steps(sample.labels, sample.meta["attribute_index"], sample.meta["value"])
    else:
        first, second = (k - 1 for k in sample.target_images)
        steps = comparison_steps(sample.labels, sample.meta["attribute_index"], first, second)
    return worked_reply(steps, sample.answer_text)


def score(sample: TaskSample, prediction: str) -> float:
    """1/0 accuracy for multiple choice (letter or exact option text, after a worked reply's
    ", so "), ROUGE-L F for open-ended.

    ROUGE-L compares lower-cased text; an empty reply scores 0 (the ROUGE package would raise).
    """
    if sample.choices is None:
        hypothesis = prediction.strip().lower()
        if not hypothesis.replace(".", "").strip():
            return 0.0
        return rouge_l_f(hypothesis, sample.answer.lower())
    return float(extract_choice(final_answer(prediction), sample.choices) == sample.answer)
