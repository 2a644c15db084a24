"""INT8 variant of an fp32 export (``onnxruntime.quantization.quantize_static``, QDQ, MinMax).

Only the weight MatMuls/Gemms are quantized: attention's activation-activation MatMuls and the
scoring path stay fp32 (excluded by name, :func:`~cspkv.quantize.graph.activation_matmuls`, since the
QDQ quantizer ignores MatMulConstBOnly), and the K/V stay float32. Ranges are calibrated on recorded
feeds of the fp32 export (:mod:`cspkv.quantize.calibration`; cached beside the calibration set, so
both flavours calibrate once). Flavours: ``u8s8`` (activations QUInt8 asymmetric, weights QInt8 with
reduce_range: on x86 CPUs without VNNI u8s8 saturates, and a graph must give the same answers on
every CPU) for ONNX Runtime CPU, and ``s8s8`` (activations and weights QInt8, symmetric: what
TensorRT's explicit quantization takes).

Kept fp32, each choice measured on held-out TRAIN prompts (docs/int8_history.md): ``lm_head``
(:data:`INT8_EXCLUDE_MODULES`), every MLP ``down_proj`` and attention ``k_proj``/``v_proj``
(:data:`INT8_EXCLUDE_MODULE_TYPES`; s8s8 also ``q_proj``, :data:`INT8_FLAVOUR_FP32_TYPES`), every
weight MatMul whose calibrated input exceeds :data:`INT8_OUTLIER_LIMIT` (prefill and decode keep the
same modules), and the decode graph (:data:`INT8_FP32_GRAPHS`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from cspkv.quantize.graph import activation_matmuls, module_nodes, module_of, module_type_nodes, weight_matmul_tensors, weight_matmuls

INT8_FLAVOURS = ("u8s8", "s8s8")
# Module paths (the exporter's "namespace" metadata) whose MatMuls stay fp32 in INT8 exports.
INT8_EXCLUDE_MODULES = ("lm_head",)
# Module types (the last path component) whose weights stay fp32. down_proj: keeping each projection
# type fp32 in turn, only it moved greedy answers towards fp32's (16 prompts all-token-identical: 12
# with every type int8, 15 with down_proj fp32, 12-13 otherwise); its inputs are the SiLU-gated
# products whose few large values set the per-tensor scale. k_proj, v_proj: on 32 describe prompts,
# teacher-forced, they cut the answer positions whose argmax differs from fp32's from 0.023 to 0.016
# and the KL from 0.060 to 0.036, for 38 MiB of graph; they write the K/V that the answer reads.
INT8_EXCLUDE_MODULE_TYPES = ("down_proj", "k_proj", "v_proj")
# s8s8 keeps q_proj fp32 as well, so the post-norm input shared by q/k/v_proj (lopsided ranges such
# as -1.1..5.4, where a symmetric scale leaves ~40% of the int8 range unused) is not quantized at all:
# on 24 held-out TRAIN prompts, teacher-forced, q_proj cut s8s8's answer KL from 0.108 to 0.022.
INT8_FLAVOUR_FP32_TYPES = {"u8s8": INT8_EXCLUDE_MODULE_TYPES, "s8s8": INT8_EXCLUDE_MODULE_TYPES + ("q_proj",)}
# Graphs copied as fp32. decode: on 24 held-out text_needle TRAIN prompts, teacher-forced, an fp32
# decode graph cut the answer positions whose argmax differs from fp32's from 0.064 to 0.038 and the KL
# from 0.089 to 0.043 (the code word's later sub-words are copied by decode steps); int8 decode was no
# faster on these CPUs.
INT8_FP32_GRAPHS = ("decode",)
# A weight MatMul whose calibrated input reaches |x| > this stays fp32: per-tensor int8 then has a step
# of > 0.25 while the bulk of the values is ~0.1 (the default model's MLP down_proj inputs carry
# "massive activations" of 40-3000 in a few layers; every other input stays below ~15).
INT8_OUTLIER_LIMIT = 32.0


class Int8Error(ValueError):
    """An INT8 request that cannot be done; the message says what to do."""


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
    raise Int8Error(f"--int8-flavour must be one of {', '.join(INT8_FLAVOURS)}, got {flavour!r}")


def quantize_weight_matmuls(src: Path, dst: Path, model: onnx.ModelProto, reader, options: dict,
                            excluded: list[str], ranges_cache: Path) -> list[str]:
    """QDQ-quantize the weight MatMuls of the graph at ``src`` (``model``, loaded) to ``dst`` with the
    ranges in ``ranges_cache`` (:func:`calibrate_ranges`), except the nodes in ``excluded``; every
    activation MatMul stays fp32. Returns the names of those activation MatMuls."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    attention = activation_matmuls(model)
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                    reduce_range=options["reduce_range"], activation_type=options["activation_type"],
                    weight_type=options["weight_type"], nodes_to_exclude=list(excluded) + attention,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options=dict(options["extra_options"]), calibration_cache_path=ranges_cache)
    return attention


