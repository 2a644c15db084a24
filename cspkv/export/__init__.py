"""Static-shape ONNX export of LLaVA with the pruning policy inside the prefill graph (issue: export)."""
