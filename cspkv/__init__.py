"""cspkv: Cross-Self Pruning (CSP) of the KV cache of LLaVA-family vision-language models.

Packages, bottom to top (each imports only from those below; pyproject.toml's import contract):
  runtime, pruning, data   the C KV buffer and the export reader; the pruning policies; easy-VQA data
  models                   the LLaVA reference, the default model, the prompt format
  export                   static-shape ONNX graphs with the pruning inside, and their manifest
  engines, evaluation      ONNX Runtime / TensorRT and the one generation loop; sweeps and scorers
  quantize, training       fp16/int8 conversion and calibration; the default model's training data
  bench                    csp-bench, the precision table, CI's latency gate
  cli                      csp-export, csp-run, csp-eval, csp-bench
and under them all durable (files a kill leaves readable) and heap (glibc heap settings for sweeps).
"""

__version__ = "0.1.0"


def generate(*args, **kwargs):
    """Reference generation (see :func:`cspkv.models.llava.generate`); imported on use, so that
    ``import cspkv.runtime`` does not load torch."""
    from cspkv.models.llava import generate as _generate

    return _generate(*args, **kwargs)
