"""Realistic sample inputs for each exported graph, saved in Polygraphy's JSON format.

Polygraphy's default data loader draws random values, which for our int64 inputs (a valid length
past P_max, a position beyond the context, modality ids other than 0/1) are not inputs the graphs
are defined for. These feeds are: `polygraphy run --onnxrt GRAPH --load-inputs FILE` then checks
a graph, and `--save-outputs` / `--load-outputs` compares two exports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sample_feeds(manifest: dict, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    model, plan, io = manifest["model"], manifest["plan"], manifest["io"]
    p = plan["max_prompt"]
    length = max(2, (3 * p) // 4)
    modality = np.zeros((1, p), np.int64)
    modality[0, 1:length // 2] = 1                      # an image block after the first token
    input_ids = rng.integers(0, model["vocab_size"], (1, p)).astype(np.int64)
    input_ids[modality == 1] = model["image_token_id"]
    shapes = {role: {name: spec["shape"] for name, spec in io[role]["inputs"].items()} for role in io}
    bias = np.where(rng.random(shapes["decode"]["bias"]) < 0.7, 0.0, -np.inf).astype(np.float32)
    bias[..., 0] = 0.0                                  # at least one valid slot
    decode_kv = {name: rng.standard_normal(shape).astype(np.float32)
                 for name, shape in shapes["decode"].items() if name.startswith("past_")}
    return {
        "vision": {"pixel_values": rng.standard_normal(shapes["vision"]["pixel_values"]).astype(np.float32)},
        "prefill": {"input_ids": input_ids,
                    "image_embeds": rng.standard_normal(shapes["prefill"]["image_embeds"]).astype(np.float32),
                    "modality": modality, "valid_length": np.array([length], np.int64)},
        "decode": {"token": np.array([[int(rng.integers(0, model["vocab_size"]))]], np.int64),
                   "position": np.array([length], np.int64),
                   "bias": bias, **decode_kv},
    }


def write_polygraphy_inputs(manifest: dict, out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    from polygraphy.json import save_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, feed in sample_feeds(manifest, seed).items():
        paths[role] = out / f"{role}_inputs.json"
        save_json([feed], str(paths[role]))
    return paths
