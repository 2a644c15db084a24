"""Generation over an export folder: vision -> prefill (pruning inside) -> decode over fixed slots.

The KV memory and slot table live in the C library (:class:`KVBuffer`). ONNX Runtime reads the
buffer in place: the decode graph's ``past_key_<i>`` / ``past_value_<i>`` inputs are bound once,
with IOBinding, to OrtValues over each layer's block of the C-owned memory, and its outputs go to preallocated arrays; the new token's K/V delta is then
copied into its slot by the C library. Nothing grows after construction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from cspkv.engines.onnx_runtime import OrtEngine, checked_pixels
from cspkv.runtime.manifest import ManifestError
from cspkv.runtime.kv_buffer import ABI_VERSION, KVBuffer, NonFiniteError
from cspkv.runtime.slot_reference import RESCORE, RING

TEXT = 0


@dataclass
class PipelineResult:
    tokens: list[int]
    logits: list[np.ndarray]
    kept: np.ndarray                  # [layers, kv_heads, C] kept prompt positions
    prompt_len: int
    ttft_s: float
    step_s: list[float] = field(default_factory=list)
    kv_bytes: int = 0                 # K/V memory held (fixed)
    full_kv_bytes: int = 0            # what an unpruned cache would hold for this sequence

    @property
    def tokens_per_s(self) -> float:
        return len(self.step_s) / sum(self.step_s) if self.step_s else 0.0


class OnnxPipeline:
    """One sequence at a time over an export folder; reusable across requests."""

    def __init__(self, engine: OrtEngine | str, policy: str = RING, n_recent: int = 16, n_sink: int = 4,
                 copy_cache_each_step: bool = False):
        self.engine = engine if isinstance(engine, OrtEngine) else OrtEngine(engine)
        self.manifest = self.engine.manifest
        abi = self.manifest.get("runtime_abi")
        if abi != ABI_VERSION:
            raise ManifestError(f"{self.engine.folder} was exported for runtime ABI {abi!r}, this runtime "
                                f"speaks ABI {ABI_VERSION}: re-export it with this cspkv")
        if policy not in (RING, RESCORE):
            raise ValueError(f"policy must be 'ring' or 'rescore', got {policy!r}")
        model, plan = self.manifest["model"], self.manifest["plan"]
        self.layers, self.heads, self.head_dim = model["layers"], model["kv_heads"], model["head_dim"]
        self.n_slots, self.max_keep = plan["n_slots"], plan["max_keep"]
        null_logit = float(np.log(plan["decode_n"])) if plan["decode_n"] > 0 else None
        self.kv_dtype = self.engine.kv_dtype         # manifest kv_dtype: float16 for fp16 exports
        self.buffer = KVBuffer(self.layers, self.heads, self.n_slots, self.head_dim, self.kv_dtype, policy,
                               n_recent, n_sink, null_logit)
        # The slower design the runtime avoids (hand the graph a fresh copy of the whole cache every
        # step); kept only so the latency regression check can show it would catch it.
        self.copy_cache_each_step = copy_cache_each_step
        self._bind_decode(model["vocab_size"])

    def _bind_decode(self, vocab: int) -> None:
        """Bind the C-owned K/V memory and preallocated outputs to the decode session once."""
        session = self.engine.sessions["decode"]
        self._binding = session.io_binding()
        kv_view = self.buffer.kv.reshape(self.layers, 2, 1, self.heads, self.n_slots, self.head_dim)
        assert kv_view.ctypes.data == self.buffer.kv_ptr  # a view, not a copy
        self._kv_values = []                                            # keep the OrtValues alive
        for layer in range(self.layers):
            for part, name in enumerate(("past_key", "past_value")):
                block = kv_view[layer, part]                            # contiguous [1, H, S, D] view
                value = ort.OrtValue.ortvalue_from_numpy(block)         # wraps, does not copy (CPU)
                assert value.data_ptr() == block.ctypes.data
                self._binding.bind_ortvalue_input(f"{name}_{layer}", value)
                self._kv_values.append(value)
        self._out = {
            "logits": np.empty((1, vocab), np.float32),
            "new_kv": np.empty((self.layers, 2, 1, self.heads, 1, self.head_dim), self.kv_dtype),
            "mass": np.empty((self.layers, 1, self.heads, self.n_slots), np.float32),
        }
        for name, array in self._out.items():
            self._binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self._token = np.zeros((1, 1), np.int64)
        self._position = np.zeros((1,), np.int64)
        self._bias = np.zeros((self.layers, 1, self.heads, self.n_slots), np.float32)
        for name, array in (("token", self._token), ("position", self._position), ("bias", self._bias)):
            self._binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))

    def _decode(self, token: int, position: int) -> None:
        self._token[0, 0] = token
        self._position[0] = position
        self.buffer.attention_bias(out=self._bias.reshape(self.buffer.shape))   # in place, a view
        if self.copy_cache_each_step:
            copied = np.array(self.buffer.kv).reshape(self.layers, 2, 1, self.heads, self.n_slots, self.head_dim)
            for layer in range(self.layers):
                for part, name in enumerate(("past_key", "past_value")):
                    self._binding.bind_ortvalue_input(f"{name}_{layer}",
                                                      ort.OrtValue.ortvalue_from_numpy(copied[layer, part]))
        self.engine.sessions["decode"].run_with_iobinding(self._binding)

    def step(self, token: int, position: int) -> np.ndarray:
        """One decode step: feed ``token`` at ``position``, store its K/V in the buffer's chosen
        slots, add the attention mass; returns the logits (a view, overwritten by the next step)."""
        slots = self.buffer.choose_write_slots(position)
        self._decode(token, position)
        try:
            self.buffer.write_token(slots, self._out["new_kv"], position, TEXT)
        except NonFiniteError as exc:
            raise ValueError(f"the decode graph's K/V at position {position} hold a NaN or infinity ({exc.detail}): "
                             "its numbers overflowed; run the fp32 export") from None
        if self.buffer.policy == RESCORE:      # only re-scoring reads the accumulated mass
            self.buffer.accumulate(self._out["mass"][:, 0])
        return self._out["logits"][0]

    def generate(self, input_ids, pixel_values=None, max_new_tokens: int = 32,
                 eos_token_id: int | None = None, on_token: Callable[[int], None] | None = None,
                 keep_logits: bool = True, forced_tokens=None) -> PipelineResult:
        """Greedy decoding. ``forced_tokens`` (teacher forcing): step i feeds forced_tokens[i] instead of
        the token it chose, so two engines can be compared position by position on one answer (the
        returned tokens are still each step's argmax); decoding stops when they run out."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if forced_tokens is not None:
            forced_tokens = [int(t) for t in forced_tokens]
            max_new_tokens = min(max_new_tokens, len(forced_tokens))
            if max_new_tokens < 1:
                raise ValueError("forced_tokens is empty: give the tokens to feed, or None to decode greedily")
        model, plan = self.manifest["model"], self.manifest["plan"]
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        modality = (input_ids == model["image_token_id"]).astype(np.int64)
        # Sizes are checked before any image is encoded: the vision graph is the slow part.
        if len(input_ids) > plan["max_prompt"]:
            raise ValueError(f"the prompt has {len(input_ids)} tokens but this export takes at most "
                             f"{plan['max_prompt']} (--max-prompt): shorten it or re-export")
        if pixel_values is not None:
            pixel_values = checked_pixels(pixel_values, plan["image_size"])
        n_images = 0 if pixel_values is None else len(pixel_values)
        if int(modality.sum()) != n_images * plan["image_tokens"]:
            raise ValueError(f"the prompt has {int(modality.sum())} image tokens but {n_images} images of "
                             f"{plan['image_tokens']} tokens were given: one image placeholder per image")
        start = time.perf_counter()
        features = None
        if pixel_values is not None and len(pixel_values):
            features = self.engine.image_features(pixel_values).reshape(-1, model["hidden_size"])
        out = self.engine.prefill(input_ids, modality, features)
        c = self.max_keep
        n_valid = out["slot_valid"][:, :, :c].sum(-1).astype(np.int32)
        kv = np.ascontiguousarray(out["kv"][:, :, 0, :, :c], dtype=self.kv_dtype)  # [layers, 2, H, C, D]
        try:
            self.buffer.load_prefill(kv, out["slot_position"][:, :, :c], out["slot_modality"][:, :, :c],
                                     n_valid, len(input_ids), out["slot_mass"][:, :, :c])
        except NonFiniteError as exc:
            raise ValueError(f"the prefill graph's K/V hold a NaN or infinity ({exc.detail}): its numbers "
                             "overflowed; run the fp32 export") from None
        kept = out["slot_position"][:, :, : int(n_valid.min())]
        tokens, logits, steps = [int(out["logits"][0].argmax())], [out["logits"][0].copy()], []
        ttft = time.perf_counter() - start
        if on_token:
            on_token(tokens[0])
        for step in range(max_new_tokens - 1):
            fed = tokens[-1] if forced_tokens is None else forced_tokens[step]
            if eos_token_id is not None and fed == eos_token_id:
                break
            t0 = time.perf_counter()
            tokens.append(int(self.step(fed, len(input_ids) + step).argmax()))
            if keep_logits:  # off for long runs: the only per-token memory the loop would keep
                logits.append(self._out["logits"][0].copy())
            steps.append(time.perf_counter() - t0)
            if on_token:
                on_token(tokens[-1])
        per_entry = self.layers * 2 * self.heads * self.head_dim * self.kv_dtype.itemsize
        return PipelineResult(tokens, logits, kept, len(input_ids), ttft, steps, self.buffer.nbytes,
                              (len(input_ids) + len(tokens)) * per_entry)
