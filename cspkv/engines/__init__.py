"""ONNX Runtime sessions, TensorRT FP16/INT8 engines and the modality-aware top-k plugin (issue: engines)."""
