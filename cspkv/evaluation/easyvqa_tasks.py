"""A seeded multi-image benchmark built from easy-VQA images, in the spirit of MileBench.

The images and their colour and shape labels come from :mod:`cspkv.data.easyvqa` (224x224, so every
image becomes 256 visual tokens for the default model); the prompt format from
:mod:`cspkv.models.prompting`; how replies are read and scored is :mod:`cspkv.evaluation.answers`.

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
option text. Samples are generated from a seed alone (:func:`generate_samples`), so the test set is fixed:
``test_samples()`` gives 200 prompts per task from the test split; training prompts come from the
train split only (``generate_samples(task, n, split="train", ...)``) and never share an image with
the test split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cspkv.data.easyvqa import COLORS, SHAPES, check_split, load_image, load_labels
from cspkv.models.prompting import chat_text, image_line, option_letter, question_text

MULTIPLE_CHOICE_TASKS = ("image_needle", "counting", "attribute", "comparison", "text_needle")
OPEN_ENDED_TASKS = ("describe",)
TASKS = MULTIPLE_CHOICE_TASKS + OPEN_ENDED_TASKS
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


class UnknownTaskError(ValueError):
    """A task name that is not one of :data:`TASKS`."""


def check_task(task: str) -> None:
    if task not in TASKS:
        raise UnknownTaskError(f"unknown easy-vqa task {task!r}; known tasks: {', '.join(TASKS)}")


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


# --------------------------------------------------------------------------------------------
# One builder per task. Each draws from ``rng`` in a fixed order (changing the order changes every
# prompt of the test set) and returns the parts of a TaskSample that differ between tasks.
# --------------------------------------------------------------------------------------------

@dataclass
class _Draw:
    """A task's prompt before it becomes a TaskSample."""

    ids: list[int]
    question: str
    choices: tuple[str, ...] | None
    answer: str
    answer_text: str
    target: tuple[int, ...] = ()
    needle: tuple[int, str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class _Ask:
    """What a builder draws from: the generator, the labelled pool, the image count, and the
    attribute (colour or shape) drawn for every prompt first."""

    rng: random.Random
    labels: dict
    pool: list[int]
    n_images: int
    attribute: str

    @property
    def attr_index(self) -> int:
        return 0 if self.attribute == "colour" else 1

    @property
    def values(self) -> tuple[str, ...]:
        return COLORS if self.attribute == "colour" else SHAPES

    def pick(self, pred, k: int) -> list[int]:
        candidates = [i for i in self.pool if pred(self.labels[i])]
        if len(candidates) < k:
            raise RuntimeError("easy-vqa pool too small for the requested sample")
        return self.rng.sample(candidates, k)

    def options(self, correct: str, distractors: list[str], n_options: int) -> tuple[tuple[str, ...], str]:
        options = [correct] + self.rng.sample(distractors, min(n_options - 1, len(distractors)))
        self.rng.shuffle(options)
        return tuple(options), option_letter(options.index(correct))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _image_needle(a: _Ask) -> _Draw:
    color, shape = a.rng.choice(COLORS), a.rng.choice(SHAPES)
    hit = a.pick(lambda l: l == (color, shape), 1)
    rest = a.pick(lambda l: l != (color, shape), a.n_images - 1)
    position = a.rng.randrange(a.n_images)
    others = [str(k) for k in range(1, a.n_images + 1) if k != position + 1]
    choices, answer = a.options(str(position + 1), others, 4)
    return _Draw(rest[:position] + hit + rest[position:], f"Which image shows the {color} {shape}?", choices,
                 answer, str(position + 1), (position + 1,))


def _counting(a: _Ask) -> _Draw:
    value = a.rng.choice(a.values)
    count = a.rng.randint(0, min(a.n_images, 6))
    has = a.pick(lambda l: l[a.attr_index] == value, count)
    hasnt = a.pick(lambda l: l[a.attr_index] != value, a.n_images - count)
    ids = has + hasnt
    a.rng.shuffle(ids)
    thing = f"a {value} shape" if a.attribute == "colour" else f"{_article(value)} {value}"
    others = [str(c) for c in range(0, a.n_images + 1) if c != count and abs(c - count) <= 4]
    choices, answer = a.options(str(count), others, 4)
    target = tuple(k + 1 for k, i in enumerate(ids) if a.labels[i][a.attr_index] == value)
    return _Draw(ids, f"How many images show {thing}?", choices, answer, str(count), target,
                 meta={"attribute_index": a.attr_index, "value": value})


def _attribute(a: _Ask) -> _Draw:
    ids = a.rng.sample(a.pool, a.n_images)
    k = a.rng.randrange(a.n_images)
    correct = a.labels[ids[k]][a.attr_index]
    question = (f"What colour is the shape in image {k + 1}?" if a.attribute == "colour"
                else f"What shape is in image {k + 1}?")
    choices, answer = a.options(correct, [v for v in a.values if v != correct], 4)
    return _Draw(ids, question, choices, answer, correct, (k + 1,))


def _comparison(a: _Ask) -> _Draw:
    first_at, second_at = sorted(a.rng.sample(range(a.n_images), 2))
    same = a.rng.random() < 0.5
    first = a.pick(lambda l: True, 1)[0]
    value = a.labels[first][a.attr_index]
    second = next(i for i in a.pick(lambda l: (l[a.attr_index] == value) == same, 2) if i != first)
    rest = [i for i in a.rng.sample(a.pool, a.n_images + 2) if i not in (first, second)][: a.n_images - 2]
    ids = rest[:first_at] + [first] + rest[first_at:second_at - 1] + [second] + rest[second_at - 1:]
    choices = ("yes", "no")
    answer_text = "yes" if same else "no"
    return _Draw(ids, f"Do image {first_at + 1} and image {second_at + 1} show the same {a.attribute}?", choices,
                 option_letter(choices.index(answer_text)), answer_text, (first_at + 1, second_at + 1),
                 meta={"attribute_index": a.attr_index})


def _text_needle(a: _Ask) -> _Draw:
    ids = a.rng.sample(a.pool, a.n_images)
    word = a.rng.choice(CODE_WORDS)
    needle = (a.rng.randrange(1, a.n_images), f"The code word is {word}.")
    choices, answer = a.options(word, [w for w in CODE_WORDS if w != word], 4)
    return _Draw(ids, "What is the code word?", choices, answer, word, needle=needle,
                 meta={"needle_after_image": needle[0]})


def _describe(a: _Ask) -> _Draw:
    ids = a.rng.sample(a.pool, a.n_images)
    k = a.rng.randrange(a.n_images)
    color, shape = a.labels[ids[k]]
    reference = f"a {color} {shape}"
    return _Draw(ids, f"Describe image {k + 1} in a few words.", None, reference, reference, (k + 1,))


_BUILDERS = {"image_needle": _image_needle, "counting": _counting, "attribute": _attribute,
             "comparison": _comparison, "text_needle": _text_needle, "describe": _describe}


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
    ask = _Ask(rng, labels, pool, n_images, rng.choice(("colour", "shape")))
    draw = _BUILDERS[task](ask)
    return TaskSample(task=task, split=split, sample_id=sample_id, image_ids=tuple(draw.ids),
                      labels=tuple(labels[i] for i in draw.ids),
                      context=_context(n_images, rng if draw.needle else None, draw.needle),
                      question=draw.question, choices=draw.choices, answer=draw.answer,
                      answer_text=draw.answer_text, target_images=draw.target, meta=draw.meta)


def generate_samples(task: str, n: int, split: str = "test", seed: int = TEST_SEED,
                     min_images: int = MIN_IMAGES, max_images: int = MAX_IMAGES) -> list[TaskSample]:
    """``n`` prompts of one task from one split; the same arguments always give the same prompts.

    Each sample draws its own generator from (seed, task, index), so sample i does not depend on
    n. ``min_images``/``max_images`` default to the benchmark's 4-16; training prompts may use fewer
    (``comparison`` and ``text_needle`` need at least 2, the other tasks 1). Raises
    :class:`UnknownTaskError` (naming the task) for a task not in :data:`TASKS`.
    """
    check_task(task)
    check_split(split)
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

# The development split: prompts over train-split images, for choosing settings (rho, n, the recent
# cap, each baseline's own knobs) without looking at the test prompts. Its seed differs from every
# training conversation's, whose generators are seeded "conversation:<seed>".
DEV_SEED = 20261208
EVAL_SPLITS = ("test", "dev")


def dev_samples(task: str, n: int) -> list[TaskSample]:
    """The first ``n`` development prompts of ``task``: the test set's format on train-split images."""
    return generate_samples(task, n, split="train", seed=DEV_SEED)


def eval_samples(task: str, n: int, split: str = "test") -> list[TaskSample]:
    """``test_samples`` or ``dev_samples`` by name."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; use 'test' or 'dev' (train-split images)")
    return test_samples(task, n) if split == "test" else dev_samples(task, n)


def prompt_text(sample: TaskSample) -> str:
    """The user message: images, question, and for multiple choice the lettered options."""
    return sample.context + "\n" + question_text(sample.question, sample.choices)


def build_prompt(sample: TaskSample, processor, system: str | None = None, images=None) -> dict:
    """``input_ids`` / ``attention_mask`` / ``pixel_values`` of a sample for the default model, in its
    chat template (:func:`cspkv.models.prompting.chat_text`). ``images`` overrides the loaded images
    (e.g. blanked ones)."""
    text = chat_text(getattr(processor, "tokenizer", processor), prompt_text(sample), system)
    if images is None:
        images = [load_image(sample.split, i) for i in sample.image_ids]
    return dict(processor(text=text, images=list(images), return_tensors="pt"))
