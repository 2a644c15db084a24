"""INT4 weight-only variant of an fp32 export (``onnxruntime.quantization.matmul_nbits_quantizer``, QDQ).

Every MatMul of the language model with a constant 2-D weight [K, N] -- q/k/v/o_proj, gate/up/down_proj
of each layer and ``lm_head`` -- in the prefill and decode graphs gets its weight quantized to 4 bits in
blocks of :data:`INT4_BLOCK_SIZE` consecutive K values per output column (round to nearest, symmetric:
the value of largest magnitude maps to -8), written in the standard ONNX form: an INT4 initializer and
its float32 per-block scales feeding ``DequantizeLinear(axis=0, block_size)``, then the original MatMul.
That form needs opset 21 (blocked DequantizeLinear and the 4-bit types), so the two graphs are raised
from 18 to 21; none of the operators they use changed meaning between the two. ONNX Runtime's CPU
provider fuses each DequantizeLinear -> MatMul pair into its 4-bit MatMulNBits kernel when the session is
created (at its default accuracy level for that fusion, 4: activations quantized to int8 per block);
with graph optimisations off the graph computes exactly what it says: dequantize, then a float MatMul.

``lm_head``: csp-export stores a tied embedding's transpose as the head's own [hidden, vocab] weight, so
it is quantized like the other linear layers while the table the embedding Gather reads stays float;
``quantize_lm_head=False`` keeps it float instead.

Kept in float, and named in the manifest with the reason (:func:`int4_plan`): a MatMul whose K is
smaller than the block size or not a multiple of it (a partial block would get a range of its own, and
the fused kernel takes whole blocks); a weight that is not a 2-D initializer, and Gemm nodes (the
quantizer handles MatMul only); the whole vision graph (:data:`INT4_GRAPHS`); and every activation x
activation MatMul (attention, pruning scores), which has no weight. The K/V stay float32.

The choices were measured on the default model (docs/quantization.md): symmetric against asymmetric,
lm_head int4 against float, this QDQ form against the MatMulNBits contrib op.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import numpy_helper

from cspkv.quantize.graph import module_of, name_nodes, weight_matmuls

# Blocks of 32 along K: the block of the default model's Q4_1 GGUF (and of Q4_0 / Q8_0 and of the
# Q4_K sub-blocks), so each exported block spans the same 32 weights as one GGUF block.
INT4_BLOCK_SIZE = 32
# Symmetric INT4 (no zero point): what TensorRT's explicit quantization takes, and on the default model
# closer to fp32 than asymmetric UINT4 (teacher-forced on 12 train-split prompts, lm_head float: 5.6% of
# answer positions flip and KL 0.081, against 6.9% and 0.087), although asymmetric is nearer the Q4_1 weights.
INT4_SYMMETRIC = True
INT4_GRAPHS = ("prefill", "decode")
INT4_OPSET = 21
LM_HEAD = "lm_head"


class Int4Error(ValueError):
    """An INT4 request that cannot be done; the message says what to do."""


def check_block_size(block_size) -> int:
    """Block sizes ONNX Runtime's 4-bit kernel takes: a power of two, at least 16."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 16 \
            or block_size & (block_size - 1):
        raise Int4Error(f"the int4 block size must be a power of two >= 16 (ONNX Runtime's 4-bit kernel), "
                        f"got {block_size!r}: use 32, the GGUF block")
    return int(block_size)


def int4_plan(model: onnx.ModelProto, block_size: int = INT4_BLOCK_SIZE,
              quantize_lm_head: bool = True) -> tuple[list[str], dict[str, str]]:
    """(names of the weight MatMuls to quantize, {module (or node) kept float: why}) of one graph."""
    inits = {i.name: i for i in model.graph.initializer}
    weights = weight_matmuls(model)
    quantize, kept = [], {}
    for node in model.graph.node:
        if node.name not in weights:
            continue
        where = module_of(node) or node.name
        init = inits.get(node.input[1])
        if where == LM_HEAD and not quantize_lm_head:
            kept[where] = "lm_head kept float on request (quantize_lm_head=False)"
        elif node.op_type != "MatMul":
            kept[where] = f"{node.op_type}: only MatMul weights are quantized"
        elif init is None:
            kept[where] = "weight is a Constant node, not an initializer"
        elif len(init.dims) != 2:
            kept[where] = f"weight is {len(init.dims)}-D {list(init.dims)}, not 2-D"
        elif init.dims[0] < block_size:
            kept[where] = f"K={init.dims[0]} is smaller than the block size {block_size}"
        elif init.dims[0] % block_size:
            kept[where] = f"K={init.dims[0]} is not a multiple of the block size {block_size}"
        else:
            quantize.append(node.name)
    return quantize, kept


