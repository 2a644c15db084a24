"""A seeded multi-image benchmark built from easy-VQA images, in the spirit of MileBench.

easy-VQA (PyPI ``easy-vqa``, MIT) ships 4,000 train / 1,000 test 64x64 PNGs, each showing one
shape (circle, rectangle, triangle) in one of eight colours on a noisy light background. Its
questions give every image's colour and shape (read off by :func:`load_labels`; the ~10% of
images whose questions do not pin both down are left out of the pools). Images are upscaled to
224x224 (bilinear) for the default model's DINOv2 tower, so every image becomes 256 visual tokens.

Every prompt holds 4-16 images, each written as ``Image k: <image> (end of image k)``. The tasks,
and which few visual tokens each answer depends on (what a KV-cache pruner must keep):

``image_needle`` (multiple choice)
    "Which image shows the red triangle?", options are image numbers. Exactly one image matches,
    so the answer lives in the 256 tokens of that one image (in practice the ~40-80 foreground
    patches of the shape); every other image is a distractor that only has to be told apart.
``counting`` (multiple choice)
    "How many images show a circle?" (or "a blue shape"), options are counts. The answer is spread
    over every image: one or a few shape patches in *each* of the 4-16 images must survive, and
    losing any one image's foreground changes the count by one.
``attribute`` (multiple choice)
    "What colour is the shape in image 3?" / "What shape is in image 3?". Only image k's tokens
    matter, the shape's foreground patches (colour) or its outline patches (shape).
``comparison`` (multiple choice, yes/no)
    "Do image 2 and image 5 show the same shape?" (or colour). Depends on the foreground tokens of
    exactly two images; the other images are irrelevant.
``text_needle`` (multiple choice)
    "What is the code word?": a sentence "The code word is X." sits between two images. The
    answer depends on a handful of *text* tokens buried among image tokens and on no visual
    token at all: it checks that pruning does not sacrifice text for images.
``describe`` (open-ended, ROUGE-L)
    "Describe image k in a few words.", reference "a red triangle". Depends on image k's
    foreground tokens, like ``attribute`` but both attributes at once and free-form.

Multiple-choice prompts list lettered options (``A. ...``) and expect the letter, or the exact
option text; :func:`extract_choice` reads either and :func:`score` scores a prediction. Samples are
generated from a seed alone (:func:`generate_samples`), so the test set is fixed:
``test_samples()`` gives 200 prompts per task from the test split; training prompts come from the
train split only (``generate_samples(task, n, split="train", ...)``) and never share an image with
the test split.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from cspkv.evaluation.rouge import rouge_l_f

__all__ = [
    "COLORS",
    "SHAPES",
    "TASKS",
    "MULTIPLE_CHOICE_TASKS",
    "OPEN_ENDED_TASKS",
    "TaskSample",
    "UnknownTaskError",
    "build_prompt",
    "extract_choice",
    "generate_samples",
    "image_line",
    "load_image",
    "load_labels",
    "option_letter",
    "prompt_text",
    "score",
    "test_samples",
]

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
MULTIPLE_CHOICE_TASKS = ("image_needle", "counting", "attribute", "comparison", "text_needle")
OPEN_ENDED_TASKS = ("describe",)
TASKS = MULTIPLE_CHOICE_TASKS + OPEN_ENDED_TASKS
SPLITS = ("train", "test")
IMAGE_TOKEN = "<image>"
CONTEXT_FORMATS = ("labelled", "prefix")
CONTEXT_FORMAT = "labelled"  # the benchmark's (see image_line)
IMAGE_SIZE = 224
# The system message of every training conversation and benchmark prompt (and csp-run's prompts).
SYSTEM_PROMPT = "You answer questions about images."
MIN_IMAGES, MAX_IMAGES = 4, 16
TEST_SEED = 20240601
TEST_SAMPLES_PER_TASK = 200
CODE_WORDS = (
    "falcon", "harbor", "violet", "granite", "maple", "comet", "lantern", "meadow", "orbit",
    "pepper", "quartz", "saddle", "timber", "walnut", "zephyr", "anchor", "biscuit", "canyon",
    "dolphin", "ember", "fossil", "glacier", "hammock", "island", "jigsaw", "kettle", "lizard",
    "marble", "nectar", "oyster", "puzzle", "riddle", "salmon", "tulip", "velvet", "willow",
)
FILLER = (
    "Here is the next picture.",
    "Another picture follows.",
    "Look at this one as well.",
    "The pictures continue below.",
    "This picture comes next.",
)
_TASK_SALT = {task: i for i, task in enumerate(TASKS)}


class UnknownTaskError(ValueError):
    """A task name that is not one of :data:`TASKS`."""


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise UnknownTaskError(f"unknown easy-vqa task {task!r}; known tasks: {', '.join(TASKS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown easy-vqa split {split!r}; use 'train' or 'test'")


def option_letter(index: int) -> str:
    if not 0 <= index < 26:
        raise ValueError(f"option index must be in 0..25, got {index}")
    return chr(65 + index)


# --------------------------------------------------------------------------------------------
# Labels and images
# --------------------------------------------------------------------------------------------


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
    _check_split(split)
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
def _image_paths(split: str) -> dict[int, str]:
    evqa = _easy_vqa()
    return (evqa.get_train_image_paths if split == "train" else evqa.get_test_image_paths)()


def upscale(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize of an HxWx3 uint8 image to size x size (torch, no torchvision)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@functools.lru_cache(maxsize=4096)
def load_image(split: str, image_id: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One easy-VQA image as a size x size x 3 uint8 array (needs Pillow to read the PNG)."""
    _check_split(split)
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise ImportError("reading easy-vqa PNGs needs Pillow: pip install pillow") from exc
    with Image.open(_image_paths(split)[image_id]) as im:
        array = np.array(im.convert("RGB"))
    out = upscale(array, size)
    out.flags.writeable = False  # cached: callers share it
    return out


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSample:
    """One prompt and what is needed to score it.

    ``context`` holds one ``<image>`` per entry of ``image_ids`` (and, for ``text_needle``, the
    code-word sentence); ``answer`` is the option letter for multiple-choice tasks and the
    reference text for open-ended ones; ``answer_text`` is always the plain answer.
    ``target_images`` are the 1-based numbers of the images the answer depends on.
    """

    task: str
    split: str
    sample_id: str
    image_ids: tuple[int, ...]
    labels: tuple[tuple[str, str], ...]
    context: str
    question: str
    choices: tuple[str, ...] | None
    answer: str
    answer_text: str
    target_images: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def question_type(self) -> str:
        return "multi-choice" if self.choices is not None else "open-ended"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: random.Random, pool: list[int], labels: dict, pred, k: int) -> list[int]:
    candidates = [i for i in pool if pred(labels[i])]
    if len(candidates) < k:
        raise RuntimeError("easy-vqa pool too small for the requested sample")
    return rng.sample(candidates, k)