def calibrate_ranges(model_path: Path, reader, cache: Path | None):
    """onnxruntime's MinMax ranges (TensorsData) of the activation inputs and the outputs of the
    weight MatMul/Gemm nodes, from the cache file when present (saved there otherwise).

    Only those (:func:`~cspkv.quantize.graph.weight_matmul_tensors`): quantizing the weight MatMuls
    reads no other range. Observing the other MatMuls as well (onnxruntime's default for op type
    MatMul) takes in each head's P x P attention products: at P_max 2048 the default model's prefill
    calibration was killed for memory at 24 GiB.
    """
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


def outlier_matmuls(model: onnx.ModelProto, ranges, limit: float = INT8_OUTLIER_LIMIT) -> dict[str, float]:
    """{node: calibrated max |input|} of the weight MatMuls whose activation exceeds ``limit``."""
    found = {}
    for node, activation in weight_matmuls(model).items():
        if activation in ranges.data:
            low, high = ranges.data[activation].range_value
            peak = float(max(np.abs(np.asarray(low, dtype=np.float64)).max(),
                             np.abs(np.asarray(high, dtype=np.float64)).max()))
            if peak > limit:
                found[node] = round(peak, 2)
    return found


def check_module_types(prefill: onnx.ModelProto, types) -> None:
    """Refuse a projection type that matches no weight MatMul of the prefill graph (a typo keeps nothing)."""
    if not types:
        return
    weights = set(weight_matmuls(prefill))
    missing = [t for t in types if not set(module_type_nodes(prefill, [t])) & weights]
    if missing:
        known = sorted({module_of(n).rsplit(".", 1)[-1] for n in prefill.graph.node if n.name in weights} - {""})
        raise Int8Error(f"no decoder weight MatMul belongs to a module of type {', '.join(missing)}: "
                        f"choose from {', '.join(known)}")


def quantize_graphs(src: Path, dst: Path, manifest: dict, flavour: str, calibration,
                    exclude_modules=INT8_EXCLUDE_MODULES, exclude_module_types=INT8_EXCLUDE_MODULE_TYPES,
                    roles=("vision", "prefill"),
                    progress: Callable[[str], None] = lambda message: None) -> dict:
    """QDQ INT8 of the weight MatMuls of each graph in ``roles`` of the export at ``src`` into ``dst``
    (the other graphs are copied as fp32), calibrated with ``calibration`` (a
    :class:`~cspkv.quantize.calibration.CalibrationSet`). Kept fp32: the MatMuls of
    ``exclude_modules``, of the decoder's modules whose name ends with ``.<type>`` for a type in
    ``exclude_module_types``, and those whose calibrated input exceeds :data:`INT8_OUTLIER_LIMIT`.
    Returns the conversion record for the manifest."""
    options = int8_options(flavour)
    conversion = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                  "op_types": ["MatMul", "Gemm"], "weights_only_matmuls": True, "per_channel": True,
                  "reduce_range": options["reduce_range"],
                  "activation_type": options["activation_type"].name, "weight_type": options["weight_type"].name,
                  "extra_options": options["extra_options"], "calibrate_method": "MinMax",
                  "exclude_modules": list(exclude_modules), "outlier_limit": INT8_OUTLIER_LIMIT,
                  "exclude_module_types": list(exclude_module_types), "calibration": calibration.meta, "graphs": {}}
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
            cache = calibration.ranges_cache(role, manifest["files"][name]["sha256"]) or Path(scratch) / f"{role}.json"
            ranges = calibrate_ranges(src / name, reader, cache)
            plans[role] = {"model": model, "reader": reader, "cache": cache,
                           "outliers": outlier_matmuls(model, ranges),
                           "modules": {n.name: module_of(n) for n in model.graph.node},
                           "seconds": time.perf_counter() - start}
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
            model, outliers, modules = plan["model"], plan["outliers"], plan["modules"]
            decoder = role in ("prefill", "decode")
            followed = set(module_nodes(model, sorted(shared))) if decoder else set()
            # module types name the decoder's projections (the vision tower has its own q/k/v/o_proj)
            typed = set(module_type_nodes(model, exclude_module_types)) if decoder else set()
            excluded = sorted(set(module_nodes(model, exclude_modules)) | set(outliers) | followed | typed)
            attention = quantize_weight_matmuls(src / name, dst / name, model, plan["reader"], options, excluded,
                                                plan["cache"])
            quantized = sum(1 for node in onnx.load(str(dst / name)).graph.node if node.op_type == "DequantizeLinear")
            conversion["graphs"][role] = {
                "quantized": True, "weight_matmuls": len(weight_matmuls(model)), "excluded_nodes": excluded,
                "activation_matmuls_fp32": len(attention),
                "outliers_fp32": {modules.get(n) or n: peak for n, peak in outliers.items()},
                "fp32_modules": sorted({modules.get(n) or n for n in excluded}),
                "feeds": len(plan["reader"]), "dequantize_nodes": quantized,
                "seconds": round(plan["seconds"] + time.perf_counter() - start, 2)}
    return conversion
