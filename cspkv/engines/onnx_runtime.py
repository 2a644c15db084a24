"""ONNX Runtime sessions over an export folder (CPU provider by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from cspkv.runtime.manifest import STAMP_KEY, ManifestError, check_graphs, kv_dtype, read_manifest

# onnxruntime's NodeArg.type -> numpy dtype name, as manifest.json writes them
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def session_io(session: ort.InferenceSession) -> dict:
    """{"inputs"|"outputs": {name: (shape, dtype)}} of a loaded graph (symbolic sizes stay strings)."""
    def specs(args):
        return {a.name: (list(a.shape), _ORT_TYPES.get(a.type, a.type)) for a in args}

    return {"inputs": specs(session.get_inputs()), "outputs": specs(session.get_outputs())}


class OrtEngine:
    """The three graphs of a csp-export folder as ONNX Runtime sessions, with shape checks."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 session_options: ort.SessionOptions | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        options = session_options or ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for role, name in self.manifest["graphs"].items():
            try:
                self.sessions[role] = ort.InferenceSession(str(self.folder / name), options,
                                                           providers=providers or ["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own types for unreadable graphs
                raise ManifestError(f"{self.folder / name} cannot be loaded by onnxruntime ({exc}): "
                                    "re-run csp-export") from None
        check_graphs(self.folder, self.manifest, {role: session_io(s) for role, s in self.sessions.items()},
                     {role: s.get_modelmeta().custom_metadata_map.get(STAMP_KEY) for role, s in self.sessions.items()})
        plan = self.manifest["plan"]
        self.max_prompt = plan["max_prompt"]
        self.n_slots = plan["n_slots"]
        self.vision_batch = plan["vision_batch"]
        self.image_size = plan["image_size"]
        self.hidden_size = self.manifest["model"]["hidden_size"]
        self.precision = self.manifest.get("precision", "fp32")
        self.kv_dtype = kv_dtype(self.manifest)          # float16 for fp16 exports, else float32

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] float32 -> [N, T, hidden], run in the graph's static batch."""
        return vision_in_batches(pixel_values, self.image_size, self.vision_batch,
                                 lambda chunk: self.sessions["vision"].run(None, {"pixel_values": chunk})[0])

    def prefill(self, input_ids: np.ndarray, modality: np.ndarray, image_features: np.ndarray | None) -> dict:
        """Pad a prompt of L <= P_max tokens and run prefill; image features are placed at the
        image positions in prompt order."""
        length = len(input_ids)
        if length > self.max_prompt:
            raise ValueError(f"the prompt has {length} tokens but this export takes at most "
                             f"{self.max_prompt} (--max-prompt): shorten it or re-export")
        n_image = int((modality == 1).sum())
        n_features = 0 if image_features is None else len(image_features)
        if n_image != n_features:
            raise ValueError(f"the prompt has {n_image} image positions but {n_features} image "
                             "feature rows were given: one image token per feature row")
        ids = np.zeros((1, self.max_prompt), np.int64)
        ids[0, :length] = input_ids
        mod = np.zeros((1, self.max_prompt), np.int64)
        mod[0, :length] = modality
        embeds = np.zeros((1, self.max_prompt, self.hidden_size), np.float32)
        if n_image:
            embeds[0, :length][modality == 1] = image_features
        names = ["logits", "kv", "slot_position", "slot_modality", "slot_valid", "slot_mass"]
        values = self.sessions["prefill"].run(names, {"input_ids": ids, "image_embeds": embeds,
                                                      "modality": mod, "valid_length": np.array([length], np.int64)})
        return dict(zip(names, values))

    def decode(self, token: int, position: int, kv: np.ndarray, bias: np.ndarray):
        """One decode step from a whole cache kv [layers, 2, 1, H, S, D] (tests and tools; the
        pipeline binds the per-layer inputs to its buffer instead)."""
        feed = {"token": np.array([[token]], np.int64), "position": np.array([position], np.int64),
                "bias": bias}
        for layer in range(kv.shape[0]):
            feed[f"past_key_{layer}"] = np.asarray(kv[layer, 0], dtype=self.kv_dtype)
            feed[f"past_value_{layer}"] = np.asarray(kv[layer, 1], dtype=self.kv_dtype)
        return self.sessions["decode"].run(None, feed)


def checked_pixels(pixel_values, image_size: int) -> np.ndarray:
    """float32 [N, 3, image_size, image_size] pixel values, or a ValueError saying what to do."""
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    expected = (3, image_size, image_size)
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
        raise ValueError(f"images must be pixel_values of shape [N, {', '.join(map(str, expected))}], "
                         f"got {list(pixel_values.shape)}: resize them to {image_size}x{image_size}")
    if not np.isfinite(pixel_values).all():
        raise ValueError("pixel_values hold a NaN or infinity: preprocess the images again")
    return pixel_values


def vision_in_batches(pixel_values, image_size: int, batch: int, run) -> np.ndarray:
    """Check [N, 3, H, W] pixel values and run ``run`` over chunks of the vision graph's static
    batch (the last one zero-padded); [N, T, hidden]. Shared by every engine backend."""
    pixel_values = checked_pixels(pixel_values, image_size)
    expected = pixel_values.shape[1:]
    outputs = []
    for start in range(0, len(pixel_values), batch):
        chunk = pixel_values[start:start + batch]
        missing = batch - len(chunk)
        if missing:
            chunk = np.concatenate([chunk, np.zeros((missing, *expected), np.float32)])
        outputs.append(run(chunk)[: batch - missing])
    return np.concatenate(outputs)
