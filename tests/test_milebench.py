"""MileBench loader and scorer: golden eval.json figures, the official layout, bad input, the CLI."""

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from cspkv.cli.eval import main as csp_eval
from cspkv.evaluation.milebench import (
    IMAGE_TOKEN,
    MileBenchFormatError,
    load_annotation,
    load_task,
    match_choice,
    normalize,
    score_predictions,
)
from cspkv.evaluation.rouge import rouge_l_f

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "milebench-golden"
needs_golden = pytest.mark.skipif(
    not GOLDEN.is_dir(), reason=f"MileBench golden fixtures not found at {GOLDEN} (shared/ beside the checkout)"
)
ALFRED = "new_csp_v1/ALFRED"
DOCVQA = "new_csp_v1/DocVQA"
NEEDLE = "text_prior_pivot_merge_0.1_0.1_speed/TextNeedleInAHaystack"


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _assert_close(got, want, path="eval"):
    """Same keys everywhere, numbers within 1e-4."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            _assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{path}[{i}]")
    else:
        assert got == pytest.approx(want, abs=1e-4), path


# ---- golden fixtures ------------------------------------------------------------------------


@needs_golden
def test_golden_alfred_rouge_l():
    preds = _read(GOLDEN / ALFRED / "pred.json")
    want = _read(GOLDEN / ALFRED / "eval.json")
    got = score_predictions("ALFRED", preds, question_type="open-ended")
    assert got["Rouge-L f"] == pytest.approx(want["Rouge-L f"], abs=1e-4)

    # Every ALFRED prediction kept all of its images (2-5 each), so an annotation rebuilt from
    # them gives MileBench's levels too and the whole eval.json can be compared.
    annotation = {
        "meta_data": {"question_type": "open-ended"},
        "data": [{"sample_id": p["sample_id"], "task_instance": {"images_path": p["image"]}} for p in preds],
    }
    _assert_close(score_predictions("ALFRED", preds, annotation), want)


@needs_golden
def test_golden_docvqa_accuracy():
    preds = _read(GOLDEN / DOCVQA / "pred_with_extracted.json")
    _assert_close(score_predictions("DocVQA", preds), _read(GOLDEN / DOCVQA / "eval.json"))


@needs_golden
def test_golden_docvqa_extraction_matches_milebench():
    # pred_with_extracted.json records the option MileBench extracted for each sample.
    for sample in _read(GOLDEN / DOCVQA / "pred_with_extracted.json"):
        choices = [normalize(c) for c in sample["choice_list"]]
        options = {chr(65 + i): c for i, c in enumerate(choices)}
        assert match_choice(normalize(sample["pred_response"]), options) == sample["extracted"]


@needs_golden
def test_golden_needle_accuracy():
    preds = _read(GOLDEN / NEEDLE / "pred.json")
    want = _read(GOLDEN / NEEDLE / "eval.json")
    got = score_predictions("TextNeedleInAHaystack", preds)
    assert got["Accuracy"] == pytest.approx(want["Accuracy"], abs=1e-4)
    # The per-level split needs the annotation's full image lists (the predictions hold only the
    # images left after truncation), so check that the published split adds up to our count.
    correct = round(got["Accuracy"] * len(preds))
    assert sum(hit for hit, _ in want["image_quantity_level-Result"].values()) == correct
    assert sum(n for _, n in want["image_quantity_level-Result"].values()) == len(preds)


# ---- scoring rules --------------------------------------------------------------------------


def test_rouge_l_matches_the_rouge_package_quirks():
    # Distinct words: ref {the, cat}, hyp {the, cat, sat}; LCS words {the, cat}.
    assert rouge_l_f("the cat sat", "the cat") == pytest.approx(2 * (2 / 3) / (2 / 3 + 1 + 1e-8))
    assert rouge_l_f("the the the", "the") == pytest.approx(1.0)  # words counted as a set
    assert rouge_l_f("a b", "c") == 0.0
    with pytest.raises(ValueError):
        rouge_l_f("", "x")


def test_normalize_follows_milebench():
    assert normalize("  'Hello, World!'\n") == "hello world"
    assert normalize("3.5 - 2") == "3.5  2"  # decimal point kept; "-" beside a space deleted
    # MileBench passes re.UNICODE as the count: only the first 32 periods are removed.
    assert normalize("a." * 40).count(".") == 8


def test_match_choice_rules():
    options = {"A": "red apple", "B": "green pear"}
    assert match_choice("b green pear", options) == "B"  # label + text
    assert match_choice("it is a green pear", options) == "B"  # text alone
    assert match_choice("a", options) == "A"  # bare label
    assert match_choice("", options) == "C"  # MileBench's fixed guess
    assert match_choice("maybe", options) == "AB"  # every label letter in the answer, joined


def test_needle_requires_whole_word():
    preds = [
        {"sample_id": 0, "gt_response": "7984462", "pred_response": "The number is 7984462."},
        {"sample_id": 1, "gt_response": "3872087", "pred_response": "It is 38720872."},
    ]
    assert score_predictions("TextNeedleInAHaystack", preds) == {"Accuracy": 0.5}
    # MMCoQA uses plain containment.
    assert score_predictions("MMCoQA", preds) == {"Accuracy": 1.0}


def test_milebench_tasks_are_known_and_others_need_their_annotation():
    preds = [{"sample_id": 0, "gt_response": "x y", "pred_response": "x y"}]
    assert score_predictions("ALFRED", preds)["Rouge-L f"] == pytest.approx(1.0)    # open-ended, known
    with pytest.raises(ValueError, match="unknown MileBench task 'ALFERD'; MileBench's tasks are ActionLocalization"):
        score_predictions("ALFERD", preds, question_type="open-ended")
    with pytest.raises(ValueError, match="--question-type 'multi-choice' contradicts MileBench's ALFRED, which is "
                                         "open-ended"):
        score_predictions("ALFRED", preds, question_type="multi-choice")
    own = {"meta_data": {}, "data": [{"sample_id": 0, "task_instance": {"images_path": ["a.png"]}}]}
    with pytest.raises(ValueError, match="declares no question_type"):
        score_predictions("MyTask", preds, own)
    assert score_predictions("MyTask", preds, own, question_type="open-ended")["Rouge-L f"] == pytest.approx(1.0)


@pytest.mark.parametrize("reply,shown", [(None, "null"), (123, "123"), (["a"], '["a"]')])
def test_replies_that_are_not_strings_are_refused_by_entry(reply, shown):
    preds = [{"sample_id": 0, "gt_response": "x", "pred_response": "x"},
             {"sample_id": 7, "gt_response": "x", "pred_response": reply}]
    with pytest.raises(ValueError, match=rf"entry 1 \(sample_id 7\): pred_response is {re.escape(shown)}, not a string"):
        score_predictions("ALFRED", preds)


# ---- loader on the official layout ----------------------------------------------------------


def _png(path: Path) -> None:
    """A 1x1 grey PNG from plain bytes (no imaging library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x80")  # filter byte 0, one grey pixel
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _write_task(root: Path, *, missing_image: bool = False) -> Path:
    task = root / "ToyVQA"
    (task / "images").mkdir(parents=True)
    for name in ["0.png", "1.png", "2.png", "3.png"]:
        if not (missing_image and name == "3.png"):
            _png(task / "images" / name)
    doc = {
        "meta_data": {
            "dataset": "ToyVQA",
            "task_instruction": ["Answer the question.", "Pick one option."],
            "question_type": "multi-choice",
        },
        "data": [
            {
                "sample_id": 0,
                "task_instruction_id": 1,
                "task_instance": {
                    "context": "{image#1}Table: {table#2}Question: which is red?",
                    "images_path": ["0.png", "1.png"],
                    "choice_list": ["Apple", "Pear"],
                },
                "response": "Apple",
                "image_quantity_level": "Few",
            },
            {
                "sample_id": 1,
                "task_instruction_id": 0,
                "task_instance": {
                    "context": "{image#1}{image#2}Which one is green?",
                    "images_path": ["2.png", "3.png"],
                    "choice_list": ["Apple", "Pear"],
                },
                "response": "Pear",
                "image_quantity_level": "Few",
            },
        ],
    }
    (task / "ToyVQA.json").write_text(json.dumps(doc), encoding="utf-8")
    return task


def test_load_task_official_layout(tmp_path):
    task = load_task(_write_task(tmp_path))
    assert (task.name, task.question_type, len(task.samples), task.errors) == ("ToyVQA", "multi-choice", 2, [])
    first = task.samples[0]
    assert first.prompt.startswith("Pick one option.\n")
    assert first.prompt.count(IMAGE_TOKEN) == 2 and "{table#2}" not in first.prompt
    assert first.prompt.endswith("\nChoice list: \nA. Apple\nB. Pear\nYour answer is: ")
    assert first.image_paths == [tmp_path / "ToyVQA" / "images" / "0.png", tmp_path / "ToyVQA" / "images" / "1.png"]
    assert all(p.is_file() for p in first.image_paths)
    assert (first.choices, first.answer, first.image_quantity_level) == (["Apple", "Pear"], "Apple", "Few")


def test_missing_folder(tmp_path):
    with pytest.raises(MileBenchFormatError, match="task folder not found"):
        load_task(tmp_path / "NoSuchTask")


def test_missing_json_names_the_file(tmp_path):
    task = _write_task(tmp_path)
    (task / "ToyVQA.json").unlink()
    with pytest.raises(MileBenchFormatError, match="ToyVQA.json"):
        load_task(task)


def test_malformed_json_names_the_file(tmp_path):
    task = _write_task(tmp_path)
    (task / "ToyVQA.json").write_text('{"meta_data": {', encoding="utf-8")
    with pytest.raises(MileBenchFormatError, match=r"ToyVQA\.json: malformed JSON"):
        load_task(task)
    (task / "ToyVQA.json").write_text("[]", encoding="utf-8")
    with pytest.raises(MileBenchFormatError, match="'meta_data'"):
        load_task(task)


def test_missing_image_raises_or_is_skipped(tmp_path):
    task_dir = _write_task(tmp_path, missing_image=True)
    with pytest.raises(MileBenchFormatError, match=r"sample 1: image file not found: .*3\.png"):
        load_task(task_dir)
    task = load_task(task_dir, skip_bad=True)
    assert [s.sample_id for s in task.samples] == [0]
    assert len(task.errors) == 1 and "3.png" in str(task.errors[0])


def test_score_with_annotation_from_the_layout(tmp_path):
    annotation = load_annotation(_write_task(tmp_path) / "ToyVQA.json")
    preds = [
        {"sample_id": 0, "gt_response": "Apple", "pred_response": "A. Apple"},
        {"sample_id": 1, "gt_response": "Pear", "pred_response": "apple"},
    ]
    assert score_predictions("ToyVQA", preds, annotation) == {
        "Accuracy": 0.5,
        "image_quantity_level-Accuracy": {"Few": 0.5, "Medium": 0, "Many": 0},
        "image_quantity_level-Result": {"Few": [1, 2], "Medium": [0, 0], "Many": [0, 0]},
    }
    with pytest.raises(ValueError, match="prediction absent"):
        score_predictions("ToyVQA", preds[:1], annotation)


# ---- csp-eval score -------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(csp_eval, ["score", *args])


@needs_golden
def test_cli_scores_golden_docvqa():
    result = _run("--task", "DocVQA", "--pred", str(GOLDEN / DOCVQA / "pred_with_extracted.json"))
    assert result.exit_code == 0, result.output
    _assert_close(json.loads(result.stdout), _read(GOLDEN / DOCVQA / "eval.json"))


@needs_golden
def test_cli_scores_golden_alfred():
    result = _run("--task", "ALFRED", "--pred", str(GOLDEN / ALFRED / "pred.json"), "--question-type", "open-ended")
    assert result.exit_code == 0, result.output
    want = _read(GOLDEN / ALFRED / "eval.json")["Rouge-L f"]
    assert json.loads(result.stdout)["Rouge-L f"] == pytest.approx(want, abs=1e-4)


def test_cli_with_annotation(tmp_path):
    task = _write_task(tmp_path)
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([
        {"sample_id": 0, "gt_response": "Apple", "pred_response": "a"},
        {"sample_id": 1, "gt_response": "Pear", "pred_response": "B"},
    ]))
    result = _run("--task", "ToyVQA", "--pred", str(pred), "--annotation", str(task / "ToyVQA.json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["Accuracy"] == 1.0


def test_cli_errors_say_what_to_do(tmp_path):
    result = _run("--task", "ALFRED", "--pred", str(tmp_path / "missing.json"))
    assert result.exit_code == 1 and "missing.json: prediction file not found" in result.output

    bad = tmp_path / "ToyVQA.json"
    bad.write_text("{oops")
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"sample_id": 0, "gt_response": "x", "pred_response": "x"}]))
    result = _run("--task", "ToyVQA", "--pred", str(pred), "--annotation", str(bad))
    assert result.exit_code == 1 and "ToyVQA.json: malformed JSON" in result.output

    result = _run("--task", "ALFERD", "--pred", str(pred), "--question-type", "open-ended")
    assert result.exit_code == 2 and "--task 'ALFERD' is not a MileBench task (ActionLocalization" in result.output
    null = tmp_path / "null.json"
    null.write_text(json.dumps([{"sample_id": 3, "gt_response": "x", "pred_response": None}]))
    result = _run("--task", "ALFRED", "--pred", str(null))
    assert result.exit_code == 1 and "entry 0 (sample_id 3): pred_response is null, not a string" in result.output
