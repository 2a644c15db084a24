"""Recorded graph feeds for INT8 calibration, their on-disk cache, and the readers that feed them.

A calibration set is what the fp32 export's three graphs actually receive on real prompts: the
prompts go through :class:`~cspkv.engines.onnx_runtime.OnnxPipeline` (vision -> prefill -> a few decode
steps) and every feed of each graph is recorded. Decode feeds hold the whole K/V cache (tens of MB
for the default model), so only a few of them are kept.

Sets are cached under ``$CSPKV_CACHE_DIR/calibration/<key>`` (default ``~/.cache/cspkv``) as one npz
per graph plus ``meta.json``; the key hashes the export's model fingerprint, plan and graph hashes and
the calibration settings, so a different export or different settings never reuse a set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from cspkv.engines.generation import Pipeline
from cspkv.engines.onnx_runtime import OrtEngine
from cspkv.export.exporter import load_processor
from cspkv.runtime.manifest import read_manifest

from cspkv.quantize.calibration_prompts import (
    CALIBRATION_SEED,
    CalibrationError,
    CalibrationPrompt,
    tiny_prompts,
    train_prompts,
)

# 2: decode feeds spread evenly over the prompts (1 took them from the first prompts only)
CALIBRATION_VERSION = 2
ROLES = ("vision", "prefill", "decode")
META = "meta.json"

HOW_TO = (
    "INT8 needs calibration data recorded from prompts of the model's TRAINING data. Built-in sets "
    "exist for --model default (easy-VQA train split) and --model tiny (synthetic prompts); for "
    "this model, record one from the fp32 export with\n"
    "    from cspkv.quantize.calibration import record_calibration_set\n"
    "    record_calibration_set(FP32_FOLDER, prompts, OUT_FOLDER)\n"
    "where prompts is a list of cspkv.quantize.calibration_prompts.CalibrationPrompt(input_ids [L] int64, "
    "pixel_values [N, 3, H, W] float32, source) built with the model's processor (a few dozen "
    "training prompts), then pass --calibration OUT_FOLDER."
)


@dataclass(frozen=True)
class CalibrationSettings:
    source: str                 # easyvqa-train | tiny-synthetic | custom
    n_prompts: int = 16
    decode_steps: int = 4       # decode steps run per prompt (the first ones are recorded)
    # decode feeds kept in all (each holds the whole cache: ~72 MB at the default P_max); 12 of the 16
    # prompts cover each task's answer tokens twice (4, all from multiple-choice prompts, left the
    # describe and text-needle answers' decode ranges uncalibrated)
    decode_feeds: int = 12
    seed: int = CALIBRATION_SEED


def default_settings(source: str) -> CalibrationSettings:
    if source == "tiny-synthetic":
        return CalibrationSettings(source, n_prompts=8, decode_steps=3, decode_feeds=4)
    return CalibrationSettings(source)


def cache_root() -> Path:
    base = os.environ.get("CSPKV_CACHE_DIR") or Path.home() / ".cache" / "cspkv"
    return Path(base) / "calibration"


def cache_key(manifest: dict, settings: CalibrationSettings) -> str:
    """Identifies the export (weights, plan, graph files) and the calibration settings."""
    payload = {
        "version": CALIBRATION_VERSION,
        "fingerprint": manifest["model"]["fingerprint"],
        "plan": manifest["plan"],
        "files": {name: meta["sha256"] for name, meta in sorted(manifest["files"].items())},
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class FeedReader(CalibrationDataReader):
    """ONNX Runtime's CalibrationDataReader over recorded feeds of one graph.

    ``inputs``: the graph's input specs ({name: {"shape", "dtype"}}, as in manifest["io"][role]
    ["inputs"]); every feed is checked against them on construction, so a set recorded for another
    export fails here with the input that differs, not deep inside the calibrator.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], inputs: dict | None = None, role: str = "graph"):
        if not feeds:
            raise CalibrationError(f"no calibration feeds for the {role} graph")
        if inputs is not None:
            for index, feed in enumerate(feeds):
                if set(feed) != set(inputs):
                    raise CalibrationError(f"{role} feed {index} has inputs {sorted(feed)}, the graph takes "
                                           f"{sorted(inputs)}: rebuild the calibration set for this export")
                for name, spec in inputs.items():
                    value = feed[name]
                    if list(value.shape) != list(spec["shape"]) or value.dtype.name != spec["dtype"]:
                        raise CalibrationError(
                            f"{role} feed {index} input {name} is {value.dtype.name}{list(value.shape)}, the graph "
                            f"takes {spec['dtype']}{spec['shape']}: rebuild the calibration set for this export")
        self.feeds = feeds
        self.role = role
        self._start, self._end = 0, len(feeds)
        self._next = 0

    def get_next(self) -> dict | None:
        if self._start + self._next >= self._end:
            return None
        feed = self.feeds[self._start + self._next]
        self._next += 1
        return feed

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return self._end - self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = max(0, start_index), min(len(self.feeds), end_index)
        self._next = 0


