"""The one generation loop: vision -> prefill (pruning inside) -> greedy decode over fixed KV slots.

An engine (ONNX Runtime: :class:`cspkv.engines.onnx_runtime.OrtEngine`; TensorRT:
:class:`cspkv.engines.tensorrt.TrtEngine`) runs the export's three graphs and owns where the K/V
memory lives; :class:`Pipeline` owns everything else, for every engine alike: the size checks before
any graph runs, the C library's slot choice and attention bias, the write-back of each new token's
K/V, the re-score mass, streaming, teacher forcing, EOS and the timing summary.

What an engine provides (duck-typed):

* ``manifest``, ``folder``, ``kv_dtype``
* ``image_features(pixel_values) -> [N, T, hidden]``
* ``prefill(input_ids, modality, image_features) -> dict`` of host arrays: ``logits``,
  ``slot_position``, ``slot_modality``, ``slot_valid``, ``slot_mass`` (and ``kv`` when the engine
  returns the pruned K/V rather than writing it into the buffer)
* ``new_buffer(eviction, n_recent, n_sink, null_logit) -> KVBuffer``: the buffer, bound to the
  decode graph (its K/V read in place every step)
* ``load_prefill(buffer, out, c, n_valid, prompt_len)``: the pruned prompt into the buffer
* ``bias``: the host array the decode graph reads the attention bias from
* ``decode_step(token, position) -> (logits, mass)``: one decode graph run
* ``write_token(buffer, slots, position)``: the step's new K/V into the chosen slots
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cspkv.runtime.kv_buffer import ABI_VERSION, NonFiniteError
from cspkv.runtime.manifest import ManifestError
from cspkv.runtime.slot_reference import EVICTIONS, RESCORE, RING, null_slot_logit

TEXT = 0
MIB = 1024 * 1024


@dataclass
class PipelineResult:
    tokens: list[int]
    logits: list[np.ndarray]
    kept: np.ndarray                  # [layers, kv_heads, C] kept prompt positions (-1: a layer keeping fewer)
    prompt_len: int
    ttft_s: float
    step_s: list[float] = field(default_factory=list)
    kv_bytes: int = 0                 # K/V memory held (fixed)
    full_kv_bytes: int = 0            # what an unpruned cache would hold for this sequence
    vision_s: float = 0.0             # the part of ttft_s spent in the vision graph

    @property
    def tokens_per_s(self) -> float:
        return len(self.step_s) / sum(self.step_s) if self.step_s else 0.0

    def summary(self) -> str:
        """One line: prompt length, time to first token, decode rate, K/V held against the full cache."""
        return (f"prompt {self.prompt_len} tokens | TTFT {self.ttft_s * 1e3:.0f} ms | {self.tokens_per_s:.1f} tokens/s "
                f"| KV {self.kv_bytes / MIB:.2f} MiB fixed vs {self.full_kv_bytes / MIB:.2f} MiB full cache")


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
    batch (the last one zero-padded); [N, T, hidden]."""
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


