"""Fast checks of the easy-VQA multi-image task generator (no model needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("easy_vqa")

from cspkv.evaluation import easyvqa_tasks as ev  # noqa: E402
from cspkv.evaluation import answers  # noqa: E402
from cspkv.data import easyvqa  # noqa: E402
from cspkv.models import prompting  # noqa: E402

N = 200  # the fixed test set's size per task


@pytest.fixture(scope="module")
def test_sets():
    return {task: ev.test_samples(task, N) for task in ev.TASKS}


def test_deterministic_for_a_seed():
    for task in ev.TASKS:
        a = ev.generate_samples(task, 8, split="train", seed=3)
        b = ev.generate_samples(task, 8, split="train", seed=3)
        assert a == b
        assert [s.meta for s in a] == [s.meta for s in b]
        c = ev.generate_samples(task, 8, split="train", seed=4)
        assert [s.image_ids for s in a] != [s.image_ids for s in c]
        # sample i does not depend on how many are drawn
        assert ev.generate_samples(task, 3, split="train", seed=3) == a[:3]


def test_test_set_is_fixed_and_large_enough(test_sets):
    for task, samples in test_sets.items():
        assert len(samples) == N
        assert len({s.sample_id for s in samples}) == N
        assert samples[:5] == ev.test_samples(task, 5)


def test_splits_never_share_images(test_sets):
    train_labels, test_labels = easyvqa.load_labels("train"), easyvqa.load_labels("test")
    assert len(train_labels) > 3000 and len(test_labels) > 800
    paths = {split: easyvqa.image_paths(split) for split in easyvqa.SPLITS}
    used_test = {i for samples in test_sets.values() for s in samples for i in s.image_ids}
    for samples in test_sets.values():
        assert all(s.split == "test" and set(s.image_ids) <= set(test_labels) for s in samples)
    train_samples = ev.generate_samples("attribute", 50, split="train", seed=0)
    assert all(s.split == "train" and set(s.image_ids) <= set(train_labels) for s in train_samples)
    # Different files, and no test image's bytes occur among the train images.
    test_files = {Path(paths["test"][i]).resolve() for i in used_test}
    train_files = {Path(p).resolve() for p in paths["train"].values()}
    assert not test_files & train_files
    train_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in train_files}
    assert not {hashlib.sha256(p.read_bytes()).hexdigest() for p in test_files} & train_hashes


def test_image_counts_within_bounds(test_sets):
    for samples in test_sets.values():
        counts = [s.n_images for s in samples]
        assert min(counts) >= ev.MIN_IMAGES and max(counts) <= ev.MAX_IMAGES
        assert len(set(counts)) > 5  # the whole range is used
        for s in samples:
            assert ev.prompt_text(s).count(prompting.IMAGE_TOKEN) == s.n_images == len(s.labels)
            assert len(set(s.image_ids)) == s.n_images


def test_answer_to_letter_mapping(test_sets):
    for task in ev.MULTIPLE_CHOICE_TASKS:
        letters = []
        for s in test_sets[task]:
            assert len(set(s.choices)) == len(s.choices) >= 2
            assert s.choices[ord(s.answer) - ord("A")] == s.answer_text
            text = ev.prompt_text(s)
            assert f"\n{s.answer}. {s.answer_text}\n" in text + "\n"
            letters.append(s.answer)
            assert answers.score(s, s.answer) == 1.0
            assert answers.score(s, f"{s.answer}. {s.answer_text}") == 1.0
            assert answers.score(s, s.answer_text) == 1.0
            wrong = next(c for c in s.choices if c != s.answer_text)
            assert answers.score(s, wrong) == 0.0
        assert len(set(letters)) >= 2, f"{task}: the answer letter never varies"
    assert prompting.option_letter(0) == "A" and prompting.option_letter(3) == "D"
    assert answers.extract_choice("(C) three", ["1", "2", "3"]) == "C"
    assert answers.extract_choice("nothing useful", ["red", "blue"]) is None


def test_answers_consistent_with_labels(test_sets):
    for s in test_sets["image_needle"]:
        color, shape = s.question.removeprefix("Which image shows the ").rstrip("?").split()
        hits = [k + 1 for k, lab in enumerate(s.labels) if lab == (color, shape)]
        assert hits == [int(s.answer_text)] == list(s.target_images)
    for s in test_sets["counting"]:
        thing = s.question.removeprefix("How many images show ").rstrip("?").split()
        word = thing[1]
        index = 0 if word in easyvqa.COLORS else 1
        assert word in (easyvqa.COLORS if index == 0 else easyvqa.SHAPES)
        assert int(s.answer_text) == sum(lab[index] == word for lab in s.labels)
    for s in test_sets["attribute"]:
        k = int(s.question.rstrip("?").split()[-1])
        index = 0 if "colour" in s.question else 1
        assert s.answer_text == s.labels[k - 1][index] and s.target_images == (k,)
    for s in test_sets["comparison"]:
        a, b = s.target_images
        assert f"image {a} and image {b}" in s.question
        index = 0 if s.question.endswith("colour?") else 1
        assert s.answer_text == ("yes" if s.labels[a - 1][index] == s.labels[b - 1][index] else "no")
    assert 0.3 < np.mean([s.answer_text == "yes" for s in test_sets["comparison"]]) < 0.7
    for s in test_sets["text_needle"]:
        text = ev.prompt_text(s)
        assert text.count("The code word is") == 1
        assert f"The code word is {s.answer_text}." in text
    for s in test_sets["describe"]:
        (k,) = s.target_images
        assert s.choices is None and s.answer == "a {} {}".format(*s.labels[k - 1])
        assert answers.score(s, s.answer) == pytest.approx(1.0)


def test_labels_agree_with_easy_vqa_answers():
    import easy_vqa

    labels = easyvqa.load_labels("test")
    questions, answers, ids = easy_vqa.get_test_questions()
    for q, a, i in zip(questions, answers, ids):
        if i not in labels:
            continue
        if q == "what color is the shape?":
            assert a == labels[i][0]
        elif q.startswith("what shape"):
            assert a == labels[i][1]


def test_unknown_task_is_named():
    with pytest.raises(ev.UnknownTaskError, match="image_neddle"):
        ev.generate_samples("image_neddle", 3)
    with pytest.raises(ValueError, match="validation"):
        ev.generate_samples("attribute", 3, split="validation")
    with pytest.raises(ValueError, match="at least 2"):
        ev.generate_samples("comparison", 1, split="train", min_images=1, max_images=1)


class _StubTokenizer:
    chat_template = None


class _StubProcessor:
    tokenizer = _StubTokenizer()

    def __call__(self, text, images, return_tensors):
        return {"text": text, "n_images": len(images)}


def test_build_prompt_without_chat_template():
    s = ev.test_samples("attribute", 1)[0]
    images = [np.zeros((224, 224, 3), np.uint8)] * s.n_images
    out = ev.build_prompt(s, _StubProcessor(), images=images)
    assert out["n_images"] == s.n_images
    assert out["text"].endswith("Answer:") and s.question in out["text"]


def _parse_steps(reply: str) -> tuple[list[tuple[int, list[str]]], str]:
    """A worked reply split into (image number, words read) steps and the final answer."""
    steps, answer = reply.split(", so ")
    parsed = []
    for step in steps.split(", "):
        words = step.split()
        assert words[0] == "image"
        parsed.append((int(words[1]), words[2:]))
    return parsed, answer


def test_worked_answers_read_the_right_images_and_score(test_sets):
    """The worked reply the default model is trained on, checked against the labels alone."""
    for task in answers.WORKED_TASKS:
        for sample in test_sets[task][:60]:
            reply = answers.worked_answer(sample)
            steps, answer = _parse_steps(reply)
            assert answer == sample.answer_text == answers.final_answer(reply)
            assert answers.score(sample, reply) == 1.0
            for k, words in steps:  # every step reads its own image's label
                label = sample.labels[k - 1]
                assert [w for w in words if not w.startswith("(")] in ([label[0]], [label[1]], list(label))
            if task == "image_needle":
                assert [k for k, _ in steps] == list(range(1, int(answer) + 1))
                assert [tuple(w) for _, w in steps].count(sample.labels[int(answer) - 1]) == 1
            elif task == "counting":
                assert [k for k, _ in steps] == list(range(1, sample.n_images + 1))
                running = [int(w[-1].strip("()")) for _, w in steps if w[-1].startswith("(")]
                assert running == list(range(1, int(answer) + 1))
            else:
                assert tuple(k for k, _ in steps) == sample.target_images
                assert (steps[0][1] == steps[1][1]) == (answer == "yes")
    assert answers.worked_answer(test_sets["attribute"][0]) is None


def test_worked_reply_is_scored_on_its_final_answer_only(test_sets):
    """The steps name options too (image numbers, colours); only the part after ", so " counts."""
    comparison = next(s for s in test_sets["comparison"] if s.answer_text == "no")
    a, b = comparison.target_images
    assert answers.score(comparison, f"image {a} red, image {b} blue, so no") == 1.0
    assert answers.score(comparison, f"image {a} red, image {b} red, so yes") == 0.0
    assert answers.score(comparison, "no") == 1.0  # a direct reply is still read whole
    needle = test_sets["image_needle"][0]
    wrong = next(c for c in needle.choices if c != needle.answer_text)
    assert answers.score(needle, answers.worked_answer(needle).rsplit(", so ", 1)[0] + f", so {wrong}") == 0.0
    assert answers.score(needle, answers.worked_answer(needle).rsplit(", so ", 1)[0]) == 0.0  # cut off before answering
    for choice in needle.choices:  # one step that names a single option is not an answer either
        assert answers.score(needle, f"image {choice} red circle") == 0.0
    assert answers.score(needle, needle.answer_text) == 1.0
