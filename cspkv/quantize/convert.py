"""Converting an fp32 export folder to another precision: the folder, its graphs and its manifest.

    convert_export("exports/fp32", "exports/fp16", "fp16")
    convert_export("exports/fp32", "exports/int8", "int8", flavour="s8s8")   # calibration: auto
    convert_export("exports/fp32", "exports/int4", "int4")                   # block 32, symmetric

csp-export, csp-bench and the precision table all build their fp16, int8 and int4 folders here.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import onnx

from cspkv.export.manifest import (finish_manifest, graph_code_fingerprint, package_versions, traced_by_this_code,
                                   write_manifest)
from cspkv.export.weights import WEIGHTS_FILE, share_weights
from cspkv.quantize.calibration import CalibrationSet, build_calibration_set
from cspkv.quantize.fp16 import FP16_OP_BLOCK, fp16_graph
from cspkv.quantize.int4 import (INT4_BLOCK_SIZE, INT4_GRAPHS, INT4_SYMMETRIC, Int4Error, check_block_size,
                                 int4_plan)
from cspkv.quantize.int4 import quantize_graphs as quantize_int4_graphs
from cspkv.quantize.int8 import (INT8_EXCLUDE_MODULES, INT8_FLAVOUR_FP32_TYPES, INT8_FP32_GRAPHS, Int8Error,
                                 check_module_types, int8_options, quantize_graphs)
from cspkv.runtime.manifest import MANIFEST_VERSION, PRECISIONS, ManifestError, read_manifest

CLI_PRECISIONS = ("fp32", "fp16", "int8", "int4")


class PrecisionError(ValueError):
    """A conversion that cannot be done; the message says what to do."""


def _source(src: Path) -> dict:
    try:
        manifest = read_manifest(src)
    except ManifestError as exc:
        raise PrecisionError(str(exc)) from None
    if manifest["precision"] != "fp32":
        raise PrecisionError(f"{src} is a {manifest['precision']} export: convert from the fp32 export")
    return manifest


def _prepare(src: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src.resolve():
        raise PrecisionError("--out must differ from the fp32 folder")
    if dst.exists() and any(dst.iterdir()):
        if not force:
            raise PrecisionError(f"{dst} already exists and is not empty: choose another --out or pass --force")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if (src / WEIGHTS_FILE).is_file():     # graphs copied unchanged still read it; _finish rewrites it
        shutil.copy2(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)


def _finish(src: Path, dst: Path, source: dict, precision: str, conversion: dict) -> dict:
    manifest = json.loads(json.dumps(source))  # deep copy
    if source.get("processor"):
        path = source["processor"]["path"]
        shutil.copytree(src / path, dst / path, dirs_exist_ok=True)
    manifest.update({
        "manifest_version": MANIFEST_VERSION,
        "precision": precision,
        "kv_dtype": PRECISIONS[precision],
        "source": {"fingerprint": source["model"]["fingerprint"], "precision": source["precision"],
                   "folder": str(src.resolve()),
                   "files": {name: meta["sha256"] for name, meta in source["files"].items()}},
        "conversion": conversion,
        "versions": package_versions(),
        # this code's fingerprint only when it also traced the source (caches then reuse the folder)
        "graph_code": graph_code_fingerprint() if traced_by_this_code(source) else None,
    })
    manifest["weights"] = share_weights(dst, manifest["graphs"])
    write_manifest(dst, finish_manifest(dst, manifest))
    return read_manifest(dst)  # what the runtime will check


def resolve_calibration(src: str | Path, calibration="auto", progress=lambda message: None) -> CalibrationSet:
    """A CalibrationSet from 'auto' (built-in prompts, cached), a saved set's folder, or a set."""
    if isinstance(calibration, CalibrationSet):
        return calibration
    if calibration in (None, "auto"):
        return build_calibration_set(src, "auto", progress=progress)
    return CalibrationSet.load(calibration)


def convert_fp16(src: Path, dst: Path, source: dict, progress: Callable[[str], None]) -> dict:
    conversion = {"tool": "onnxruntime.transformers.float16.convert_float_to_float16",
                  "op_block_list": list(FP16_OP_BLOCK), "graphs": {}}
    for role, name in source["graphs"].items():
        progress(f"fp16: converting {role} graph")
        start = time.perf_counter()
        converted, info = fp16_graph(onnx.load(str(src / name)), role)
        onnx.save(converted, str(dst / name))
        conversion["graphs"][role] = {**info, "seconds": round(time.perf_counter() - start, 2)}
    return conversion


