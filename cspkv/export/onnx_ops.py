"""Custom translations for the dynamo ONNX exporter.

torch.sort(stable=True) has no ONNX translation. ONNX TopK with K = the whole axis and sorted=1 is
exactly a stable sort: the spec breaks ties by the lower index, which is the order a stable
descending sort keeps (and the pruning reference relies on). ONNX Runtime honours it (tested).
"""

import torch
from onnxscript import opset18 as op


def sort_stable(self, *, stable=None, dim=-1, descending=False):
    if dim not in (-1,):
        raise NotImplementedError("cspkv only sorts along the last axis")
    length = self.shape[-1] if self.shape is not None else None
    # a constant K (TensorRT needs one); shapes are static in every cspkv graph
    k = op.Constant(value_ints=[int(length)]) if isinstance(length, int) else op.Shape(self, start=-1)
    values, indices = op.TopK(self, k, axis=-1, largest=1 if descending else 0, sorted=1)
    return values, indices


CUSTOM_TRANSLATIONS = {torch.ops.aten.sort.stable: sort_stable}
