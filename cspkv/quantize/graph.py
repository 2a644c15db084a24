"""Reading and rewriting exported ONNX graphs for the precision converters.

Nodes are found by structure (what a graph output depends on) or by the module they were traced
from (the dynamo exporter's "namespace" metadata, e.g. ``text.layers.3.mlp.down_proj``), never by
generated node names.
"""

from __future__ import annotations

import math
from collections import deque

import onnx
from onnx import numpy_helper

# RMSNorm modules stay fp32 in fp16 graphs: the mean square of the residual stream reaches ~1e6 in
# the default model (a few "massive activations" of ~1e3), far past float16's 65504.
NORM_MODULE_SUFFIXES = ("layernorm", "norm")


class GraphError(ValueError):
    """A graph the converters cannot rewrite; the message says what to do."""


def _producers(graph) -> dict[str, int]:
    return {output: index for index, node in enumerate(graph.node) for output in node.output}


def _ancestor_nodes(graph, tensors, producers=None, values_only: bool = False) -> set[int]:
    """Indices of the nodes that ``tensors`` depend on (subgraph-free graphs). ``values_only``
    does not follow a multiplication by zero: the prefill's ``after`` orders work through one
    (x + 0 * done), and what ``done`` depends on does not reach the value."""
    producers = producers or _producers(graph)
    zero_muls = _zero_multiplications(graph) if values_only else set()
    seen: set[int] = set()
    queue = deque(tensors)
    while queue:
        index = producers.get(queue.popleft())
        if index is None or index in seen:
            continue
        seen.add(index)
        if index not in zero_muls:
            queue.extend(graph.node[index].input)
    return seen


def _zero_multiplications(graph) -> set[int]:
    """Mul nodes with a constant scalar 0 operand."""
    zeros = {init.name for init in graph.initializer
             if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
             and math.prod(init.dims) == 1 and not numpy_helper.to_array(init).any()}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            if math.prod(tensor.dims) == 1 and not numpy_helper.to_array(tensor).any():
                zeros.add(node.output[0])
    return {i for i, node in enumerate(graph.node) if node.op_type == "Mul" and zeros & set(node.input)}


def scoring_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that only serve pruning (prefill: what the kept positions and
    ``slot_mass`` depend on, minus what ``logits`` depends on: window logits, scores, the
    selection) or the decode mass (what ``mass`` depends on beyond ``logits`` / ``new_kv``)."""
    graph = model.graph
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    if "slot_mass" in outputs:
        scoring = _ancestor_nodes(graph, ["slot_position", "slot_mass"], producers)
        main = _ancestor_nodes(graph, ["logits"], producers, values_only=True)
    elif "mass" in outputs:
        scoring = _ancestor_nodes(graph, ["mass"], producers)
        main = _ancestor_nodes(graph, ["logits", "new_kv"], producers)
    else:
        return []
    return [graph.node[i].name for i in sorted(scoring - main)]


def module_of(node) -> str:
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
        module = module_of(node)
        if any(module == m or module.startswith(m + ".") or module.startswith(m + "/") for m in wanted):
            names.append(node.name)
    return names


def module_type_nodes(model: onnx.ModelProto, types, op_types=("MatMul", "Gemm")) -> list[str]:
    """Names of the ``op_types`` nodes traced from a module whose last path component is one of
    ``types`` (e.g. "down_proj": every ``text.layers.<i>.mlp.down_proj``)."""
    suffixes = tuple("." + t for t in types)
    if not suffixes:
        return []
    return [node.name for node in model.graph.node if node.op_type in op_types and module_of(node).endswith(suffixes)]


def norm_nodes(model: onnx.ModelProto, suffixes=NORM_MODULE_SUFFIXES) -> list[str]:
    """Names of the nodes traced from a module whose last path component ends with a suffix
    (``text.layers.3.input_layernorm``, ``text.norm``)."""
    names = []
    for node in model.graph.node:
        leaf = module_of(node).rsplit(".", 1)[-1]
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
        raise GraphError("the converted graph has a cycle or a dangling input: report this as a bug")
    nodes = [onnx.NodeProto() for _ in ordered]
    for target, node in zip(nodes, ordered):
        target.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


def name_nodes(model: onnx.ModelProto) -> None:
    """Node-level block/exclude lists need unique node names; the exporter gives them, but make sure."""
    seen = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)



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
