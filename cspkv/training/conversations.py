"""Training conversations for the default model: several benchmark-style questions over one image set.

The costly part of a training step is the 256 tokens of every image; the questions are short. So
one step shows 2-8 train-split images once and then asks several questions about them as chat
turns, each answer supervised. The first turn is exactly the benchmark's prompt format
(:func:`cspkv.evaluation.easyvqa_tasks.prompt_text`); later turns repeat only the question and its
options. Multiple-choice answers are the option's text (see :attr:`Question.target`). Questions use the benchmark's own phrasings and option rules, over train-split images
only (the test split is never read here).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from cspkv.data.easyvqa import COLORS, SHAPES
from cspkv.evaluation.answers import comparison_steps, count_steps, needle_steps, worked_reply
from cspkv.evaluation.easyvqa_tasks import CODE_WORDS, FILLER
from cspkv.models.prompting import CONTEXT_FORMAT, IMAGE_TOKEN, SYSTEM_PROMPT, image_line, option_letter, question_text

QUESTION_MIX = (  # (kind, weight)
    ("attribute", 0.26),
    ("image_needle", 0.20),
    ("counting", 0.18),
    ("comparison", 0.16),
    ("describe", 0.10),
    ("text_needle", 0.10),
)


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    choices: tuple[str, ...] | None
    answer: str          # option letter, or the reference text for describe
    steps: str | None = None  # a worked reply's reading before ", so " (cspkv.evaluation.answers.WORKED_TASKS)

    @property
    def target(self) -> str:
        """What the model is trained to reply: the option's text ("red", "3", "yes"), not its letter,
        after the worked steps when there are some ("image 2 red, image 5 blue, so no").

        The benchmark's scorer accepts either (as MileBench's does); naming the option directly
        spares a 135M model the extra hop from the answer to its letter, which 150 steps of
        letter targets did not learn (training accuracy stayed at chance).
        """
        text = self.answer if self.choices is None else self.choices[ord(self.answer) - 65]
        return text if self.steps is None else worked_reply(self.steps, text)

    def user_text(self) -> str:
        return question_text(self.question, self.choices)


@dataclass(frozen=True)
class Conversation:
    image_ids: tuple[int, ...]
    context: str
    questions: tuple[Question, ...]
    code_word: str | None


def _options(rng: random.Random, correct: str, distractors: list[str], n: int = 4) -> tuple[tuple[str, ...], str]:
    options = [correct] + rng.sample(distractors, min(n - 1, len(distractors)))
    rng.shuffle(options)
    return tuple(options), option_letter(options.index(correct))


def _count_question(rng: random.Random, labels: list[tuple[str, str]], a: int, value: str) -> Question:
    n = len(labels)
    count = sum(label[a] == value for label in labels)
    thing = f"a {value} shape" if a == 0 else f"{'an' if value[0] in 'aeiou' else 'a'} {value}"
    others = [str(c) for c in range(0, n + 1) if c != count and abs(c - count) <= 4]
    return Question("counting", f"How many images show {thing}?", *_options(rng, str(count), others),
                    steps=count_steps(labels, a, value))


ANSWER_MIXES = ("benchmark", "natural")
REPLY_STYLES = ("worked", "direct")


def _question(kind: str, rng: random.Random, labels: list[tuple[str, str]], code_word: str | None,
              answers: str = "benchmark") -> Question | None:
    n = len(labels)
    attribute = rng.choice(("colour", "shape"))
    a = 0 if attribute == "colour" else 1
    values = COLORS if attribute == "colour" else SHAPES
    if kind == "attribute":
        k = rng.randrange(n)
        correct = labels[k][a]
        question = (f"What colour is the shape in image {k + 1}?" if a == 0 else f"What shape is in image {k + 1}?")
        return Question(kind, question, *_options(rng, correct, [v for v in values if v != correct]))
    if kind == "image_needle":
        unique = [k for k in range(n) if labels.count(labels[k]) == 1]
        if not unique or n < 2:
            return None
        k = rng.choice(unique)
        color, shape = labels[k]
        others = [str(j) for j in range(1, n + 1) if j != k + 1]
        return Question(kind, f"Which image shows the {color} {shape}?", *_options(rng, str(k + 1), others),
                        steps=needle_steps(labels, k))
    if kind == "counting":
        return _count_question(rng, labels, a, rng.choice(values))
    if kind == "comparison":
        if n < 2:
            return None
        if answers == "benchmark":  # "yes" half the time, as in the benchmark (random pairs: ~25%)
            want_same = rng.random() < 0.5
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)
                     if (labels[i][a] == labels[j][a]) == want_same]
            if not pairs:
                return None
            i, j = rng.choice(pairs)
        else:
            i, j = sorted(rng.sample(range(n), 2))
        same = labels[i][a] == labels[j][a]
        return Question(kind, f"Do image {i + 1} and image {j + 1} show the same {attribute}?", ("yes", "no"),
                        "A" if same else "B", steps=comparison_steps(labels, a, i, j))
    if kind == "text_needle":
        if code_word is None:
            return None
        return Question(kind, "What is the code word?",
                        *_options(rng, code_word, [w for w in CODE_WORDS if w != code_word]))
    if kind == "describe":
        k = rng.randrange(n)
        color, shape = labels[k]
        return Question(kind, f"Describe image {k + 1} in a few words.", None, f"a {color} {shape}")
    raise ValueError(f"unknown question kind {kind!r}")


def make_conversation(seed, pool: list[int], labels: dict, min_images: int = 3, max_images: int = 10,
                      n_questions: tuple[int, int] = (4, 8), needle_prob: float = 0.3,
                      context_format: str = CONTEXT_FORMAT, answers: str = "benchmark",
                      replies: str = "worked") -> Conversation:
    """One seeded conversation over train-split images ``pool`` (``labels``: id -> (colour, shape)).

    ``context_format`` is how each image line is written (:func:`cspkv.models.prompting.image_line`).
    ``answers="benchmark"`` gives answers the benchmark's distribution: comparison "yes" half the
    time, and counting only through the set's drawn count (uniform 0..min(n, 6)). ``"natural"``
    (what steps 1-700 of the committed weights saw) asks about random pairs and values, so 74% of
    comparisons are "no" and more than half the counts are 0 or 1: a prior alone scores well there.
    ``replies="worked"`` trains needle, counting and comparison answers written out image by
    image (:func:`cspkv.evaluation.answers.worked_reply`); ``"direct"`` (steps 1-700) trains the bare option.
    Only re-running those early steps needs anything but the defaults."""
    if answers not in ANSWER_MIXES:
        raise ValueError(f"answers must be one of {ANSWER_MIXES}, got {answers!r}")
    if replies not in REPLY_STYLES:
        raise ValueError(f"replies must be one of {REPLY_STYLES}, got {replies!r}")
    rng = random.Random(f"conversation:{seed}")
    n = rng.randint(min_images, max_images)
    focus = None
    if rng.random() < 0.5:
        # Half the sets are drawn like the benchmark's counting prompts (a count uniform in
        # 0..min(n, 6) of one value); random sets would almost always count 0 or 1.
        a = rng.randrange(2)
        value = rng.choice(COLORS if a == 0 else SHAPES)
        count = rng.randint(0, min(n, 6))
        has = rng.sample([i for i in pool if labels[i][a] == value], count)
        hasnt = rng.sample([i for i in pool if labels[i][a] != value], n - count)
        ids = has + hasnt
        rng.shuffle(ids)
        focus = (a, value)
    else:
        ids = rng.sample(pool, n)
    image_labels = [labels[i] for i in ids]
    code_word = None
    lines = []
    needle_after = rng.randrange(1, n) if n >= 2 and rng.random() < needle_prob else None
    if needle_after is not None:
        code_word = rng.choice(CODE_WORDS)
    for k in range(1, n + 1):  # the benchmark's context layout (easyvqa_tasks._context)
        lines.append(image_line(k, context_format))
        if needle_after == k:
            lines.append(f"The code word is {code_word}.")
        elif needle_after is not None:
            lines.append(rng.choice(FILLER))
    questions: list[Question] = []
    wanted = rng.randint(*n_questions)
    if code_word is not None:  # the needle's question always comes, at a random turn
        questions.append(_question("text_needle", rng, image_labels, code_word))
    if focus is not None:
        questions.append(_count_question(rng, image_labels, *focus))
    skip = ("text_needle", "counting") if answers == "benchmark" else ("text_needle",)
    kinds, weights = zip(*[(k, w) for k, w in QUESTION_MIX if k not in skip])
    for _ in range(8 * wanted):  # bounded: small sets may offer few distinct questions
        if len(questions) >= wanted:
            break
        q = _question(rng.choices(kinds, weights=weights)[0], rng, image_labels, code_word, answers)
        if q is not None and all(q.question != other.question for other in questions):
            questions.append(q)
    rng.shuffle(questions)
    if replies == "direct":
        questions = [dataclasses.replace(q, steps=None) for q in questions]
    else:
        # One worked question per conversation, asked last: a second one, or an attribute
        # question after it, could copy image readings from an earlier reply instead of reading
        # the images, a shortcut the benchmark's single question never offers.
        worked = [q for q in questions if q.steps is not None]
        if worked:
            kinds = sorted({q.kind for q in worked})  # counting only comes with half the sets: favoured
            kind = rng.choices(kinds, weights=[2 if k == "counting" else 1 for k in kinds])[0]
            keep = next(q for q in worked if q.kind == kind)
            questions = [q for q in questions if q.steps is None] + [keep]
    return Conversation(tuple(ids), "\n".join(lines), tuple(questions), code_word)


def conversation_tokens(conversation: Conversation, tokenizer, image_tokens: int) -> tuple[list[int], list[bool]]:
    """Token ids of the whole chat (``<image>`` expanded) and a per-token flag: is it a supervised answer token.

    Mirrors the ChatML template turn by turn, so the first turn's prompt tokens equal what
    :func:`cspkv.evaluation.easyvqa_tasks.build_prompt` gives the benchmark.
    """
    def encode(text: str) -> list[int]:
        return tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens), add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    supervised: list[bool] = []
    newline = encode("\n")
    for turn, q in enumerate(conversation.questions):
        user = (conversation.context + "\n" if turn == 0 else "") + q.user_text()
        head = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n" if turn == 0 else "") + \
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        piece = encode(head)
        ids += piece
        supervised += [False] * len(piece)
        answer = encode(q.target + "<|im_end|>")
        ids += answer
        supervised += [True] * len(answer)
        ids += newline
        supervised += [False] * len(newline)
    return ids, supervised