@dataclass
class CalibrationSet:
    """Recorded feeds per graph role, and where they came from."""

    feeds: dict[str, list[dict[str, np.ndarray]]]
    meta: dict
    folder: Path | None = None      # where it is saved (also holds ONNX Runtime's range caches)

    def ranges_cache(self, role: str, graph_sha256: str) -> Path | None:
        """A file for onnxruntime's calibration range cache of one graph (None when unsaved): the
        MinMax ranges do not depend on the int8 flavour, so u8s8 and s8s8 calibrate once."""
        if self.folder is None:
            return None
        return self.folder / f"ranges-{role}-{graph_sha256[:16]}.json"

    def reader(self, role: str, manifest: dict | None = None) -> FeedReader:
        inputs = manifest["io"][role]["inputs"] if manifest is not None else None
        return FeedReader(self.feeds.get(role, []), inputs, role)

    def polygraphy_loader(self, role: str) -> list[dict[str, np.ndarray]]:
        """A data loader for polygraphy's Calibrator (a list of feed dicts: re-iterable)."""
        return list(self.feeds[role])

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for role in ROLES:
            arrays = {f"{i:04d}__{name}": value for i, feed in enumerate(self.feeds.get(role, []))
                      for name, value in feed.items()}
            np.savez(folder / f"{role}.npz", **arrays)
        (folder / META).write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CalibrationSet":
        folder = Path(folder)
        if not (folder / META).is_file():
            raise CalibrationError(f"{folder} is not a calibration set (no {META}).\n{HOW_TO}")
        meta = json.loads((folder / META).read_text())
        feeds: dict[str, list[dict[str, np.ndarray]]] = {}
        for role in ROLES:
            path = folder / f"{role}.npz"
            if not path.is_file():
                raise CalibrationError(f"{path} is missing: rebuild the calibration set")
            by_index: dict[int, dict[str, np.ndarray]] = {}
            with np.load(path) as data:
                for key in data.files:
                    index, name = key.split("__", 1)
                    by_index.setdefault(int(index), {})[name] = data[key]
            feeds[role] = [by_index[i] for i in sorted(by_index)]
        return cls(feeds, meta, folder)


def decode_feed_prompts(n_prompts: int, decode_feeds: int) -> list[int]:
    """Indices of the prompts that each give one decode feed: ``decode_feeds`` of them, evenly spaced
    from the first to the last prompt (the prompts cycle through the tasks, so every task's answer
    tokens are seen)."""
    if n_prompts <= 0 or decode_feeds <= 0:
        return []
    if decode_feeds >= n_prompts:
        return list(range(n_prompts))
    return sorted({int(round(i)) for i in np.linspace(0, n_prompts - 1, decode_feeds)})


def record_calibration_set(fp32_folder: str | Path, prompts: list[CalibrationPrompt], out: str | Path | None = None,
                           decode_steps: int = 4, decode_feeds: int = 12, settings: CalibrationSettings | None = None,
                           progress: Callable[[str], None] = lambda message: None) -> CalibrationSet:
    """Runs ``prompts`` through the fp32 export and records each graph's feeds (saved to ``out``
    when given). Decode feeds: one of the first ``decode_steps - 1`` steps (varying) of each of
    ``decode_feeds`` prompts spread over the list (:func:`decode_feed_prompts`)."""

    if not prompts:
        raise CalibrationError("no calibration prompts given")
    engine = OrtEngine(fp32_folder)
    if engine.precision != "fp32":
        raise CalibrationError(f"{fp32_folder} is a {engine.precision} export: calibrate on the fp32 export")
    recorder = _Recorder(engine, decode_feeds)
    chosen = set(decode_feed_prompts(len(prompts), decode_feeds))
    decode_sources = []
    for index, prompt in enumerate(prompts):
        progress(f"calibration prompt {index + 1}/{len(prompts)} ({len(prompt.input_ids)} tokens)")
        # one decode feed from each chosen prompt, at a step that varies with the prompt (0: none)
        recorder.decode_step_to_keep = 1 + index % max(1, decode_steps - 1) if index in chosen else 0
        before = len(recorder.feeds["decode"])
        recorder.generate(prompt.input_ids, prompt.pixel_values, max_new_tokens=decode_steps, keep_logits=False)
        if len(recorder.feeds["decode"]) > before:
            decode_sources.append(prompt.source)
    settings = settings or CalibrationSettings("custom", len(prompts), decode_steps, decode_feeds)
    meta = {"version": CALIBRATION_VERSION, "export": str(Path(fp32_folder).resolve()),
            "fingerprint": engine.manifest["model"]["fingerprint"], "settings": asdict(settings),
            "prompts": [p.source for p in prompts], "decode_feed_prompts": decode_sources,
            "counts": {role: len(recorder.feeds[role]) for role in ROLES}}
    result = CalibrationSet(recorder.feeds, meta)
    if out is not None:
        result.save(out)
    return result


