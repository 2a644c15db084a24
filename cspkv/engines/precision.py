"""FP16 and INT8 variants of an fp32 export folder (ONNX Runtime's own converters).

    convert_export("exports/fp32", "exports/fp16", "fp16")
    convert_export("exports/fp32", "exports/int8", "int8", flavour="s8s8")   # calibration: auto

fp16 (``onnxruntime.transformers.float16``): weights and activations in float16, with
  * the K/V tensors in float16 too -- prefill's ``kv`` output, decode's ``past_key_<i>`` /
    ``past_value_<i>`` inputs and ``new_kv`` output -- so the runtime's C buffer holds float16
    (half the memory) and no step casts the cache; the manifest says ``kv_dtype: float16``;
  * every other graph input/output in its fp32/int64 type (``keep_io_types``), so the runtime feeds
    and reads the same arrays as for fp32;
  * in float32 (blocked from conversion): the pruning path of prefill -- the window logits, the
    n-softmax statistics (ReduceMax/Exp/ReduceSum/Div), the self/cross scores, the top-k and the
    re-score mass -- found structurally (:func:`scoring_path_nodes`), the decode mass path, every
    TopK and Softmax, and the RMSNorm modules (:func:`norm_nodes`: the default model's mean square
    reaches ~1e6, past float16's 65504). The converter casts around each blocked node separately,
    so adjacent fp32 nodes would still pass values through float16: :func:`remove_cast_round_trips`
    joins them, and the result is re-sorted topologically (checker / TensorRT parser order).
int8 (``onnxruntime.quantization.quantize_static``, QDQ, MinMax): the weight MatMuls/Gemms only
  (attention's activation-activation MatMuls and the scoring path stay fp32: excluded by name,
  :func:`activation_matmuls`, since the QDQ quantizer ignores MatMulConstBOnly), K/V
  stays float32, calibrated on recorded feeds of the fp32 export (:mod:`cspkv.calibration`; the
  ranges are cached beside the calibration set, so both flavours calibrate once). Flavours:
  ``u8s8`` (activations QUInt8 asymmetric, weights QInt8 with reduce_range: on x86 CPUs without
  VNNI u8s8 saturates, and a graph must give the same answers on every CPU) for ONNX Runtime CPU,
  and ``s8s8`` (activations and weights QInt8, symmetric: what TensorRT's explicit quantization
  takes). Kept fp32: ``lm_head`` (:data:`INT8_EXCLUDE_MODULES`), every MLP ``down_proj`` and attention
  ``k_proj``/``v_proj`` (:data:`INT8_EXCLUDE_MODULE_TYPES`; s8s8 also ``q_proj``,
  :data:`INT8_FLAVOUR_FP32_TYPES`) and every weight MatMul whose
  calibrated input exceeds :data:`INT8_OUTLIER_LIMIT` (:func:`outlier_matmuls`; prefill and decode keep
  the same modules). The decode graph is copied as fp32 (:data:`INT8_FP32_GRAPHS`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from cspkv.export.manifest import finish_manifest, package_versions, write_manifest
from cspkv.runtime.manifest import MANIFEST_VERSION, PRECISIONS, ManifestError, file_sha256, read_manifest

CLI_PRECISIONS = ("fp32", "fp16", "int8")
INT8_FLAVOURS = ("u8s8", "s8s8")
FP16_OP_BLOCK = ("TopK", "Softmax")
# RMSNorm modules stay fp32: the mean square of the residual stream reaches ~1e6 in the default model
# (a few "massive activations" of ~1e3), far past float16's 65504.
FP16_BLOCK_MODULE_SUFFIXES = ("layernorm", "norm")
# Module paths (the exporter's "namespace" metadata) whose MatMuls stay fp32 in INT8 exports.
INT8_EXCLUDE_MODULES = ("lm_head",)
# Module types (the last path component) whose weights stay fp32 in INT8 exports, chosen on held-out
# TRAIN prompts only (scripts/int8_sensitivity.py). down_proj: keeping each projection type fp32 in
# turn, only it moved greedy answers towards fp32's (16 prompts all-token-identical: 12 with every type
# int8, 15 with down_proj fp32, 12-13 otherwise); its inputs are the SiLU-gated products whose few large
# values set the per-tensor scale. k_proj, v_proj: on 32 describe prompts, teacher-forced, they cut the
# answer positions whose argmax differs from fp32's from 0.023 to 0.016 and the KL from 0.060 to 0.036
# (the vision graph: 0.023, 0.038), for 38 MiB of graph; they write the K/V that the answer reads.
INT8_EXCLUDE_MODULE_TYPES = ("down_proj", "k_proj", "v_proj")
# s8s8 keeps q_proj fp32 as well, so the post-norm input shared by q/k/v_proj (lopsided ranges such
# as -1.1..5.4, where a symmetric scale leaves ~40% of the int8 range unused) is not quantized at all.
# Chosen on 24 held-out TRAIN prompts (text_needle, describe), teacher-forced, after attention was
# excluded from quantization: q_proj cut s8s8's answer KL from 0.108 to 0.022 at the same flip rate
# (0.056); o_proj, gate_proj or the vision graph did no better (results/int8_sensitivity_s8s8.json).
INT8_FLAVOUR_FP32_TYPES = {"u8s8": INT8_EXCLUDE_MODULE_TYPES, "s8s8": INT8_EXCLUDE_MODULE_TYPES + ("q_proj",)}
# Graphs copied as fp32 by INT8 exports. decode: on 24 held-out text_needle TRAIN prompts,
# teacher-forced (scripts/int8_sensitivity.py), an fp32 decode graph cut the answer positions whose
# argmax differs from fp32's from 0.064 to 0.038 and the KL from 0.089 to 0.043: the code word's later
# sub-words are copied by decode steps. It cannot change the first answer token (prefill's), and int8
# decode was no faster on these CPUs; it costs 208 MiB of graph (860 MiB against fp32's 1127).
INT8_FP32_GRAPHS = ("decode",)
# A weight MatMul whose calibrated input reaches |x| > this stays fp32: per-tensor int8 then has a step
# of > 0.25 while the bulk of the values is ~0.1 (the default model's MLP down_proj inputs carry
# "massive activations" of 40-3000 in a few layers; every other input stays below ~15).
INT8_OUTLIER_LIMIT = 32.0
KV_OUTPUTS = {"prefill": ("kv",), "decode": ("new_kv",)}


class PrecisionError(ValueError):
    """A conversion that cannot be done; the message says what to do."""


# ---- graph analysis --------------------------------------------------------------------------

def _producers(graph) -> dict[str, int]:
    return {output: index for index, node in enumerate(graph.node) for output in node.output}


def _ancestor_nodes(graph, tensors, producers=None) -> set[int]:
    """Indices of the nodes that ``tensors`` depend on (subgraph-free graphs)."""
    producers = producers or _producers(graph)
    seen: set[int] = set()
    queue = deque(tensors)
    while queue:
        index = producers.get(queue.popleft())
        if index is None or index in seen:
            continue
        seen.add(index)
        queue.extend(graph.node[index].input)
    return seen


def scoring_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that only serve pruning (prefill: what the TopK nodes and ``slot_mass``
    depend on, and the TopKs, minus what ``logits`` depends on) or the decode mass (what ``mass``
    depends on beyond ``logits`` / ``new_kv``)."""
    graph = model.graph
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    if "slot_mass" in outputs:
        topk = {i for i, node in enumerate(graph.node) if node.op_type == "TopK"}
        roots = [name for i in topk for name in graph.node[i].input] + ["slot_mass"]
        scoring = _ancestor_nodes(graph, roots, producers) | topk
        main = _ancestor_nodes(graph, ["logits"], producers)
    elif "mass" in outputs:
        scoring = _ancestor_nodes(graph, ["mass"], producers)
        main = _ancestor_nodes(graph, ["logits", "new_kv"], producers)
    else:
        return []
    return [graph.node[i].name for i in sorted(scoring - main)]