def _mc(rng: random.Random, correct: str, distractors: list[str], n_options: int) -> tuple[tuple[str, ...], str]:
    options = [correct] + rng.sample(distractors, min(n_options - 1, len(distractors)))
    rng.shuffle(options)
    return tuple(options), option_letter(options.index(correct))


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


def _context(n_images: int, rng: random.Random | None = None, needle: tuple[int, str] | None = None) -> str:
    lines = []
    for k in range(1, n_images + 1):
        lines.append(image_line(k))
        if needle is not None and needle[0] == k:
            lines.append(needle[1])
        elif needle is not None and rng is not None:
            lines.append(rng.choice(FILLER))
    return "\n".join(lines)


def _make_sample(task: str, rng: random.Random, split: str, labels: dict, pool: list[int],
                 n_images: int, sample_id: str) -> TaskSample:
    attribute = rng.choice(("colour", "shape"))
    attr_index = 0 if attribute == "colour" else 1
    values = COLORS if attribute == "colour" else SHAPES
    target: tuple[int, ...] = ()
    needle = None
    meta: dict = {}

    if task == "image_needle":
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        hit = _pick(rng, pool, labels, lambda l: l == (color, shape), 1)
        rest = _pick(rng, pool, labels, lambda l: l != (color, shape), n_images - 1)
        position = rng.randrange(n_images)
        ids = rest[:position] + hit + rest[position:]
        question = f"Which image shows the {color} {shape}?"
        others = [str(k) for k in range(1, n_images + 1) if k != position + 1]
        choices, answer = _mc(rng, str(position + 1), others, 4)
        answer_text, target = str(position + 1), (position + 1,)
    elif task == "counting":
        value = rng.choice(values)
        count = rng.randint(0, min(n_images, 6))
        has = _pick(rng, pool, labels, lambda l: l[attr_index] == value, count)
        hasnt = _pick(rng, pool, labels, lambda l: l[attr_index] != value, n_images - count)
        ids = has + hasnt
        rng.shuffle(ids)
        thing = f"a {value} shape" if attribute == "colour" else f"{_article(value)} {value}"
        question = f"How many images show {thing}?"
        others = [str(c) for c in range(0, n_images + 1) if c != count and abs(c - count) <= 4]
        choices, answer = _mc(rng, str(count), others, 4)
        answer_text = str(count)
        target = tuple(k + 1 for k, i in enumerate(ids) if labels[i][attr_index] == value)
        meta.update(attribute_index=attr_index, value=value)
    elif task == "attribute":
        ids = rng.sample(pool, n_images)
        k = rng.randrange(n_images)
        correct = labels[ids[k]][attr_index]
        question = (f"What colour is the shape in image {k + 1}?" if attribute == "colour"
                    else f"What shape is in image {k + 1}?")
        choices, answer = _mc(rng, correct, [v for v in values if v != correct], 4)
        answer_text, target = correct, (k + 1,)
    elif task == "comparison":
        a, b = sorted(rng.sample(range(n_images), 2))
        same = rng.random() < 0.5
        first = _pick(rng, pool, labels, lambda l: True, 1)[0]
        value = labels[first][attr_index]
        second = _pick(rng, pool, labels,
                       lambda l: (l[attr_index] == value) == same, 2)
        second = next(i for i in second if i != first)
        rest = [i for i in rng.sample(pool, n_images + 2) if i not in (first, second)][: n_images - 2]
        ids = rest[:a] + [first] + rest[a:b - 1] + [second] + rest[b - 1:]
        question = f"Do image {a + 1} and image {b + 1} show the same {attribute}?"
        choices = ("yes", "no")
        answer_text = "yes" if same else "no"
        answer, target = option_letter(choices.index(answer_text)), (a + 1, b + 1)
        meta["attribute_index"] = attr_index
    elif task == "text_needle":
        ids = rng.sample(pool, n_images)
        word = rng.choice(CODE_WORDS)
        needle = (rng.randrange(1, n_images), f"The code word is {word}.")
        question = "What is the code word?"
        choices, answer = _mc(rng, word, [w for w in CODE_WORDS if w != word], 4)
        answer_text = word
        meta["needle_after_image"] = needle[0]
    elif task == "describe":
        ids = rng.sample(pool, n_images)
        k = rng.randrange(n_images)
        color, shape = labels[ids[k]]
        question = f"Describe image {k + 1} in a few words."
        choices, answer_text, target = None, f"a {color} {shape}", (k + 1,)
        answer = answer_text
    else:  # pragma: no cover - _check_task ran first
        raise AssertionError(task)

    return TaskSample(task=task, split=split, sample_id=sample_id, image_ids=tuple(ids),
                      labels=tuple(labels[i] for i in ids), context=_context(n_images, rng if needle else None, needle),
                      question=question, choices=choices, answer=answer, answer_text=answer_text,
                      target_images=target, meta=meta)


