"""TensorRT-readiness of an exported graph, checked without TensorRT.

What the TensorRT 10 ONNX parser needs of our graphs: only operators it imports (allow-list below,
from onnx-tensorrt's operator support matrix, restricted to what cspkv's graphs use or may use),
any TopK sorted=1 with a constant K below TensorRT's limit of 3840 (the policies select without
one), no scatter of booleans, fully static shapes, opset 18, and every file under protobuf's 2 GB
limit (larger weights go to external data). A failure names the node and says what to change.

INT4 weight-only graphs (``csp-export --precision int4``) are opset 21, the first with the 4-bit types and
blocked DequantizeLinear; the check takes 21 only for a graph that holds INT4 weights. What TensorRT's
IDequantizeLayer takes of them (its operator reference): the quantized input and the scale are build-time
constants, the zero point is absent or all zeros, a 2-D scale (block quantization) is for INT4 only; and
block quantization is weight-only, so an INT4 DequantizeLinear must feed a MatMul's weight input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

TENSORRT_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Ceil", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "Cos", "CumSum", "DequantizeLinear", "Div", "Einsum", "Equal", "Erf",
    "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "Greater", "GreaterOrEqual", "Identity", "IsNaN", "IsInf", "LayerNormalization", "Less",
    "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mul", "Neg",
    "Not", "Or", "Pad", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "Relu", "Reshape", "Resize", "ScatterElements",
    "ScatterND", "Shape", "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Where", "Xor",
})
TOPK_LIMIT = 3840
OPSET = 18
INT4_OPSET = 21
MAX_FILE_BYTES = 2 * 1024**3


@dataclass
class Readiness:
    path: str
    problems: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _constants(graph) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name.startswith("value_"):  # value_int(s) / value_float(s)
                values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr))
    return values


def _static(value_info) -> bool:
    dims = value_info.type.tensor_type.shape.dim
    return value_info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims)


def check_graph(path: str | Path, allow_custom_domains: tuple[str, ...] = ()) -> Readiness:
    path = Path(path)
    report = Readiness(str(path))
    size = path.stat().st_size
    if size >= MAX_FILE_BYTES:
        report.problems.append(f"{path.name} is {size / 2**30:.2f} GB: save the weights as external data")
    model = onnx.load(str(path))
    opset = {imp.domain: imp.version for imp in model.opset_import}.get("", None)
    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    constants = _constants(graph)
    int4 = any(node.op_type == "DequantizeLinear" and types.get(node.input[0]) == onnx.TensorProto.INT4
               for node in graph.node)
    if opset == INT4_OPSET and not int4:
        report.problems.append(f"opset {opset} without INT4 weights: export float graphs at opset {OPSET}")
    elif opset not in (OPSET, INT4_OPSET):
        report.problems.append(f"opset {opset}, expected {OPSET} ({INT4_OPSET} for INT4 weights)")
    readers = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, index))
    for node in graph.node:
        report.op_counts[node.op_type] = report.op_counts.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            if node.domain not in allow_custom_domains:
                report.problems.append(f"node {node.name}: custom op {node.domain}::{node.op_type} needs a plugin")
            continue
        if node.op_type not in TENSORRT_OPS:
            report.problems.append(f"node {node.name}: {node.op_type} is not imported by TensorRT 10's ONNX parser")
        if node.op_type == "TopK":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("sorted", 1) != 1:
                report.problems.append(f"node {node.name}: TopK must have sorted=1")
            k = constants.get(node.input[1])
            if k is None:
                report.problems.append(f"node {node.name}: TopK's K is not a constant")
            elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_LIMIT:
                report.problems.append(f"node {node.name}: TopK K={int(np.asarray(k).reshape(-1)[0])} is not below "
                                       f"{TOPK_LIMIT}: lower --max-prompt")
        if node.op_type == "DequantizeLinear":
            report.problems.extend(_dequantize_problems(node, types, constants, readers))
        if node.op_type in ("ScatterElements", "ScatterND", "Scatter"):
            if types.get(node.input[0]) == onnx.TensorProto.BOOL:
                report.problems.append(f"node {node.name}: {node.op_type} on booleans (scatter a number type)")
    for vi in [*graph.input, *graph.output]:
        if not _static(vi):
            report.problems.append(f"{vi.name}: dynamic dimension in a graph input/output")
    dynamic = [vi.name for vi in graph.value_info if not _static(vi)]
    if dynamic:
        report.problems.append(f"{len(dynamic)} intermediate tensors have dynamic or unknown shapes "
                               f"(first: {dynamic[0]})")
    return report


def _dequantize_problems(node, types, constants, readers) -> list[str]:
    """What TensorRT's IDequantizeLayer refuses in one DequantizeLinear (see the module docstring)."""
    problems, name = [], node.name or node.output[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    int4 = types.get(node.input[0]) == onnx.TensorProto.INT4
    scale = constants.get(node.input[1])
    if scale is None:
        problems.append(f"node {name}: DequantizeLinear's scale is not a constant")
    elif scale.ndim == 2 and not int4:
        problems.append(f"node {name}: block quantization (a 2-D scale) is for INT4 weights only")
    if len(node.input) > 2 and node.input[2]:
        zero = constants.get(node.input[2])
        if zero is None or np.any(zero.astype(np.int64) != 0):
            problems.append(f"node {name}: DequantizeLinear's zero point must be absent or zero "
                            "(TensorRT takes symmetric quantization only)")
    if int4 or attrs.get("block_size", 0):
        if node.input[0] not in constants:
            problems.append(f"node {name}: INT4 / blocked DequantizeLinear of a non-constant (weight-only in TensorRT)")
        if any(reader != ("MatMul", 1) for reader in readers.get(node.output[0], [])):
            problems.append(f"node {name}: an INT4 DequantizeLinear must feed only MatMul weights (input 1)")
    return problems


def check_export(folder: str | Path, manifest: dict) -> dict[str, Readiness]:
    return {role: check_graph(Path(folder) / name) for role, name in manifest["graphs"].items()}