class Pipeline:
    """One sequence at a time over an engine; reusable across requests. Nothing grows after
    construction: the K/V buffer is the C library's, sized by the export's plan."""

    def __init__(self, engine, eviction: str = RING, n_recent: int = 16, n_sink: int = 4):
        self.engine = engine
        self.manifest = engine.manifest
        abi = self.manifest.get("runtime_abi")
        if abi != ABI_VERSION:
            raise ManifestError(f"{engine.folder} was exported for runtime ABI {abi!r}, this runtime "
                                f"speaks ABI {ABI_VERSION}: re-export it with this cspkv")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be 'ring' or 'rescore', got {eviction!r}")
        model, plan = self.manifest["model"], self.manifest["plan"]
        self.layers, self.heads, self.head_dim = model["layers"], model["kv_heads"], model["head_dim"]
        self.n_slots, self.max_keep = plan["n_slots"], plan["max_keep"]
        self.kv_dtype = engine.kv_dtype
        self.eviction = eviction
        null_logit = null_slot_logit(plan["decode_n"])
        self.buffer = engine.new_buffer(eviction, n_recent, n_sink, null_logit)

    def step(self, token: int, position: int) -> np.ndarray:
        """One decode step: feed ``token`` at ``position``, store its K/V in the buffer's chosen
        slots, add the attention mass; returns the logits (overwritten by the next step)."""
        slots = self.buffer.choose_write_slots(position)
        self.buffer.attention_bias(out=self.engine.bias.reshape(self.buffer.shape))
        logits, mass = self.engine.decode_step(token, position)
        try:
            self.engine.write_token(self.buffer, slots, position)
        except NonFiniteError as exc:
            raise ValueError(f"the decode graph's K/V at position {position} hold a NaN or infinity ({exc.detail}): "
                             "its numbers overflowed; run the fp32 export") from None
        if self.eviction == RESCORE:          # only re-scoring reads the accumulated mass
            self.buffer.accumulate(mass[:, 0])
        return logits

    def _check_sizes(self, input_ids: np.ndarray, pixel_values):
        """Sizes are checked before any graph runs: the vision graph is the slow part."""
        model, plan = self.manifest["model"], self.manifest["plan"]
        if len(input_ids) > plan["max_prompt"]:
            raise ValueError(f"the prompt has {len(input_ids)} tokens but this export takes at most "
                             f"{plan['max_prompt']} (--max-prompt): shorten it or re-export")
        if pixel_values is not None:
            pixel_values = checked_pixels(pixel_values, plan["image_size"])
        modality = (input_ids == model["image_token_id"]).astype(np.int64)
        n_images = 0 if pixel_values is None else len(pixel_values)
        if int(modality.sum()) != n_images * plan["image_tokens"]:
            raise ValueError(f"the prompt has {int(modality.sum())} image tokens but {n_images} images of "
                             f"{plan['image_tokens']} tokens were given: one image placeholder per image")
        return modality, pixel_values

    def _prefill(self, input_ids: np.ndarray, modality: np.ndarray, pixel_values):
        """Vision and prefill, the pruned prompt loaded into the buffer: (logits, kept positions,
        seconds spent in the vision graph)."""
        features, vision_s = None, 0.0
        if pixel_values is not None and len(pixel_values):
            start = time.perf_counter()
            features = self.engine.image_features(pixel_values).reshape(-1, self.manifest["model"]["hidden_size"])
            vision_s = time.perf_counter() - start
        out = self.engine.prefill(input_ids, modality, features)
        c = self.max_keep
        n_valid = out["slot_valid"][:, :, :c].sum(-1).astype(np.int32)
        try:
            self.engine.load_prefill(self.buffer, out, c, n_valid, len(input_ids))
        except NonFiniteError as exc:
            raise ValueError(f"the prefill graph's K/V hold a NaN or infinity ({exc.detail}): its numbers "
                             "overflowed; run the fp32 export") from None
        # layers keeping fewer than the widest (layer-adaptive budgets) show -1 past their count
        return out["logits"][0], out["slot_position"][:, :, : int(n_valid.max())], vision_s

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
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        modality, pixel_values = self._check_sizes(input_ids, pixel_values)
        start = time.perf_counter()
        first, kept, vision_s = self._prefill(input_ids, modality, pixel_values)
        tokens, logits, steps = [int(first.argmax())], [first.copy()], []
        ttft = time.perf_counter() - start
        if on_token:
            on_token(tokens[0])
        for step in range(max_new_tokens - 1):
            fed = tokens[-1] if forced_tokens is None else forced_tokens[step]
            if eos_token_id is not None and fed == eos_token_id:
                break
            t0 = time.perf_counter()
            out = self.step(fed, len(input_ids) + step)
            tokens.append(int(out.argmax()))
            if keep_logits:  # off for long runs: the only per-token memory the loop would keep
                logits.append(out.copy())
            steps.append(time.perf_counter() - t0)
            if on_token:
                on_token(tokens[-1])
        per_entry = self.layers * 2 * self.heads * self.head_dim * self.kv_dtype.itemsize
        return PipelineResult(tokens, logits, kept, len(input_ids), ttft, steps, self.buffer.nbytes,
                              (len(input_ids) + len(tokens)) * per_entry, vision_s)