def generate_samples(task: str, n: int, split: str = "test", seed: int = TEST_SEED,
                     min_images: int = MIN_IMAGES, max_images: int = MAX_IMAGES) -> list[TaskSample]:
    """``n`` prompts of one task from one split; the same arguments always give the same prompts.

    Each sample draws its own generator from (seed, task, index), so sample i does not depend on
    n. ``min_images``/``max_images`` default to the benchmark's 4-16; training prompts may use fewer
    (``comparison`` and ``text_needle`` need at least 2, the other tasks 1). Raises
    :class:`UnknownTaskError` (naming the task) for a task not in :data:`TASKS`.
    """
    _check_task(task)
    _check_split(split)
    if not 1 <= min_images <= max_images <= 64:
        raise ValueError(f"need 1 <= min_images <= max_images <= 64, got {min_images}, {max_images}")
    if task in ("comparison", "text_needle") and min_images < 2:
        raise ValueError(f"task {task!r} needs at least 2 images per prompt")
    labels = load_labels(split)
    pool = sorted(labels)
    samples = []
    for index in range(n):
        rng = random.Random(f"{seed}:{task}:{index}")
        n_images = rng.randint(min_images, max_images)
        samples.append(_make_sample(task, rng, split, labels, pool, n_images, f"{split}-{task}-{seed}-{index}"))
    return samples


