"""SmoothQuant (Xiao et al., 2023) on an ONNX graph, before INT8 quantization.

    peaks = activation_channel_peaks(model, feeds, groups)        # per-channel max |X| over calibration feeds
    smoothed, info = smooth_graph(model, peaks, alpha=0.5)

A weight MatMul ``Y = X @ W`` equals ``(X / s) @ (s[:, None] * W)`` for any positive per-channel ``s``.
With ``s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)`` the few activation channels that carry large
values (and so set a per-tensor int8 scale, most of all a symmetric one: s8s8) are divided down and the
difficulty moves into the weights, which are quantized per output channel. Weight MatMuls that read
the same X (q/k/v, gate/up) share one ``s`` and one inserted ``Mul(X, 1/s)``; the graph stays fp32
and computes the same function (up to rounding).

Why not onnxruntime's ``extra_options={"SmoothQuant": True}``: it imports
``neural_compressor.adaptor.ox_utils``, which only neural-compressor 2.x has, and 2.x needs
numpy < 2 (this project's torch needs numpy 2) plus pandas, scikit-learn, opencv and pycocotools.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

SMOOTH_MIN_SCALE = 1e-5   # s is clipped here: a dead channel (max |X| = 0) must not zero a weight row


def smoothing_groups(model: onnx.ModelProto, skip_nodes=()) -> dict[str, list[str]]:
    """{activation tensor: [MatMul node names]} of the MatMuls with an initializer weight of rank 2
    (``X [..., in] @ W [in, out]``), grouped by the activation they read; ``skip_nodes`` (kept fp32
    anyway) are left out."""
    initializers = {i.name: i for i in model.graph.initializer}
    skip = set(skip_nodes)
    groups: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in skip or len(node.input) != 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            continue
        groups[node.input[0]].append(node.name)
    return dict(groups)


def activation_channel_peaks(model: onnx.ModelProto, feeds, tensors) -> dict[str, np.ndarray]:
    """{tensor: max |x| per last-axis channel} over ``feeds`` (an iterable of input dicts), from the
    fp32 graph with ``tensors`` added as outputs (one onnxruntime session, CPU)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(tensors)
    peaks: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            value = np.abs(np.asarray(value, dtype=np.float32))
            peak = value.reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = peak if name not in peaks else np.maximum(peaks[name], peak)
    if not peaks:
        raise ValueError("no calibration feeds to measure activation peaks on")
    return peaks


def smooth_graph(model: onnx.ModelProto, peaks: dict[str, np.ndarray], alpha: float = 0.5,
                 groups: dict[str, list[str]] | None = None) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with each group of ``groups`` (default :func:`smoothing_groups`) smoothed:
    a ``Mul(X, 1/s)`` inserted and every weight of the group scaled by ``s`` row-wise. Returns
    (model, info with the number of groups and the largest per-tensor peak before/after)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    graph = smoothed.graph
    groups = smoothing_groups(smoothed) if groups is None else groups
    nodes = {node.name: node for node in graph.node}
    initializers = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    insert_after: dict[str, onnx.NodeProto] = {}
    new_initializers = []
    before, after = [], []
    for activation, members in groups.items():
        if activation not in peaks:
            continue
        weights = [numpy_helper.to_array(initializers[nodes[m].input[1]]).astype(np.float32) for m in members]
        x_peak = peaks[activation].astype(np.float64)
        if any(w.shape[0] != x_peak.shape[0] for w in weights):
            continue  # not X[..., in] @ W[in, out] over the channel axis measured
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        scale = np.power(np.maximum(x_peak, 1e-12), alpha) / np.power(np.maximum(w_peak, 1e-12), 1.0 - alpha)
        scale = np.clip(scale, SMOOTH_MIN_SCALE, None)
        scale[x_peak == 0] = 1.0
        before.append(float(x_peak.max()))
        after.append(float((x_peak / scale).max()))
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{activation}_smooth_inv")
        new_initializers.append(inverse)
        smoothed_name = f"{activation}_smoothed"
        insert_after[activation] = onnx.helper.make_node(
            "Mul", [activation, inverse.name], [smoothed_name], name=f"{activation}_smooth_mul")
        for member, weight in zip(members, weights):
            node = nodes[member]
            original = node.input[1]
            scaled = (weight * scale[:, None]).astype(np.float32)
            if readers[original] == 1:
                initializers[original].CopyFrom(numpy_helper.from_array(scaled, original))
            else:  # the weight is also read elsewhere: the smoothed copy is this node's own
                new_initializers.append(numpy_helper.from_array(scaled, f"{original}_smoothed"))
                node.input[1] = f"{original}_smoothed"
            node.input[0] = smoothed_name
    graph.initializer.extend(new_initializers)
    # the Mul goes right after the producer of X (or first, for a graph input), so order stays topological
    ordered = []
    pending = dict(insert_after)
    for name in [i.name for i in graph.input] + [i.name for i in graph.initializer]:
        if name in pending:
            ordered.append(pending.pop(name))
    for node in graph.node:
        ordered.append(node)
        for output in node.output:
            if output in pending:
                ordered.append(pending.pop(output))
    del graph.node[:]
    graph.node.extend(ordered)
    return smoothed, {"alpha": alpha, "groups": len(before), "matmuls": sum(len(groups[a]) for a in groups if a in peaks),
                      "max_input_peak_before": round(max(before), 3) if before else None,
                      "max_input_peak_after": round(max(after), 3) if after else None}
