"""Static-shape ONNX export of LLaVA with the pruning policy inside the prefill graph, the manifest
writer, and the TensorRT readiness check."""
