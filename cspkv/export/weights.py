"""One copy of the language model's weights for the prefill and decode graphs.

Both graphs are traced from the same model, so they hold the same weight tensors under different
exporter-generated names. :func:`share_weights` gives every float weight (a large float initializer
that only MatMul, Gemm or Gather read) a name derived from its content, stores each distinct tensor once in ``weights.bin`` (standard ONNX external data, so
onnx, polygraphy and TensorRT's parser read the graphs as usual) and returns the table the manifest
records. The ONNX Runtime engine reads ``weights.bin`` once and hands the same buffers to both
sessions (:mod:`cspkv.engines.onnx_runtime`), where two self-contained graph files would each be
loaded into a copy of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from cspkv.durable import write_atomic
from cspkv.runtime.manifest import WEIGHTS_FILE, TABLE_FILE

SHARED_ROLES = ("prefill", "decode")
PREFIX = "cspkv.w"         # shared initializer names: cspkv.w0, cspkv.w1, ...
MIN_BYTES = 1024           # smaller constants stay inside their graph
# Only float weights move: initializers read by these ops alone. Other constants (rotary tables, masks)
# stay inline, where ONNX Runtime's graph optimizer can fold them (with a shared rotary table its fusions
# produce a wrong broadcast), and so do quantized weights, whose DequantizeLinear -> MatMul fusions and
# repacking into ONNX Runtime's int8/int4 kernels need constant initializers of the graph's own.
WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Gather"})
WEIGHT_DTYPES = (np.float32, np.float16)
ALIGN = 64                 # every tensor starts on a 64-byte boundary (aligned loads, no copy to realign)


def _rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Point every node input (subgraphs included: they may read outer-scope initializers) at the new names."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attribute.g, renamed)
            for subgraph in attribute.graphs:
                _rename_inputs(subgraph, renamed)


def _consumers(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """value name -> the op types that read it (subgraphs included)."""
    readers: dict[str, set[str]] = {}

    def visit(g):
        for node in g.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.op_type)
            for attribute in node.attribute:
                for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
                    visit(subgraph)

    visit(graph)
    return readers


def _fold_transposes(graph: onnx.GraphProto) -> None:
    """Replace Transpose(initializer) by the transposed initializer (a tied embedding reaches the LM head
    through one), so the transposed weight is stored and shared too instead of folded in each session."""
    initializers = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        array = numpy_helper.to_array(initializers[node.input[0]])
        folded = numpy_helper.from_array(np.ascontiguousarray(np.transpose(array, perm)), node.output[0])
        graph.initializer.append(folded)
        graph.node.remove(node)


def _external(template: onnx.TensorProto, name: str, offset: int, nbytes: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=template.data_type, dims=template.dims,
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def share_weights(folder: str | Path, graphs: dict[str, str]) -> dict:
    """Move the large initializers of the prefill and decode graphs named in ``graphs`` (role -> file)
    into one ``weights.bin``, each distinct tensor once, and rewrite both graphs to read it.

    Graphs may already read a ``weights.bin`` in ``folder`` (a converted copy of a shared export):
    everything is loaded before the file is replaced. The table of tensors goes to ``weights.json``
    (``{name: [offset, nbytes, dtype, shape]}``; hashed in the manifest like every file). Returns the
    manifest's ``weights`` entry: ``{"file": "weights.bin", "table": "weights.json"}``.
    """
    folder = Path(folder)
    models = {role: onnx.load(str(folder / graphs[role])) for role in SHARED_ROLES if role in graphs}
    names: dict[tuple, str] = {}            # (dtype, shape, sha256) -> shared name
    tensors: dict[str, list] = {}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    with open(tmp, "wb") as out:
        for role, model in models.items():
            graph = model.graph
            _fold_transposes(graph)
            initializers = {t.name for t in graph.initializer}
            outputs = {v.name for v in graph.output}
            taken = ({v for node in graph.node for v in (*node.input, *node.output)}
                     | {v.name for v in graph.input} | outputs) - initializers
            readers = _consumers(graph)
            kept, renamed, written = [], {}, set()
            for tensor in graph.initializer:
                if tensor.name not in readers and tensor.name not in outputs:
                    continue                       # read by nothing (a weight whose transposes were folded)
                array = numpy_helper.to_array(tensor)
                if (array.nbytes < MIN_BYTES or tensor.name in outputs or array.dtype not in WEIGHT_DTYPES
                        or not readers.get(tensor.name, {""}) <= WEIGHT_OPS):
                    kept.append(tensor)
                    continue
                data = np.ascontiguousarray(array).tobytes()
                key = (array.dtype.str, array.shape, hashlib.sha256(data).hexdigest())
                if key not in names:
                    names[key] = f"{PREFIX}{len(names)}"
                    out.write(b"\0" * (-out.tell() % ALIGN))
                    tensors[names[key]] = [out.tell(), len(data), array.dtype.name, list(array.shape)]
                    out.write(data)
                name = names[key]
                if name in taken:
                    raise ValueError(f"{graphs[role]} already uses the name {name}: cannot share its weights")
                renamed[tensor.name] = name
                if name not in written:            # two equal initializers in one graph become one
                    written.add(name)
                    kept.append(_external(tensor, name, *tensors[name][:2]))
            del graph.initializer[:]
            graph.initializer.extend(kept)
            _rename_inputs(graph, renamed)
        out.flush()
        os.fsync(out.fileno())
    for role, model in models.items():
        onnx.save(model, str(folder / graphs[role]))
    os.replace(tmp, folder / WEIGHTS_FILE)
    write_atomic(folder / TABLE_FILE, json.dumps(tensors, indent=0) + "\n")
    return {"file": WEIGHTS_FILE, "table": TABLE_FILE}