def _module_of(node) -> str:
    """The innermost module a node was traced from, from the exporter's "namespace" metadata:
    ": ...PrefillGraph/text.layers.0.mlp: ...LlamaMLP/text.layers.0.mlp.down_proj: ...Linear/linear_6:
    aten.linear.default" -> "text.layers.0.mlp.down_proj" ("" for ops of the graph module itself)."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            segments = prop.value.split("/")
            return segments[-2].split(": ", 1)[0] if len(segments) >= 3 else ""
    return ""


def module_nodes(model: onnx.ModelProto, modules, op_types=("MatMul", "Gemm")) -> list[str]:
    """Names of the ``op_types`` nodes traced from one of ``modules`` (e.g. "lm_head",
    "text.layers.29.mlp")."""
    wanted = tuple(modules)
    names = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        module = _module_of(node)
        if any(module == m or module.startswith(m + ".") or module.startswith(m + "/") for m in wanted):
            names.append(node.name)
    return names


def module_type_nodes(model: onnx.ModelProto, types, op_types=("MatMul", "Gemm")) -> list[str]:
    """Names of the ``op_types`` nodes traced from a module whose last path component is one of
    ``types`` (e.g. "down_proj": every ``text.layers.<i>.mlp.down_proj``)."""
    suffixes = tuple("." + t for t in types)
    if not suffixes:
        return []
    return [node.name for node in model.graph.node if node.op_type in op_types and _module_of(node).endswith(suffixes)]


def norm_nodes(model: onnx.ModelProto, suffixes=FP16_BLOCK_MODULE_SUFFIXES) -> list[str]:
    """Names of the nodes traced from a module whose last path component ends with a suffix
    (``text.layers.3.input_layernorm``, ``text.norm``)."""
    names = []
    for node in model.graph.node:
        leaf = _module_of(node).rsplit(".", 1)[-1]
        if leaf and leaf.endswith(tuple(suffixes)):
            names.append(node.name)
    return names


def remove_cast_round_trips(model: onnx.ModelProto) -> int:
    """Cast(float32 -> float16) -> Cast(-> float32) between two fp32 nodes: the converter casts each
    blocked node's inputs and outputs on its own, so adjacent fp32 nodes pass values through float16
    (overflowing past 65504). Consumers of the second Cast read the float32 value directly instead."""
    from onnx import TensorProto

    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    producers = _producers(graph)

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    def dtype(name):
        index = producers.get(name)
        if index is not None and cast_to(graph.node[index]) is not None:
            return cast_to(graph.node[index])
        return types.get(name)

    rename: dict[str, str] = {}
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        first = producers.get(node.input[0])
        if first is None or cast_to(graph.node[first]) != TensorProto.FLOAT16:
            continue
        source = graph.node[first].input[0]
        if dtype(source) == TensorProto.FLOAT:
            rename[node.output[0]] = source
    if not rename:
        return 0
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [node for node in graph.node
            if not (node.op_type == "Cast" and node.output[0] in rename and node.output[0] not in outputs)]
    # drop float16 casts nobody reads any more
    while True:
        used = {name for node in kept for name in node.input} | outputs
        pruned = [node for node in kept if node.op_type != "Cast" or node.output[0] in used]
        if len(pruned) == len(kept):
            break
        kept = pruned
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    return removed


def topological_sort(graph) -> None:
    """Reorder nodes so each comes after the producers of its inputs (the float16 converter appends
    the Casts of graph inputs at the end; onnx's checker and TensorRT's parser need the order)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producers = _producers(graph)
    ordered, placed = [], set()
    waiting: dict[str, list[int]] = {}
    missing = []
    for index, node in enumerate(graph.node):
        missing.append({name for name in node.input if name not in available and name in producers})
    ready = deque(i for i, m in enumerate(missing) if not m)
    for index, m in enumerate(missing):
        for name in m:
            waiting.setdefault(name, []).append(index)
    while ready:
        index = ready.popleft()
        if index in placed:
            continue
        placed.add(index)
        ordered.append(graph.node[index])
        for name in graph.node[index].output:
            for consumer in waiting.pop(name, []):
                missing[consumer].discard(name)
                if not missing[consumer]:
                    ready.append(consumer)
    if len(ordered) != len(graph.node):
        raise PrecisionError("the converted graph has a cycle or a dangling input: report this as a bug")
    nodes = [onnx.NodeProto() for _ in ordered]
    for target, node in zip(nodes, ordered):
        target.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Node-level block/exclude lists need unique node names; the exporter gives them, but make sure."""
    seen = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


# ---- folders and manifests -------------------------------------------------------------------

def _prepare(src: Path, dst: Path, force: bool) -> dict:
    manifest = read_manifest(src)
    if manifest.get("precision", "fp32") != "fp32":
        raise PrecisionError(f"{src} is a {manifest['precision']} export: convert from the fp32 export")
    if dst.resolve() == src.resolve():
        raise PrecisionError("--out must differ from the fp32 folder")
    if dst.exists() and any(dst.iterdir()):
        if not force:
            raise PrecisionError(f"{dst} already exists and is not empty: choose another --out or pass --force")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    return manifest


def _finish(src: Path, dst: Path, source: dict, precision: str, conversion: dict) -> dict:
    manifest = json.loads(json.dumps(source))  # deep copy
    if source.get("processor"):
        path = source["processor"]["path"]
        shutil.copytree(src / path, dst / path, dirs_exist_ok=True)
    manifest.update({
        "manifest_version": MANIFEST_VERSION,
        "precision": precision,
        "kv_dtype": PRECISIONS[precision],
        "source": {"fingerprint": source["model"]["fingerprint"], "precision": source.get("precision", "fp32"),
                   "folder": str(src.resolve()),
                   "files": {name: meta["sha256"] for name, meta in source["files"].items()}},
        "conversion": conversion,
        "versions": package_versions(),
    })
    write_manifest(dst, finish_manifest(dst, manifest))
    read_manifest(dst)  # what the runtime will check
    return manifest


# ---- fp16 ------------------------------------------------------------------------------------

def fp16_graph(model: onnx.ModelProto, role: str, op_block_list=FP16_OP_BLOCK) -> tuple[onnx.ModelProto, dict]:
    """One graph in float16 with its K/V tensors float16 and its other inputs/outputs unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _name_nodes(model)
    kv_names = set(KV_OUTPUTS.get(role, ())) | {i.name for i in model.graph.input if i.name.startswith("past_")}
    keep = [v.name for v in [*model.graph.input, *model.graph.output] if v.name not in kv_names]
    scoring = scoring_path_nodes(model)
    norms = norm_nodes(model)
    blocked = sorted(set(scoring) | set(norms))
    converted = convert_float_to_float16(model, keep_io_types=keep, op_block_list=list(op_block_list),
                                         node_block_list=blocked)
    removed = remove_cast_round_trips(converted)
    topological_sort(converted.graph)
    # the converter leaves value_info entries for initializers (float16 even for the weights that stay
    # fp32) and for the tensors removed above: drop those, keep the rest (the static shapes of a
    # decode graph traced with a symbolic slot count live there)
    graph = converted.graph
    drop = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    used = {name for node in graph.node for name in (*node.input, *node.output)}
    kept = [v for v in graph.value_info if v.name not in drop and v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    kv = sorted(name for name in kv_names if not name.startswith("past_"))
    if any(name.startswith("past_") for name in kv_names):
        kv += ["past_key_<i>", "past_value_<i>"]
    return converted, {"fp32_scoring_nodes": len(scoring), "fp32_norm_nodes": len(norms),
                       "cast_round_trips_removed": removed, "kv_float16": kv}


def convert_fp16(src: str | Path, dst: str | Path, force: bool = False, op_block_list=FP16_OP_BLOCK,
                 progress: Callable[[str], None] = lambda message: None) -> dict:
    src, dst = Path(src), Path(dst)
    manifest = _prepare(src, dst, force)
    conversion = {"tool": "onnxruntime.transformers.float16.convert_float_to_float16",
                  "op_block_list": list(op_block_list), "graphs": {}}
    for role, name in manifest["graphs"].items():
        progress(f"fp16: converting {role} graph")
        start = time.perf_counter()
        converted, info = fp16_graph(onnx.load(str(src / name)), role, op_block_list)
        onnx.save(converted, str(dst / name))
        conversion["graphs"][role] = {**info, "seconds": round(time.perf_counter() - start, 2)}
    return _finish(src, dst, manifest, "fp16", conversion)


# ---- int8 ------------------------------------------------------------------------------------

def int8_options(flavour: str) -> dict:
    """quantize_static arguments of a flavour."""
    from onnxruntime.quantization import QuantType

    if flavour == "u8s8":
        # reduce_range: 7-bit weights, so x86 CPUs without VNNI (AVX2's VPMADDUBSW) cannot saturate
        return {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "reduce_range": True,
                "extra_options": {"MatMulConstBOnly": True, "WeightSymmetric": True,
                                  "ActivationSymmetric": False}}
    if flavour == "s8s8":
        return {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, "reduce_range": False,
                "extra_options": {"MatMulConstBOnly": True, "WeightSymmetric": True,
                                  "ActivationSymmetric": True}}
    raise PrecisionError(f"--int8-flavour must be one of {', '.join(INT8_FLAVOURS)}, got {flavour!r}")


def weight_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: activation input} of the MatMul/Gemm nodes with a constant weight."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in constants:
            found[node.name] = node.input[0]
    return found


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes whose both operands are activations (attention Q.K^T and P.V,
    the pruning scores). onnxruntime's QDQ quantizer ignores MatMulConstBOnly (only its QOperator
    format honours it), so :func:`quantize_weight_matmuls` excludes these by name."""
    weights = weight_matmuls(model)
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in weights]


def weight_matmul_tensors(model: onnx.ModelProto) -> set[str]:
    """The activation input and the output of every weight MatMul/Gemm: the tensors whose ranges
    QDQ quantization of those MatMuls reads (it puts Q/DQ on each one's input and output)."""
    nodes = weight_matmuls(model)
    return {t for n in model.graph.node if n.name in nodes for t in (n.input[0], n.output[0])}


def quantize_weight_matmuls(src: Path, dst: Path, model: onnx.ModelProto, reader, options: dict,
                            excluded: list[str], ranges_cache: Path, per_channel: bool = True) -> list[str]:
    """QDQ-quantize the weight MatMuls of the graph at ``src`` (``model``, loaded) to ``dst`` with the
    ranges in ``ranges_cache`` (:func:`calibrate_ranges`), except the nodes in ``excluded``; every
    activation MatMul stays fp32. Returns the names of those activation MatMuls."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    attention = activation_matmuls(model)
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                    reduce_range=options["reduce_range"], activation_type=options["activation_type"],
                    weight_type=options["weight_type"], nodes_to_exclude=list(excluded) + attention,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options=dict(options["extra_options"]), calibration_cache_path=ranges_cache)
    return attention


def calibrate_ranges(model_path: Path, reader, cache: Path | None):
    """onnxruntime's MinMax ranges (TensorsData) of the activation inputs and the outputs of the
    weight MatMul/Gemm nodes, from the cache file when present (saved there otherwise).

    Only those (:func:`weight_matmul_tensors`): quantizing the weight MatMuls, the only ones
    :func:`quantize_weight_matmuls` quantizes, reads no other range. Observing the other MatMuls as well
    (onnxruntime's default for op type MatMul) takes in each head's P x P attention products: at
    P_max 2048 the default model's prefill calibration was killed for memory at 24 GiB.
    """
    import tempfile

    from onnxruntime.quantization.calibrate import MinMaxCalibrater, load_tensors_data, save_tensors_data
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    if cache is not None and cache.is_file():
        return load_tensors_data(cache)

    class WeightInputCalibrater(MinMaxCalibrater):
        def select_tensors_to_calibrate(self, model):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            return tensors & weight_matmul_tensors(model), value_infos

    with tempfile.TemporaryDirectory(prefix="cspkv-calib-") as tmp:
        inferred = Path(tmp) / "model.onnx"
        onnx.save(load_model_with_shape_infer(Path(model_path)), str(inferred))
        calibrator = WeightInputCalibrater(inferred, ["MatMul", "Gemm"],
                                           augmented_model_path=str(Path(tmp) / "augmented.onnx"))
        calibrator.augment_graph()
        calibrator.create_inference_session()
        reader.rewind()
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    if cache is not None:
        save_tensors_data(ranges, cache)
    return ranges


def widen_decode_ranges(prefill: onnx.ModelProto, prefill_ranges, decode: onnx.ModelProto, decode_ranges):
    """Decode's ranges with each weight MatMul's activation range widened to cover the prefill range of
    the same module (matched by the exporter's namespace metadata). Decode is calibrated on a few
    single-token steps, prefill on every prompt token: a decode token outside those few steps would
    otherwise be clipped, while prefill has already seen the same module's whole input distribution.
    Returns (TensorsData, number of inputs widened)."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    def inputs_by_module(model):
        found: dict[str, list[str]] = {}
        activations = weight_matmuls(model)
        for node in model.graph.node:
            if node.name in activations and _module_of(node):
                found.setdefault(_module_of(node), []).append(activations[node.name])
        return found

    source = inputs_by_module(prefill)
    data = dict(decode_ranges.data)
    widened = 0
    for module, names in inputs_by_module(decode).items():
        for name, other in zip(names, source.get(module, [])):
            if name not in data or other not in prefill_ranges.data:
                continue
            low, high = data[name].range_value
            other_low, other_high = prefill_ranges.data[other].range_value
            new_low, new_high = np.minimum(low, other_low), np.maximum(high, other_high)
            if np.any(new_low < low) or np.any(new_high > high):
                widened += 1
            data[name] = TensorData(lowest=np.asarray(new_low, dtype=np.asarray(low).dtype),
                                    highest=np.asarray(new_high, dtype=np.asarray(high).dtype))
    return TensorsData(decode_ranges.calibration_method, data), widened


def outlier_matmuls(model: onnx.ModelProto, ranges, limit: float = INT8_OUTLIER_LIMIT) -> dict[str, float]:
    """{node: calibrated max |input|} of the weight MatMuls whose activation exceeds ``limit``."""
    found = {}
    for node, activation in weight_matmuls(model).items():
        if activation in ranges.data:
            low, high = ranges.data[activation].range_value
            peak = float(max(np.abs(np.asarray(low, dtype=np.float64)).max(), np.abs(np.asarray(high, dtype=np.float64)).max()))
            if peak > limit:
                found[node] = round(peak, 2)
    return found


def quantize_int8(src: str | Path, dst: str | Path, flavour: str, calibration, force: bool = False,
                  exclude_modules=INT8_EXCLUDE_MODULES, nodes_to_exclude=(), per_channel: bool = True,
                  outlier_limit: float | None = INT8_OUTLIER_LIMIT, roles=("vision", "prefill", "decode"),
                  exclude_module_types=INT8_EXCLUDE_MODULE_TYPES, widen_decode: bool = False,
                  smooth_alpha: float | None = None, reduce_range: bool | None = None,
                  progress: Callable[[str], None] = lambda message: None) -> dict:
    """QDQ INT8 of the weight MatMuls of each graph in ``roles`` (the others are copied as fp32),
    calibrated with ``calibration`` (a :class:`cspkv.calibration.CalibrationSet`). Kept fp32: the
    MatMuls of ``exclude_modules``, of the decoder's modules whose name ends with ``.<type>`` for a type
    in ``exclude_module_types``, ``nodes_to_exclude``, and those whose calibrated input exceeds
    ``outlier_limit`` (None: none). ``widen_decode``: decode's activation ranges also cover prefill's
    for the same module (:func:`widen_decode_ranges`; off by default: on the held-out train prompts it
    gave fewer fp32-identical answers, 12 of 16 against 14). ``smooth_alpha``: SmoothQuant the
    decoder's quantized MatMuls first (:mod:`cspkv.engines.smoothing`; per-channel activation peaks
    from the same calibration feeds; None: off). ``reduce_range``: overrides the flavour's (u8s8: 7-bit
    weights) for experiments."""
    import tempfile

    options = int8_options(flavour)
    if reduce_range is not None:  # an experiment's override: u8s8's 7-bit weights are a CPU-portability choice
        options["reduce_range"] = reduce_range
    src, dst = Path(src), Path(dst)
    manifest = _prepare(src, dst, force)
    precision = f"int8-{flavour}"
    conversion = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                  "op_types": ["MatMul", "Gemm"], "weights_only_matmuls": True, "per_channel": per_channel,
                  "reduce_range": options["reduce_range"],
                  "activation_type": options["activation_type"].name, "weight_type": options["weight_type"].name,
                  "extra_options": options["extra_options"], "calibrate_method": "MinMax",
                  "exclude_modules": list(exclude_modules), "outlier_limit": outlier_limit,
                  "exclude_module_types": list(exclude_module_types), "widen_decode_ranges": widen_decode,
                  "smooth_alpha": smooth_alpha,
                  "calibration": calibration.meta, "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="cspkv-ranges-") as scratch:
        # pass 1: ranges and outliers of every graph; prefill and decode share the decoder's weights, so
        # a module kept fp32 in one (prefill sees the prompt tokens that carry the massive activations,
        # decode's few calibration steps may not) is kept fp32 in both
        plans = {}
        for role, name in manifest["graphs"].items():
            if role not in roles:
                continue
            progress(f"int8 ({flavour}): calibrating {role} graph")
            start = time.perf_counter()
            model = onnx.load(str(src / name))
            reader = calibration.reader(role, manifest)
            path, sha, smoothing = src / name, manifest["files"][name]["sha256"], None
            if smooth_alpha is not None and role in ("prefill", "decode"):
                path, smoothing = _smoothed(model, role, reader, smooth_alpha, exclude_modules,
                                            exclude_module_types, Path(scratch))
                model, sha = onnx.load(str(path)), file_sha256(path)
            cache = calibration.ranges_cache(role, sha) or Path(scratch) / f"{role}.json"
            ranges = calibrate_ranges(path, reader, cache)
            outliers = outlier_matmuls(model, ranges, outlier_limit) if outlier_limit is not None else {}
            modules = {n.name: _module_of(n) for n in model.graph.node}
            plans[role] = {"model": model, "reader": reader, "cache": cache, "outliers": outliers, "path": path,
                           "smoothing": smoothing, "modules": modules, "seconds": time.perf_counter() - start,
                           "ranges": ranges}
        if widen_decode and "prefill" in plans and "decode" in plans:
            from onnxruntime.quantization.calibrate import save_tensors_data

            prefill, decode = plans["prefill"], plans["decode"]
            merged, widened = widen_decode_ranges(prefill["model"], prefill["ranges"], decode["model"], decode["ranges"])
            decode["cache"] = Path(scratch) / "decode-widened.json"
            save_tensors_data(merged, decode["cache"])
            conversion["decode_inputs_widened"] = widened
        shared = {plans[r]["modules"].get(n) for r in ("prefill", "decode") if r in plans
                  for n in plans[r]["outliers"]} - {"", None}
        # pass 2: quantize
        for role, name in manifest["graphs"].items():
            if role not in plans:
                shutil.copy2(src / name, dst / name)
                conversion["graphs"][role] = {"quantized": False}
                continue
            progress(f"int8 ({flavour}): quantizing {role} graph")
            start = time.perf_counter()
            plan = plans[role]
            model, reader, cache, outliers, modules = (plan[k] for k in ("model", "reader", "cache", "outliers", "modules"))
            decoder = role in ("prefill", "decode")
            followed = set(module_nodes(model, sorted(shared))) if decoder else set()
            # module types name the decoder's projections (the vision tower has its own q/k/v/o_proj)
            typed = set(module_type_nodes(model, exclude_module_types)) if decoder else set()
            excluded = sorted(set(module_nodes(model, exclude_modules)) | set(nodes_to_exclude) | set(outliers)
                              | followed | typed)
            attention = quantize_weight_matmuls(plan["path"], dst / name, model, reader, options, excluded, cache,
                                                per_channel=per_channel)
            quantized = sum(1 for node in onnx.load(str(dst / name)).graph.node if node.op_type == "DequantizeLinear")
            conversion["graphs"][role] = {
                "quantized": True, "weight_matmuls": len(weight_matmuls(model)), "excluded_nodes": excluded,
                "activation_matmuls_fp32": len(attention),
                "outliers_fp32": {modules.get(n) or n: peak for n, peak in outliers.items()},
                "fp32_modules": sorted({modules.get(n) or n for n in excluded}),
                "feeds": len(reader), "dequantize_nodes": quantized, "smoothing": plan["smoothing"],
                "seconds": round(plan["seconds"] + time.perf_counter() - start, 2)}
    return _finish(src, dst, manifest, precision, conversion)


def _smoothed(model, role, reader, alpha, exclude_modules, exclude_module_types, scratch: Path):
    """SmoothQuant of the decoder graph ``model``'s MatMuls that will be quantized (the excluded
    modules and types stay as they are), saved under ``scratch``: (path, info)."""
    from cspkv.engines.smoothing import activation_channel_peaks, smooth_graph, smoothing_groups

    skip = set(module_nodes(model, exclude_modules)) | set(module_type_nodes(model, exclude_module_types))
    groups = smoothing_groups(model, skip)
    reader.rewind()
    peaks = activation_channel_peaks(model, iter(reader.get_next, None), groups)
    reader.rewind()
    smoothed, info = smooth_graph(model, peaks, alpha, groups)
    path = scratch / f"{role}-smoothed.onnx"
    onnx.save(smoothed, str(path))
    return path, info


# ---- entry point -----------------------------------------------------------------------------

def resolve_calibration(src: str | Path, calibration="auto", progress=lambda message: None):
    """A CalibrationSet from 'auto' (built-in prompts, cached), a saved set's folder, or a set."""
    from cspkv.calibration import CalibrationSet, build_calibration_set

    if isinstance(calibration, CalibrationSet):
        return calibration
    if calibration in (None, "auto"):
        return build_calibration_set(src, "auto", progress=progress)
    return CalibrationSet.load(calibration)


def _check_module_types(src: Path, manifest: dict, types) -> None:
    """Refuse a projection type that matches no weight MatMul of the prefill graph (a typo keeps nothing)."""
    if not types:
        return
    model = onnx.load(str(Path(src) / manifest["graphs"]["prefill"]), load_external_data=False)
    weights = set(weight_matmuls(model))
    missing = [t for t in types if not set(module_type_nodes(model, [t])) & weights]
    if missing:
        known = sorted({_module_of(n).rsplit(".", 1)[-1] for n in model.graph.node if n.name in weights} - {""})
        raise PrecisionError(f"no decoder weight MatMul belongs to a module of type {', '.join(missing)}: "
                             f"choose from {', '.join(known)}")


def convert_export(src: str | Path, dst: str | Path, precision: str, flavour: str = "u8s8", calibration="auto",
                   force: bool = False, progress: Callable[[str], None] = lambda message: None,
                   keep_fp32_types: Sequence[str] | None = None, keep_fp32_graphs: Sequence[str] | None = None) -> dict:
    """``precision``: fp16 | int8 (with ``flavour`` u8s8 | s8s8) | int8-u8s8 | int8-s8s8.
    ``keep_fp32_types``: int8 only, the decoder projection types kept fp32 (None: the flavour's,
    :data:`INT8_FLAVOUR_FP32_TYPES`); a type that names no weight MatMul of the decoder is refused,
    since it would silently keep nothing. ``keep_fp32_graphs``: int8 only, the graphs (vision, prefill,
    decode) copied as fp32 (None: :data:`INT8_FP32_GRAPHS`)."""
    if precision.startswith("int8-"):
        precision, flavour = "int8", precision[5:]
    if precision == "fp16":
        return convert_fp16(src, dst, force=force, progress=progress)
    if precision == "int8":
        int8_options(flavour)  # a bad flavour fails before calibration
        try:
            source = read_manifest(src)
        except ManifestError as exc:
            raise PrecisionError(str(exc)) from None
        if source.get("precision", "fp32") != "fp32":
            raise PrecisionError(f"{src} is a {source['precision']} export: convert from the fp32 export")
        types = INT8_FLAVOUR_FP32_TYPES[flavour] if keep_fp32_types is None else tuple(keep_fp32_types)
        _check_module_types(src, source, types)
        graphs = INT8_FP32_GRAPHS if keep_fp32_graphs is None else tuple(keep_fp32_graphs)
        unknown = sorted(set(graphs) - set(source["graphs"]))
        if unknown:
            raise PrecisionError(f"no graph named {', '.join(unknown)} in {src}: choose from {', '.join(source['graphs'])}")
        roles = tuple(r for r in source["graphs"] if r not in graphs)
        data = resolve_calibration(src, calibration, progress)
        return quantize_int8(src, dst, flavour, data, force=force, progress=progress, exclude_module_types=types,
                             roles=roles)
    raise PrecisionError(f"precision must be one of fp16, int8, int8-u8s8, int8-s8s8 (fp32 is the export "
                         f"itself), got {precision!r}")