def convert_export(src: str | Path, dst: str | Path, precision: str, flavour: str = "u8s8", calibration="auto",
                   force: bool = False, progress: Callable[[str], None] = lambda message: None,
                   keep_fp32_types: Sequence[str] | None = None, keep_fp32_graphs: Sequence[str] | None = None,
                   block_size: int = INT4_BLOCK_SIZE, symmetric: bool = INT4_SYMMETRIC,
                   quantize_lm_head: bool = True) -> dict:
    """``precision``: fp16 | int8 (with ``flavour`` u8s8 | s8s8) | int8-u8s8 | int8-s8s8 | int4.
    ``keep_fp32_types``: int8 only, the decoder projection types kept fp32 (None: the flavour's,
    :data:`~cspkv.quantize.int8.INT8_FLAVOUR_FP32_TYPES`); a type that names no weight MatMul of the
    decoder is refused, since it would silently keep nothing. ``keep_fp32_graphs``: int8 only, the
    graphs (vision, prefill, decode) copied as fp32 (None: :data:`~cspkv.quantize.int8.INT8_FP32_GRAPHS`).
    ``block_size``, ``symmetric``, ``quantize_lm_head``: int4 only (:mod:`cspkv.quantize.int4`).
    Everything is checked before the first graph is converted."""
    src, dst = Path(src), Path(dst)
    if precision.startswith("int8-"):
        precision, flavour = "int8", precision[5:]
    if precision not in ("fp16", "int8", "int4"):
        raise PrecisionError(f"precision must be one of fp16, int8, int8-u8s8, int8-s8s8, int4 (fp32 is the export "
                             f"itself), got {precision!r}")
    source = _source(src)
    if precision == "fp16":
        _prepare(src, dst, force)
        return _finish(src, dst, source, "fp16", convert_fp16(src, dst, source, progress))
    if precision == "int4":
        return convert_int4(src, dst, block_size, symmetric, quantize_lm_head, force, progress, source)
    types = INT8_FLAVOUR_FP32_TYPES.get(flavour, ()) if keep_fp32_types is None else tuple(keep_fp32_types)
    return convert_int8(src, dst, flavour, calibration, types, INT8_FP32_GRAPHS if keep_fp32_graphs is None
                        else tuple(keep_fp32_graphs), force=force, progress=progress, source=source)


def convert_int8(src: Path, dst: Path, flavour: str, calibration, keep_fp32_types: Sequence[str],
                 keep_fp32_graphs: Sequence[str], exclude_modules: Sequence[str] = INT8_EXCLUDE_MODULES,
                 force: bool = False, progress: Callable[[str], None] = lambda message: None,
                 source: dict | None = None) -> dict:
    """The int8 export of ``src``: ``flavour`` (u8s8 | s8s8), the decoder projection types and the
    graphs kept fp32, and the module paths kept fp32 (``lm_head`` by default); checked before any
    calibration."""
    src, dst = Path(src), Path(dst)
    source = source or _source(src)
    try:
        int8_options(flavour)
        check_module_types(onnx.load(str(src / source["graphs"]["prefill"]), load_external_data=False),
                           keep_fp32_types)
    except Int8Error as exc:
        raise PrecisionError(str(exc)) from None
    unknown = sorted(set(keep_fp32_graphs) - set(source["graphs"]))
    if unknown:
        raise PrecisionError(f"no graph named {', '.join(unknown)} in {src}: choose from {', '.join(source['graphs'])}")
    data = resolve_calibration(src, calibration, progress)
    _prepare(src, dst, force)
    conversion = quantize_graphs(src, dst, source, flavour, data, exclude_modules=tuple(exclude_modules),
                                 exclude_module_types=tuple(keep_fp32_types),
                                 roles=tuple(r for r in source["graphs"] if r not in keep_fp32_graphs), progress=progress)
    return _finish(src, dst, source, f"int8-{flavour}", conversion)


def convert_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK_SIZE, symmetric: bool = INT4_SYMMETRIC,
                 quantize_lm_head: bool = True, force: bool = False,
                 progress: Callable[[str], None] = lambda message: None, source: dict | None = None) -> dict:
    """The int4 export of ``src`` (weights of the language model's linear layers in 4-bit blocks of
    ``block_size``; K/V float32). Refused before any graph is written when the block size is not one
    ONNX Runtime's 4-bit kernel takes or no linear layer can be blocked with it."""
    src, dst = Path(src), Path(dst)
    source = source or _source(src)
    try:
        block_size = check_block_size(block_size)
    except Int4Error as exc:
        raise PrecisionError(str(exc)) from None
    if not isinstance(symmetric, bool):
        raise PrecisionError(f"symmetric must be True or False, got {symmetric!r}")
    prefill = onnx.load(str(src / source["graphs"]["prefill"]), load_external_data=False)
    blockable, kept = int4_plan(prefill, block_size)
    if not blockable:
        reasons = "; ".join(f"{module}: {why}" for module, why in list(kept.items())[:3])
        raise PrecisionError(f"no linear layer of {src} can be quantized to int4 with block size {block_size} "
                             f"({reasons}): choose a block size that divides their K, e.g. 32")
    _prepare(src, dst, force)
    conversion = quantize_int4_graphs(src, dst, source, block_size, symmetric, quantize_lm_head, INT4_GRAPHS,
                                      progress)
    return _finish(src, dst, source, "int4", conversion)
