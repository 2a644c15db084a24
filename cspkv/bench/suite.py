"""csp-bench's run: every runtime, length, budget and precision side by side in one invocation.

The parent process measures the machine (description, copy bandwidth), builds the prompts, the
export folders and onnxruntime-genai's model folders, then runs each configuration in a fresh worker
process (cspkv.bench.worker, or scripts/bench_kvpress.py in kvpress's own environment) and
summarises: median / p90 decode step, TTFT, tokens/s, K/V bytes held, peak RSS, the ratio to
transformers' full-cache generate at the same length, and the distance to the bandwidth floor
(weights at the row's precision + K/V a step must read, over the measured copy bandwidth).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cspkv.bench import machine
from cspkv.bench import ortgenai as ortgenai_peer
from cspkv.bench.workload import bench_prompt
from cspkv.export.exporter import ExportPlan, export_decode_graph, export_model
from cspkv.export.graphs import VisionGraph
from cspkv.export.manifest import traced_by_this_code
from cspkv.models import default_model as dm
from cspkv.models.registry import load_model
from cspkv.quantize.convert import convert_export
from cspkv.runtime.manifest import ManifestError, read_manifest

REPO = Path(__file__).resolve().parents[2]
KVPRESS_SCRIPT = REPO / "scripts" / "bench_kvpress.py"
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5 + 4 / 32}  # per weight element (int4: + a float32 scale per block of 32)
KVPRESS_PRESSES = ("snapkv", "streaming_llm")
PEERS = ("hf_full", "hf_reference", "kvpress", "ortgenai")


@dataclass
class BenchConfig:
    model: str = "default"
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096)
    budgets: tuple[float, ...] = (1.0, 0.5, 0.2)
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    policy: str = "csp"
    new_tokens: int = 64
    decode_slots: int = 64
    scaling_tokens: int = 4096
    scaling_length: int = 1024
    scaling_budget: float = 0.5
    scaling_every: int = 256
    kvpress_python: str | None = None
    exports_dir: str = str(Path.home() / ".cache" / "cspkv" / "bench-exports")
    peers: tuple[str, ...] = PEERS
    threads: int | None = None      # intra-op threads of every runtime (None: each runtime's default, all cores)


@dataclass
class BenchRun:
    config: BenchConfig
    machine: dict
    bandwidth: dict
    rows: list[dict] = field(default_factory=list)
    scaling: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def summarise(raw: dict) -> dict:
    steps = np.asarray(raw.get("step_ms") or [np.nan])
    return {"ttft_ms": raw["ttft_ms"], "step_median_ms": float(np.median(steps)),
            "step_p90_ms": float(np.percentile(steps, 90)),
            "tokens_per_s": float(1e3 / steps.mean()) if np.isfinite(steps).all() else float("nan"),
            "kv_bytes": raw["kv_bytes"], "peak_rss_bytes": raw.get("peak_rss_bytes"),
            "vision_ms": raw.get("vision_ms"),
            "steps": len(raw.get("step_ms") or [])}


def weight_elements(model) -> int:
    """Weights one decode step streams: every language-model parameter once (a tied embedding is
    read in full by the LM head) and an untied LM head."""
    seen, total = set(), 0
    for module in (model.model.language_model, model.lm_head):
        for p in module.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def _worker(spec: dict, python: str | None = None, script: Path | None = None, timeout: float = 3600) -> dict:
    with tempfile.TemporaryDirectory(prefix="cspkv-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        command = ([python or sys.executable, str(script)] if script else
                   [sys.executable, "-m", "cspkv.bench.worker"]) + [str(spec_path), str(out_path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if done.returncode != 0 or not out_path.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
            raise RuntimeError(f"benchmark worker {spec.get('kind', spec.get('press'))} failed: " + " | ".join(tail))
        return json.loads(out_path.read_text())


class Exports:
    """Export folders for each (length, budget, precision), built once and cached. One vision
    graph and one slot-symbolic decode graph are traced per model and reused by every plan."""

    def __init__(self, model, model_id: str, processor, root: Path, config: BenchConfig,
                 progress: Callable[[str], None]):
        self.model, self.model_id, self.processor = model, model_id, processor
        self.root, self.config, self.progress = root, config, progress
        self.root.mkdir(parents=True, exist_ok=True)
        self._shared: dict[str, Path] = {}

    def _usable(self, folder: Path) -> bool:
        """A complete folder made by this code (an export by other code is rebuilt)."""
        try:
            return traced_by_this_code(read_manifest(folder, verify_hashes=False))
        except ManifestError:
            return False

    def _shared_graphs(self) -> dict[str, Path]:
        if self._shared:
            return self._shared
        base = self.root / f"{self.model_id}-shared"
        decode = base / "decode.dynamic.onnx"
        if not (self._usable(base) and decode.is_file()):
            self.progress("tracing the shared vision graph and slot-symbolic decode graph")
            plan = ExportPlan.make(self.model, self.config.policy, {}, 1.0, 64, 8, 0.0)
            export_model(self.model, base, plan, self.model_id, force=True, processor=self.processor)
            export_decode_graph(self.model, decode)
        self._shared = {"vision": base / "vision.onnx", "decode_dynamic": decode}
        return self._shared

    def folder(self, length: int, budget: float, precision: str) -> Path:
        name = f"{self.model_id}-{self.config.policy}-P{length}-b{budget}-G{self.config.decode_slots}"
        fp32 = self.root / f"{name}-fp32"
        if not self._usable(fp32):
            self.progress(f"exporting {fp32.name}")
            plan = ExportPlan.make(self.model, self.config.policy, {}, budget, length, self.config.decode_slots, 0.0)
            export_model(self.model, fp32, plan, self.model_id, force=True, processor=self.processor,
                         reuse=self._shared_graphs())
        if precision == "fp32":
            return fp32
        target = self.root / f"{name}-{precision}"
        if self._usable(target):
            return target
        self.progress(f"converting {fp32.name} to {precision}")
        convert_export(fp32, target, precision, force=True, progress=self.progress)   # as csp-export does
        return target


def _prompt_files(model, processor, lengths, work: Path) -> dict[int, dict[str, Path]]:
    import torch

    files = {}
    vision = VisionGraph(model).eval()
    for length in lengths:
        ids, pixels = bench_prompt(model, processor, length)
        prompt = work / f"prompt-{length}.npz"
        np.savez(prompt, ids=ids, pixels=pixels)
        with torch.no_grad():           # the same prompt as embeddings, for the kvpress environment
            embeds = model.get_input_embeddings()(torch.from_numpy(ids))
            features = vision(torch.from_numpy(pixels)).reshape(-1, embeds.shape[-1])
            embeds[torch.from_numpy(ids == model.config.image_token_id)] = features
        embeds_path = work / f"embeds-{length}.npz"
        np.savez(embeds_path, embeds=embeds.numpy())
        files[length] = {"prompt": prompt, "embeds": embeds_path}
    return files


def run_bench(config: BenchConfig, progress: Callable[[str], None] = print) -> BenchRun:
    started = time.perf_counter()
    net, processor, model_id = load_model(config.model)
    net = net.float().eval()
    run = BenchRun(config, machine.describe(), machine.copy_bandwidth())
    progress(f"memory copy bandwidth {run.bandwidth['gb_per_s']:.1f} GB/s")
    context = getattr(net.config.text_config, "max_position_embeddings", None)
    lengths = []
    for length in config.lengths:
        if context is not None and length + max(config.new_tokens, config.decode_slots) > context:
            run.notes.append(f"length {length} skipped: with {config.new_tokens} new tokens it exceeds the "
                             f"model's {context}-position context")
        else:
            lengths.append(length)
    elements = weight_elements(net)
    work = Path(tempfile.mkdtemp(prefix="cspkv-bench-"))
    prompts = _prompt_files(net, processor, sorted(set(lengths) | {config.scaling_length}), work)
    exports = Exports(net, model_id, processor, Path(config.exports_dir), config, progress)
    model_dir = _model_dir(config.model)
    ortgenai = None
    if "ortgenai" in config.peers:
        reason = ortgenai_peer.missing_reason()
        if reason:
            run.notes.append(f"onnxruntime-genai not run: {reason}")
            progress(f"onnxruntime-genai skipped: {reason}")
        else:
            ortgenai = ortgenai_peer.OrtGenaiModels(net, getattr(processor, "tokenizer", processor), model_id,
                                                    Path(config.exports_dir), progress)

    def record(runtime: str, length: int, budget: float, precision: str, raw: dict, **extra) -> None:
        row = {"runtime": runtime, "length": length, "budget": budget, "precision": precision,
               **summarise(raw), **extra}
        per_weight = WEIGHT_BYTES.get(precision) or ortgenai_peer.WEIGHT_BYTES[precision]
        floor_bytes = elements * per_weight + row["kv_bytes"]
        row["floor_ms"] = 1e3 * floor_bytes / (run.bandwidth["gb_per_s"] * 1e9)
        row["x_floor"] = row["step_median_ms"] / row["floor_ms"]
        run.rows.append(row)
        progress(f"{runtime:<22} L={length:<5} b={budget:<4} {precision:<5} step {row['step_median_ms']:7.1f} ms "
                 f"(p90 {row['step_p90_ms']:.1f}) ttft {row['ttft_ms']:8.0f} ms kv {row['kv_bytes'] / 2**20:6.1f} MiB")

    def attempt(label: str, thunk: Callable[[], None]) -> None:
        try:
            thunk()
        except Exception as exc:  # one broken configuration must not sink the whole run
            run.notes.append(f"{label}: {exc}")
            progress(f"{label}: FAILED ({exc})")

    for length in lengths:
        prompt = str(prompts[length]["prompt"])
        base = {"model": config.model, "prompt": prompt, "new_tokens": config.new_tokens, "threads": config.threads}
        if "hf_full" in config.peers:
            attempt(f"hf_full L={length}", lambda: record(
                "transformers full", length, 1.0, "fp32", _worker({**base, "kind": "hf_full"})))
        for precision in ortgenai_peer.PRECISIONS if ortgenai else ():
            def peer(precision=precision):
                raw = _worker({**base, "kind": "ortgenai", "folder": str(ortgenai.folder(precision))})
                record(f"onnxruntime-genai {precision}", length, 1.0, precision, raw,
                       version=raw["ortgenai_version"], max_length=raw["max_length"])
            attempt(f"onnxruntime-genai {precision} L={length}", peer)
        for budget in config.budgets:
            if "hf_reference" in config.peers:
                attempt(f"hf_reference L={length} b={budget}", lambda: record(
                    "transformers+cspkv ref", length, budget, "fp32",
                    _worker({**base, "kind": "hf_reference", "policy": config.policy, "budget": budget,
                             "decode_slots": config.decode_slots})))
            for precision in config.precisions:
                def one(precision=precision, budget=budget):
                    folder = exports.folder(length, budget, precision)
                    record("cspkv ort", length, budget, precision,
                           _worker({**base, "kind": "cspkv", "folder": str(folder)}))
                attempt(f"cspkv L={length} b={budget} {precision}", one)
            if "kvpress" in config.peers and config.kvpress_python and budget < 1.0 and model_dir:
                for press in KVPRESS_PRESSES:
                    attempt(f"kvpress {press} L={length} b={budget}", lambda press=press: record(
                        f"kvpress {press}", length, budget, "fp32", _worker(
                            {"model_dir": str(model_dir), "embeds": str(prompts[length]["embeds"]),
                             "press": press, "budget": budget, "new_tokens": config.new_tokens,
                             "threads": config.threads},
                            python=config.kvpress_python, script=KVPRESS_SCRIPT)))
    if "kvpress" in config.peers and not config.kvpress_python:
        run.notes.append("kvpress not run: pass --kvpress-python (an environment with transformers < 5.3 "
                         "and kvpress; see scripts/bench_kvpress.py)")
    if config.scaling_tokens:
        _scaling(run, config, exports, prompts[config.scaling_length]["prompt"], progress, attempt)
    run.wall_s = time.perf_counter() - started
    return run


def _scaling(run: BenchRun, config: BenchConfig, exports: Exports, prompt: Path, progress, attempt) -> None:
    spec = {"model": config.model, "prompt": str(prompt), "new_tokens": config.scaling_tokens,
            "every": config.scaling_every, "threads": config.threads}

    def cspkv():
        folder = exports.folder(config.scaling_length, config.scaling_budget, "fp32")
        run.scaling["cspkv ort"] = _worker({**spec, "kind": "scaling_cspkv", "folder": str(folder)})["points"]

    def hf():
        run.scaling["transformers full"] = _worker({**spec, "kind": "scaling_hf_full"})["points"]

    progress(f"scaling: {config.scaling_tokens} generated tokens after a {config.scaling_length}-token prompt")
    attempt("scaling cspkv", cspkv)
    attempt("scaling transformers", hf)


def _model_dir(name: str) -> Path | None:
    """The cached checkpoint folder kvpress's environment loads (the default model only)."""
    if name != "default":
        return None
    return dm.default_cache_dir() / f"default-{dm.cache_key(dm.locate_packages())}"


def headline(run: BenchRun) -> list[dict]:
    """Each row's ratios to transformers' full-cache generate at the same prompt length."""
    base = {r["length"]: r for r in run.rows if r["runtime"] == "transformers full"}
    out = []
    for row in run.rows:
        ref = base.get(row["length"])
        ratios = {}
        if ref:
            ratios = {"step_vs_hf_full": row["step_median_ms"] / ref["step_median_ms"],
                      "ttft_vs_hf_full": row["ttft_ms"] / ref["ttft_ms"],
                      "kv_vs_hf_full": row["kv_bytes"] / ref["kv_bytes"]}
        out.append({**row, **ratios})
    return out


def to_json(run: BenchRun, command: str) -> dict:
    return {"command": command, "machine": run.machine, "bandwidth": run.bandwidth,
            "config": asdict(run.config), "rows": headline(run), "scaling": run.scaling,
            "notes": run.notes, "wall_s": run.wall_s}