def test_samples(task: str, n: int = TEST_SAMPLES_PER_TASK) -> list[TaskSample]:
    """The fixed test set: the first ``n`` (default 200) test-split prompts of ``task``."""
    return generate_samples(task, n, split="test", seed=TEST_SEED)


test_samples.__test__ = False  # not a pytest test


# --------------------------------------------------------------------------------------------
# Prompts and scoring
# --------------------------------------------------------------------------------------------


def question_text(question: str, choices) -> str:
    """The question and, for multiple choice, the lettered options: one wording for training and
    evaluation, so the trained model sees at test time exactly what it learned on."""
    parts = [f"Question: {question}"]
    if choices is not None:
        parts.append("Options:\n" + "\n".join(f"{option_letter(i)}. {c}" for i, c in enumerate(choices)))
        parts.append("Answer with the option's letter.")
    return "\n".join(parts)


def prompt_text(sample: TaskSample) -> str:
    """The user message: images, question, and for multiple choice the lettered options."""
    return sample.context + "\n" + question_text(sample.question, sample.choices)


def build_prompt(sample: TaskSample, processor, system: str | None = None, images=None) -> dict:
    """``input_ids`` / ``attention_mask`` / ``pixel_values`` for the default model.

    Uses the tokenizer's chat template when it has one (SmolLM2-Instruct's ChatML; a short system
    message replaces its default one), ending with the assistant turn's header so the next token
    is the answer. ``images`` overrides the loaded images (e.g. blanked ones).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    user = prompt_text(sample)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system or SYSTEM_PROMPT},
                    {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (system + "\n" if system else "") + user + "\nAnswer:"
    if images is None:
        images = [load_image(sample.split, i) for i in sample.image_ids]
    return dict(processor(text=text, images=list(images), return_tensors="pt"))


_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[\s.):,]|$)")


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


# Worked replies: the default model reads images one at a time, then answers
# --------------------------------------------------------------------------------------------
# A 135M model learns "what colour is image k" but not to search all images for one (needle),
# to hold two images' attributes at once (comparison) or to count across images in one token.
# Trained to write its reading out ("image 3 red, image 7 blue, so no"), each step is the
# attribute read it can do. It also makes pruning matter for these tasks: every token after the
# first is decoded from the pruned cache, while a one-token answer comes from the full prefill.
WORKED_TASKS = ("image_needle", "counting", "comparison")
ANSWER_MARK = ", so "


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


_WORKED_START = re.compile(r"^\s*image \d+ [a-z]")


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
