"""fp16 variant of an fp32 export (``onnxruntime.transformers.float16``).

Weights and activations in float16, with

* the K/V tensors in float16 too -- prefill's ``kv`` output, decode's ``past_key_<i>`` /
  ``past_value_<i>`` inputs and ``new_kv`` output -- so the runtime's C buffer holds float16
  (half the memory) and no step casts the cache; the manifest says ``kv_dtype: float16``;
* every other graph input/output in its fp32/int64 type (``keep_io_types``), so the runtime feeds
  and reads the same arrays as for fp32;
* in float32 (blocked from conversion): the pruning path of prefill -- the window logits, the
  n-softmax statistics (ReduceMax/Exp/ReduceSum/Div), the self/cross scores, the selection and the
  re-score mass -- found structurally (:func:`~cspkv.quantize.graph.scoring_path_nodes`), the decode
  mass path, every TopK and Softmax, and the RMSNorm modules (:func:`~cspkv.quantize.graph.norm_nodes`).
  The converter casts around each blocked node separately, so adjacent fp32 nodes would still pass
  values through float16: :func:`~cspkv.quantize.graph.remove_cast_round_trips` joins them, and the
  result is re-sorted topologically (checker / TensorRT parser order).
"""

from __future__ import annotations

import onnx

from cspkv.quantize.graph import name_nodes, norm_nodes, remove_cast_round_trips, scoring_path_nodes, topological_sort

FP16_OP_BLOCK = ("TopK", "Softmax")
KV_OUTPUTS = {"prefill": ("kv",), "decode": ("new_kv",)}


def fp16_graph(model: onnx.ModelProto, role: str, op_block_list=FP16_OP_BLOCK) -> tuple[onnx.ModelProto, dict]:
    """One graph in float16 with its K/V tensors float16 and its other inputs/outputs unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    name_nodes(model)
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
