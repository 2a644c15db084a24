"""MileBench compatibility: a loader for the official dataset layout and MileBench's scorer.

Official layout (one folder per task, as MileBench's generate.py / evaluate.py read it)::

    MileBench/ALFRED/
        ALFRED.json          {"meta_data": {"task_instruction": [...], "question_type": ...},
                              "data": [{"sample_id", "task_instruction_id",
                                        "task_instance": {"context", "images_path",
                                                          "choice_list"?},
                                        "response", "image_quantity_level"}, ...]}
        images/0.jpg ...

The scorer follows MileBench's evaluate.py (the current version, which also writes
"image_quantity_level-Result"); its text normalisation and option matching are reproduced
rule for rule, oddities included, so figures agree with MileBench's eval.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspkv.evaluation.rouge import rouge_l_f

__all__ = [
    "IMAGE_TOKEN",
    "LEVELS",
    "MileBenchFormatError",
    "MileBenchSample",
    "MileBenchTask",
    "load_annotation",
    "load_task",
    "match_choice",
    "normalize",
    "option_label",
    "quantity_level",
    "score_predictions",
]

IMAGE_TOKEN = "<ImageHere>"  # what MileBench substitutes for {image#k} / {table#k}
LEVELS = ("Few", "Medium", "Many")
QUESTION_TYPES = ("open-ended", "multi-choice")
# MileBench's 29 tasks and how its evaluate.py scores each: the needle tasks and MMCoQA by name
# ("needle"), the rest by their annotation's question_type (ROUGE-L for open-ended, accuracy for
# multi-choice). Its score.py lists the names; the LOOK-M paper's copy of MileBench's taxonomy table
# gives each one's metric.
MILEBENCH_TASKS = {
    **dict.fromkeys(("ALFRED", "CLEVR-Change", "IEdit", "Spot-the-Diff"), "open-ended"),
    **dict.fromkeys(("ActionLocalization", "ActionPrediction", "ActionSequence", "CharacterOrder",
                     "CounterfactualInference", "DocVQA", "EgocentricNavigation", "GPR1200", "MovingAttribute",
                     "MovingDirection", "MultiModalQA", "OCR-VQA", "ObjectExistence", "ObjectInteraction",
                     "ObjectShuffle", "SceneTransition", "SlideVQA", "StateChange", "TQA", "WebQA", "WikiVQA",
                     "nuscenes"), "multi-choice"),
    **dict.fromkeys(("ImageNeedleInAHaystack", "MMCoQA", "TextNeedleInAHaystack"), "needle"),
}
_PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")


class MileBenchFormatError(ValueError):
    """Input that does not follow the MileBench layout; the message names the offending file."""


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MileBenchSample:
    sample_id: int | str
    prompt: str  # task instruction + context (+ choice block), one IMAGE_TOKEN per image placeholder
    image_paths: list[Path]  # resolved against the task's images/ folder, in images_path order
    choices: list[str] | None  # None for open-ended tasks
    answer: str
    image_quantity_level: str | None = None


@dataclass
class MileBenchTask:
    name: str
    question_type: str
    samples: list[MileBenchSample]
    errors: list[MileBenchFormatError] = field(default_factory=list)  # only with skip_bad=True


def load_annotation(path: str | Path) -> dict[str, Any]:
    """Read a task JSON and check its top-level shape; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MileBenchFormatError(f"{path}: annotation file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MileBenchFormatError(
            f"{path}: malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise MileBenchFormatError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("meta_data"), dict) or not isinstance(
        doc.get("data"), list
    ):
        raise MileBenchFormatError(
            f"{path}: expected an object with 'meta_data' (object) and 'data' (list)"
        )
    return doc


def option_label(index: int) -> str:
    """MileBench's option letters: A..Z, then AA..AZ, then BA.. (GPR1200 has more than 26)."""
    if index < 26:
        return chr(65 + index)
    if index < 52:
        return "A" + chr(65 + index - 26)
    return "B" + chr(65 + index - 52)


def _choice_block(choices: list[str], task_name: str) -> str:
    # Same text MileBench's dataset appends; GPR1200 lists its options without letters.
    lines = [("" if task_name == "GPR1200" else f"{option_label(i)}. ") + str(c)
             for i, c in enumerate(choices)]
    return "\nChoice list: \n" + "\n".join(lines) + "\nYour answer is: "