class _SessionProxy:
    """Records the feeds of ``run`` and otherwise behaves as the wrapped InferenceSession."""

    def __init__(self, session, sink: list):
        self._session, self._sink = session, sink

    def run(self, output_names, feed, *args, **kwargs):
        self._sink.append({name: np.array(value, copy=True) for name, value in feed.items()})
        return self._session.run(output_names, feed, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


class _RecordingEngine:
    """An engine that records the feed of one chosen decode step of each generation (as the decode
    graph reads it: the bias after the step's slot choice, the whole K/V buffer) and otherwise is
    the engine it wraps."""

    def __init__(self, engine, recorder: "_Recorder"):
        self._engine, self._recorder = engine, recorder

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def decode_step(self, token: int, position: int):
        rec = self._recorder
        rec.step += 1
        if rec.step == rec.decode_step_to_keep and len(rec.feeds["decode"]) < rec.decode_feeds:
            buffer = rec.pipeline.buffer
            kv = np.array(buffer.kv).reshape(len(buffer.kv), 2, 1, *buffer.kv.shape[2:])
            feed = {"token": np.array([[token]], np.int64), "position": np.array([position], np.int64),
                    "bias": self._engine.bias.copy()}
            for layer in range(len(kv)):
                feed[f"past_key_{layer}"] = kv[layer, 0].copy()
                feed[f"past_value_{layer}"] = kv[layer, 1].copy()
            rec.feeds["decode"].append(feed)
        return self._engine.decode_step(token, position)


class _Recorder:
    """Runs prompts through the export and keeps the vision and prefill feeds and chosen decode feeds."""

    def __init__(self, engine, decode_feeds: int):
        self.feeds: dict[str, list] = {role: [] for role in ROLES}
        self.decode_feeds = decode_feeds
        self.decode_step_to_keep = 1
        self.step = 0
        for role in ("vision", "prefill"):
            engine.sessions[role] = _SessionProxy(engine.sessions[role], self.feeds[role])
        self.pipeline = Pipeline(_RecordingEngine(engine, self))

    def generate(self, *args, **kwargs):
        self.step = 0
        return self.pipeline.generate(*args, **kwargs)


def _auto_source(manifest: dict) -> str:
    model_id = manifest["model"]["id"]
    if model_id == "default":
        return "easyvqa-train"
    if model_id.startswith("tiny"):
        return "tiny-synthetic"
    raise CalibrationError(f"no built-in calibration prompts for model {model_id!r}.\n{HOW_TO}")


def build_calibration_set(fp32_folder: str | Path, source: str = "auto", settings: CalibrationSettings | None = None,
                          use_cache: bool = True,
                          progress: Callable[[str], None] = lambda message: None) -> CalibrationSet:
    """The calibration set of an fp32 export: from the cache when present, else recorded.

    ``source``: auto (easyvqa-train for the default model, tiny-synthetic for tiny models),
    easyvqa-train, or tiny-synthetic. Anything else raises :class:`CalibrationError` saying how
    to provide data.
    """

    folder = Path(fp32_folder)
    manifest = read_manifest(folder)
    if manifest.get("precision", "fp32") != "fp32":
        raise CalibrationError(f"{folder} is a {manifest['precision']} export: calibrate on the fp32 export")
    if source == "auto":
        source = _auto_source(manifest)
    if source not in ("easyvqa-train", "tiny-synthetic"):
        raise CalibrationError(f"unknown calibration source {source!r}.\n{HOW_TO}")
    settings = settings or default_settings(source)
    if settings.source != source:
        raise CalibrationError(f"settings are for source {settings.source!r}, not {source!r}")
    target = cache_root() / cache_key(manifest, settings)
    if use_cache and (target / META).is_file():
        progress(f"calibration set from cache {target}")
        return CalibrationSet.load(target)
    max_prompt = manifest["plan"]["max_prompt"]
    if source == "easyvqa-train":
        processor = load_processor(folder, manifest)
        if processor is None:
            raise CalibrationError(f"{folder} has no processor to tokenise the training prompts.\n{HOW_TO}")
        prompts = train_prompts(processor, settings.n_prompts, max_prompt, seed=settings.seed)
    else:
        prompts = tiny_prompts(settings.n_prompts, max_prompt, seed=settings.seed)
    result = record_calibration_set(folder, prompts, None, settings.decode_steps, settings.decode_feeds,
                                    settings, progress)
    result.meta["key"] = target.name
    if use_cache:  # write to a temporary folder first, so a half-written set is never read
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        result.save(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        result.folder = target
        progress(f"calibration set cached in {target}")
    return result
