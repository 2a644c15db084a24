"""cspkv: Cross-Self Pruning (CSP) of the KV cache of LLaVA-family vision-language models.

Subpackages, one job each:
  pruning      the methods (CSP and its baselines) as static-shape PyTorch policies
  models       model adapters: the LLaVA reference (prefill, pruning, decoding)
  export       static-shape ONNX graphs with the pruning inside
  engines      ONNX Runtime sessions, TensorRT engines and the top-k plugin
  calibration  INT8 calibration data and calibrators
  runtime      the C-owned fixed-budget KV ring buffer and the generation loop
  evaluation   benchmark tasks and scorers
"""

__version__ = "0.1.0"


def generate(*args, **kwargs):
    """Reference generation (see :func:`cspkv.models.llava.generate`)."""
    from cspkv.models.llava import generate as _generate

    return _generate(*args, **kwargs)