def _instruction(meta: dict[str, Any], record: dict[str, Any]) -> str:
    # Samples normally index meta_data.task_instruction; accept an inline string as well.
    if isinstance(record.get("task_instruction"), str):
        return record["task_instruction"]
    instructions = meta.get("task_instruction")
    idx = record.get("task_instruction_id", 0)
    if isinstance(instructions, str):
        return instructions
    if isinstance(instructions, list) and isinstance(idx, int) and 0 <= idx < len(instructions):
        return str(instructions[idx])
    raise KeyError(f"task_instruction_id {idx!r} has no entry in meta_data.task_instruction")


def _build_sample(
    record: Any, meta: dict[str, Any], task_name: str, json_path: Path, images_dir: Path
) -> MileBenchSample:
    if not isinstance(record, dict):
        raise MileBenchFormatError(f"{json_path}: a 'data' entry is not an object")
    sid = record.get("sample_id", "?")
    where = f"{json_path}: sample {sid}"
    try:
        instance = record["task_instance"]
        context = instance["context"]
        images = instance["images_path"]
        answer = record["response"]
        instruction = _instruction(meta, record)
    except (KeyError, TypeError) as exc:
        raise MileBenchFormatError(f"{where}: missing field {exc}") from None
    if not isinstance(context, str) or not isinstance(images, list):
        raise MileBenchFormatError(f"{where}: 'context' must be a string and 'images_path' a list")

    paths = [images_dir / str(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise MileBenchFormatError(f"{where}: image file not found: {p}")
    # A placeholder pointing past the image list would silently pair text with the wrong image.
    for k in _PLACEHOLDER.findall(context):
        if not 1 <= int(k) <= len(paths):
            raise MileBenchFormatError(f"{where}: placeholder #{k} but only {len(paths)} images")

    choices = instance.get("choice_list")
    if choices is not None and not isinstance(choices, list):
        raise MileBenchFormatError(f"{where}: 'choice_list' must be a list")
    text = _PLACEHOLDER.sub(IMAGE_TOKEN, context)
    if choices is not None:
        text += _choice_block(choices, task_name)
    return MileBenchSample(
        sample_id=sid,
        prompt=f"{instruction}\n{text}",
        image_paths=paths,
        choices=[str(c) for c in choices] if choices is not None else None,
        answer=str(answer),  # MileBench's dataset also does str(response)
        image_quantity_level=record.get("image_quantity_level"),
    )


def load_task(
    task_dir: str | Path, *, annotation_file: str | None = None, skip_bad: bool = False
) -> MileBenchTask:
    """Load one MileBench task folder (e.g. ``MileBench/ALFRED``).

    `annotation_file` picks another JSON in the folder (e.g. ``ALFRED-adv.json``); by default
    ``<folder name>.json``. Problems with the folder or the JSON always raise
    MileBenchFormatError. A bad sample (missing field, missing image) raises too, unless
    `skip_bad` is set: then it is left out and its error is kept in ``task.errors``.
    """
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise MileBenchFormatError(f"{task_dir}: task folder not found")
    name = task_dir.name
    json_path = task_dir / (annotation_file or f"{name}.json")
    doc = load_annotation(json_path)
    meta = doc["meta_data"]
    qtype = meta.get("question_type")
    if qtype not in QUESTION_TYPES:
        raise MileBenchFormatError(
            f"{json_path}: meta_data.question_type must be one of {QUESTION_TYPES}, got {qtype!r}"
        )

    samples: list[MileBenchSample] = []
    errors: list[MileBenchFormatError] = []
    for record in doc["data"]:
        try:
            samples.append(_build_sample(record, meta, name, json_path, task_dir / "images"))
        except MileBenchFormatError as exc:
            if not skip_bad:
                raise
            errors.append(exc)
    return MileBenchTask(name=name, question_type=qtype, samples=samples, errors=errors)


# --------------------------------------------------------------------------------------------
# Normalisation (MileBench's Eval.process, verbatim in behaviour)
# --------------------------------------------------------------------------------------------

# The "(?!<=\d)" is MileBench's typo for a look-behind; as written it is a no-op look-ahead, so
# every "." not followed by a digit is removed. Kept as is to match its numbers.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# MileBench calls periodStrip.sub("", text, re.UNICODE): the flag lands in the *count* argument,
# so at most 32 periods are removed. Later periods survive and then split ROUGE "sentences".
_PERIOD_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # The test looks at the *original* text: a mark next to a space anywhere, or any
        # digit,digit in the text, deletes the mark everywhere; otherwise it becomes a space.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def normalize(answer: str) -> str:
    """MileBench's answer normalisation, applied to predictions, ground truth and choices."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    answer = _process_punctuation(answer)
    answer = answer.strip("'").strip('"')
    return answer.strip().lower()


# --------------------------------------------------------------------------------------------
# Multiple-choice option extraction (MileBench's match_choice)
# --------------------------------------------------------------------------------------------

_REGEX_SPECIALS = ["\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")"]


def _escaped(option: str) -> str:
    # MileBench's own escaping (not re.escape): normalise, then backslash this fixed list.
    text = normalize(option)
    for ch in _REGEX_SPECIALS:
        text = text.replace(ch, "\\" + ch)
    return text


def match_choice(text: str, options: dict[str, str]) -> str:
    """The option label MileBench extracts from a (normalised) answer; may be '' or several letters."""
    if text == "":
        return "C"  # MileBench's fixed guess for an empty answer
    try:
        # 1. "label text", e.g. "a blastomycosis": first match anywhere wins.
        pattern = "|".join(_escaped(f"{k} {v}") for k, v in options.items())
        found = re.search(rf"({pattern})", text, re.S)
        if found:
            return found.group(0)[0].upper()
        # 2. Option text alone, compared with all spaces removed.
        pattern = "|".join(_escaped(v).replace(" ", "") for v in options.values())
        found = re.search(rf"({pattern})", text.replace(" ", ""), re.S)
        if found:
            for k, v in options.items():
                # Compared against the *escaped* pattern, as MileBench does: options holding
                # regex specials never match here and fall through.
                if found[0].strip() == _escaped(v).replace(" ", ""):
                    return k.upper()
        # 3. A bare label ("a", or "ab" for the two-letter labels).
        if len(text) in (1, 2) and text.upper() in options:
            return text.upper()
    except re.error:
        return text  # MileBench prints the error and returns the answer unchanged
    # 4. Fallback: every character of the answer that is also a label.
    return "".join(ch.upper() for ch in text if ch.upper() in options)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def quantity_level(n_images: int) -> str:
    """MileBench's image-quantity bucket: 2-5 Few, 6-31 Medium, 32-109 Many."""
    if n_images < 6:
        return "Few"
    return "Many" if n_images > 31 else "Medium"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0


def _merge_annotation(predictions: list[dict], annotation: dict[str, Any] | None) -> list[dict]:
    """Copies of the predictions, with choice_list / image / level taken from the annotation."""
    preds = [dict(p) for p in predictions]
    if annotation is None:
        return preds
    data = annotation["data"]
    if len(preds) != len(data):
        raise ValueError(f"There is prediction absent: {len(preds)} predictions, {len(data)} annotated samples")
    by_id = {int(p["sample_id"]): p for p in preds}
    for sample in data:
        pred = by_id.get(int(sample["sample_id"]))
        if pred is None:
            raise ValueError(f"no prediction for annotated sample {sample['sample_id']}")
        instance = sample["task_instance"]
        if "choice_list" in instance:
            pred["choice_list"] = list(instance["choice_list"])
        # MileBench buckets by the annotation's full image list, not the images the model kept
        # after truncation (the prediction's "image" may hold fewer).
        pred["image"] = instance["images_path"]
        pred["image_quantity_level"] = quantity_level(len(instance["images_path"]))
    return preds


def _levels(preds: list[dict]) -> list[str] | None:
    levels = [p.get("image_quantity_level") for p in preds]
    if any(level not in LEVELS for level in levels):
        return None  # unknown without the annotation: no per-level breakdown
    return levels


def scoring_kind(task_name: str, question_type: str) -> str:
    """How MileBench scores a task whose question type is known: by name first (needle), then by type."""
    return "needle" if "NeedleInAHaystack" in task_name or "MMCoQA" in task_name else question_type


def sample_scores(kind: str, task_name: str, preds: list[dict]) -> list[float]:
    """Each prediction's score under ``kind`` ("needle", "open-ended" or "multi-choice")."""
    scores: list[float] = []
    for p in preds:
        gt, pred = normalize(str(p["gt_response"])), normalize(str(p["pred_response"]))
        if kind == "needle":
            # NeedleInAHaystack: the answer must be a whole (space-separated) word; MMCoQA: substring.
            hit = gt in pred.split() if "NeedleInAHaystack" in task_name else gt in pred
            scores.append(1 if hit else 0)
        elif kind == "open-ended":
            if gt == "":
                raise ValueError(f"sample {p['sample_id']}: ground truth is empty after normalisation")
            scores.append(0 if pred == "" else rouge_l_f(pred, gt))
        else:
            choices = p.get("choice_list")
            if isinstance(choices, str):  # some exports store the list as JSON text
                choices = json.loads(choices)
            if not isinstance(choices, list):
                raise ValueError(f"sample {p['sample_id']}: no choice_list (pass the task annotation)")
            choices = [normalize(str(c)) for c in choices]
            if gt not in choices:
                raise ValueError(f"sample {p['sample_id']}: answer {gt!r} is not among its choices")
            options = {option_label(i): c for i, c in enumerate(choices)}
            picked = match_choice(pred, options)
            scores.append(1 if picked == option_label(choices.index(gt)) else 0)
    return scores


def _kind(task_name: str, preds: list[dict], annotation: dict | None, question_type: str | None) -> str:
    """How to score: "needle" (by name, as MileBench), else the question type, which MileBench's own
    tasks have fixed; a task of one's own needs its annotation (which declares it)."""
    known = MILEBENCH_TASKS.get(task_name)
    if known is None and annotation is None:
        raise ValueError(f"unknown MileBench task {task_name!r}; MileBench's tasks are "
                         f"{', '.join(sorted(MILEBENCH_TASKS, key=str.lower))}. For a task of your own, pass its "
                         "annotation JSON (--annotation), which declares its question_type")
    if scoring_kind(task_name, "") == "needle":
        return "needle"
    declared = annotation["meta_data"].get("question_type") if annotation is not None else None
    if question_type is not None and question_type not in QUESTION_TYPES:
        raise ValueError(f"question_type must be one of {QUESTION_TYPES}, got {question_type!r}")
    for source, value in (("the annotation's question_type", declared), ("--question-type", question_type)):
        if known and value and value != known:
            raise ValueError(f"{source} {value!r} contradicts MileBench's {task_name}, which is {known}: "
                             f"check that the files belong to {task_name}")
    if declared and question_type and declared != question_type:
        raise ValueError(f"question_type {question_type!r} contradicts the annotation's {declared!r}")
    qtype = known or declared or question_type
    if qtype is None and preds and all("choice_list" in p for p in preds):
        qtype = "multi-choice"  # e.g. a pred_with_extracted.json
    if qtype is None:
        raise ValueError(f"the annotation of {task_name} declares no question_type: add \"question_type\": "
                         "\"open-ended\" or \"multi-choice\" to its meta_data, or pass --question-type")
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"Dataset not supported: question_type {qtype!r}")
    return qtype


def score_predictions(
    task_name: str,
    predictions: list[dict],
    annotation: dict[str, Any] | None = None,
    question_type: str | None = None,
) -> dict[str, Any]:
    """Score MileBench predictions (the list in pred.json) like MileBench's evaluate.py.

    Returns the eval.json dict: "Rouge-L f" (open-ended) or "Accuracy" (multi-choice and needle
    tasks), plus "image_quantity_level-Accuracy" / "-Result" when each sample's level is known
    (from `annotation`, the parsed task JSON, or carried by the predictions). `question_type`
    is needed only for a non-needle task scored without annotation or carried choice lists.
    """
    if not isinstance(predictions, list) or not predictions:
        raise ValueError("predictions must be a non-empty list of samples")
    for index, p in enumerate(predictions):
        if not isinstance(p, dict) or not {"sample_id", "gt_response", "pred_response"} <= p.keys():
            raise ValueError(f"entry {index}: each prediction needs 'sample_id', 'gt_response' and 'pred_response'")
        for key in ("gt_response", "pred_response"):
            if not isinstance(p[key], str):
                raise ValueError(f"entry {index} (sample_id {p['sample_id']!r}): {key} is {json.dumps(p[key])}, "
                                 "not a string: regenerate the predictions (an empty reply is \"\")")
    preds = _merge_annotation(predictions, annotation)
    kind = _kind(task_name, preds, annotation, question_type)
    scores = sample_scores(kind, task_name, preds)

    headline = "Rouge-L f" if kind == "open-ended" else "Accuracy"
    result: dict[str, Any] = {headline: _mean(scores)}
    levels = _levels(preds)
    if levels is not None:
        buckets: dict[str, list[float]] = {level: [] for level in LEVELS}
        for level, score in zip(levels, scores):
            buckets[level].append(score)
        result["image_quantity_level-Accuracy"] = {k: _mean(v) for k, v in buckets.items()}
        result["image_quantity_level-Result"] = {k: [sum(v), len(v)] for k, v in buckets.items()}
    return result
