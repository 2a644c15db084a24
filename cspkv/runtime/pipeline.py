"""Generation over an export folder: vision -> prefill (pruning inside) -> decode over fixed slots.

The slot bookkeeping here is the Python SlotTable; the C library replaces it with the same semantics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cspkv.engines.onnx_runtime import OrtEngine
from cspkv.runtime.slot_reference import RESCORE, RING, SlotTable


@dataclass
class PipelineResult:
    tokens: list[int]
    logits: list[np.ndarray]
    kept: np.ndarray                  # [layers, kv_heads, C] kept prompt positions
    prompt_len: int
    ttft_s: float
    step_s: list[float] = field(default_factory=list)
    kv_bytes: int = 0


class OnnxPipeline:
    def __init__(self, engine: OrtEngine):
        self.engine = engine
        self.manifest = engine.manifest

    def generate(self, input_ids, pixel_values=None, max_new_tokens: int = 32, policy: str = RING,
                 n_recent: int = 16, n_sink: int = 4, eos_token_id: int | None = None) -> PipelineResult:
        if policy not in (RING, RESCORE):
            raise ValueError(f"policy must be 'ring' or 'rescore', got {policy!r}")
        model = self.manifest["model"]
        plan = self.manifest["plan"]
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        modality = (input_ids == model["image_token_id"]).astype(np.int64)
        start = time.perf_counter()
        features = None
        if pixel_values is not None and len(pixel_values):
            features = self.engine.image_features(pixel_values).reshape(-1, model["hidden_size"])
        out = self.engine.prefill(input_ids, modality, features)
        ttft = time.perf_counter() - start
        layers, heads = model["layers"], model["kv_heads"]
        n_slots, c_max = plan["n_slots"], plan["max_keep"]
        null_logit = float(np.log(plan["decode_n"])) if plan["decode_n"] > 0 else None
        table = SlotTable(layers, heads, n_slots, policy=policy, n_recent=n_recent, n_sink=n_sink,
                          null_logit=null_logit)
        n_valid = out["slot_valid"][:, :, :c_max].sum(-1)
        table.load_prefill(out["slot_position"][:, :, :c_max], out["slot_modality"][:, :, :c_max],
                           n_valid, len(input_ids), out["slot_mass"][:, :, :c_max])
        kv = np.ascontiguousarray(out["kv"])
        kept = out["slot_position"][:, :, : int(n_valid.min())]
        tokens, logits, steps = [int(out["logits"][0].argmax())], [out["logits"][0]], []
        layer_idx, head_idx = np.indices((layers, heads))
        for step in range(max_new_tokens - 1):
            if eos_token_id is not None and tokens[-1] == eos_token_id:
                break
            t0 = time.perf_counter()
            position = len(input_ids) + step
            slots = table.choose_write_slots(position)
            bias = table.attention_bias()[:, None]
            step_logits, new_kv, mass = self.engine.decode(tokens[-1], position, kv, bias)
            # in place: the graph never copies the buffer
            kv[layer_idx, :, 0, head_idx, slots] = new_kv[:, :, 0, :, 0].transpose(0, 2, 1, 3)
            table.commit_token(slots, position)
            table.accumulate(mass[:, 0])
            steps.append(time.perf_counter() - t0)
            logits.append(step_logits[0])
            tokens.append(int(step_logits[0].argmax()))
        return PipelineResult(tokens, logits, kept, len(input_ids), ttft, steps, kv.nbytes)
