"""Engines that run an export folder (ONNX Runtime everywhere, TensorRT on NVIDIA GPUs) behind one small
interface, the one generation loop over them (generation.py), and the modality-aware top-k plugin."""