@contextmanager
def _quiet_quantizer():
    """Import onnxruntime's 4-bit quantizer without its side effects on logging: the module calls
    ``logging.basicConfig(level=INFO)`` on import and logs every node it visits."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    logger = matmul_nbits_quantizer.logger
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield matmul_nbits_quantizer
    finally:
        logger.setLevel(before)


def _one_dequantize_per_weight(model: onnx.ModelProto) -> None:
    """The quantizer writes a DequantizeLinear (and its codes and scales) for each MatMul; a weight
    that several MatMuls read (the chunked prefill reads each projection once per chunk) then gets
    the same names several times. Keep the first of each: the copies are the same tensors."""
    seen_outputs, nodes = set(), []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in seen_outputs:
            continue
        seen_outputs.update(node.output)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    seen, initializers = set(), []
    for tensor in model.graph.initializer:
        if tensor.name not in seen:
            seen.add(tensor.name)
            initializers.append(tensor)
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)


def int4_graph(model: onnx.ModelProto, block_size: int = INT4_BLOCK_SIZE, symmetric: bool = INT4_SYMMETRIC,
               quantize_lm_head: bool = True) -> tuple[onnx.ModelProto, dict]:
    """One graph with its blockable weight MatMuls in blocked INT4 QDQ form (``model`` is changed in
    place and returned), and the record of what was done."""
    from onnxruntime.quantization.quant_utils import QuantFormat

    block_size = check_block_size(block_size)
    name_nodes(model)
    quantize, kept = int4_plan(model, block_size, quantize_lm_head)
    weights = weight_matmuls(model)
    for entry in model.opset_import:          # blocked DequantizeLinear and INT4/UINT4 need opset 21
        if entry.domain in ("", "ai.onnx") and entry.version < INT4_OPSET:
            entry.version = INT4_OPSET
    chosen = set(quantize)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    # the quantizer's new nodes carry no metadata: give each the "namespace" (module) of the MatMul it replaces
    traced = {n.output[0]: list(n.metadata_props) for n in model.graph.node if n.name in chosen}
    distinct = len({n.input[1] for n in model.graph.node if n.name in chosen})   # weights, each read by 1+ MatMuls
    with _quiet_quantizer() as nbits:
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                    quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",),
                                                    bits=4)
        quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
        quantizer.process()
        result = quantizer.model.model
    _one_dequantize_per_weight(result)
    for node in result.graph.node:
        if node.op_type == "MatMul" and node.output[0] in traced and not node.metadata_props:
            node.metadata_props.extend(traced[node.output[0]])
    producers = {o: n for n in result.graph.node for o in n.output}
    for node in result.graph.node:
        source = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if source is not None and source.op_type == "DequantizeLinear" and not source.metadata_props:
            source.metadata_props.extend(node.metadata_props)
    dequantize = sum(1 for n in result.graph.node if n.op_type == "DequantizeLinear")
    if dequantize != distinct:
        raise Int4Error(f"onnxruntime's quantizer blocked {dequantize} of the {distinct} planned weights "
                        "(MatMul inputs): report this as a bug")
    return result, {"weight_matmuls": len(weights), "int4_matmuls": len(quantize), "kept_float": kept}


def dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{MatMul node name: its weight as the graph computes it} for each MatMul fed by a blocked
    DequantizeLinear: (q - zero_point) * scale, each scale and zero point repeated over its block."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        source = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if source is None or source.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in source.attribute}
        block = attrs["block_size"]
        q = numpy_helper.to_array(inits[source.input[0]]).astype(np.float32)
        scale = np.repeat(numpy_helper.to_array(inits[source.input[1]]).astype(np.float32), block, axis=0)
        zero = 0.0
        if len(source.input) > 2 and source.input[2]:
            zero = np.repeat(numpy_helper.to_array(inits[source.input[2]]).astype(np.float32), block, axis=0)
        found[node.name] = ((q - zero) * scale).astype(np.float32)
    return found


def quantize_graphs(src, dst, manifest: dict, block_size: int = INT4_BLOCK_SIZE, symmetric: bool = INT4_SYMMETRIC,
                    quantize_lm_head: bool = True, roles=INT4_GRAPHS, progress=lambda message: None) -> dict:
    """INT4 of the graphs in ``roles`` of the export at ``src`` into ``dst`` (the others are copied as
    fp32). Returns the conversion record for the manifest."""
    import shutil

    conversion = {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                  "algorithm": "round to nearest (DefaultWeightOnlyQuantConfig)", "format": "QDQ", "opset": INT4_OPSET,
                  "weight_type": "INT4" if symmetric else "UINT4", "bits": 4, "block_size": block_size,
                  "block_axis": "K (each output column's weights in blocks of block_size)",
                  "symmetric": symmetric, "scale_type": "float32", "quantize_lm_head": quantize_lm_head,
                  "kv": "float32", "graphs": {}}
    for role, name in manifest["graphs"].items():
        if role not in roles:
            shutil.copy2(src / name, dst / name)
            conversion["graphs"][role] = {"quantized": False, "kept_float": {
                role: "int4 covers the language model's linear layers; this graph is copied as fp32"}}
            continue
        progress(f"int4: quantizing {role} graph (block {block_size}, {'symmetric' if symmetric else 'asymmetric'})")
        start = time.perf_counter()
        model, info = int4_graph(onnx.load(str(src / name)), block_size, symmetric, quantize_lm_head)
        onnx.save(model, str(dst / name))
        for module, why in info["kept_float"].items():
            progress(f"int4: {role}: {module} kept float ({why})")
        conversion["graphs"][role] = {"quantized": True, **info, "seconds": round(time.perf_counter() - start, 2)}
    return conversion
