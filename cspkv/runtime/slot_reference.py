"""Readable reference of the fixed-budget KV slot table.

This is the specification, in code, of what the C library (`libcspkv`) does with slot metadata; the
PyTorch reference decoder uses it directly and the C library is tested against it. It holds no K/V
data: only, per layer, KV head and slot, whether the slot is valid, the absolute position and the
modality of the token in it, and a score (attention mass received, for re-score eviction).

One decode step, for every layer and KV head:
  1. ``choose_write_slots(p)``: the slot the token at position ``p`` will occupy. A free slot first
     (lowest index); when none is free, the eviction picks one and it is invalidated at once,
     so the step does not attend to what it is about to overwrite.
  2. ``attention_bias()``: 0 for valid slots, -inf for free ones, log n for the n-softmax null slot.
  3. the model runs one step over the cache (plus the new token's own K/V).
  4. ``commit_token(slots, p)`` marks the written slots valid; ``accumulate(mass)`` adds the attention
     mass each slot received to its score.
"""

from __future__ import annotations

import math

import numpy as np

RING = "ring"
RESCORE = "rescore"
EVICTIONS = (RING, RESCORE)


class SlotTableError(RuntimeError):
    """Raised when no slot can be chosen (e.g. no decode slots and nothing evictable)."""


class SlotTable:
    """Slot metadata of a [layers, kv_heads, slots] KV buffer.

    ``eviction``: "ring" overwrites the oldest generated token (a token whose position is at or past
    the prompt length); "rescore" evicts the valid slot with the lowest score that is neither among
    the ``n_recent`` most recent positions nor a sink (position < ``n_sink``), ties to the lowest slot.
    ``null_logit``: when not None (decode-time n-softmax with n > 0, logit log n), the last slot is
    reserved as a null slot whose K and V stay zero and whose bias is ``null_logit``.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, n_slots: int, eviction: str = RING,
                 n_recent: int = 0, n_sink: int = 0, null_logit: float | None = None):
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        if min(n_layers, n_kv_heads, n_slots) < 1:
            raise ValueError("n_layers, n_kv_heads and n_slots must be >= 1")
        if null_logit is not None and n_slots < 2:
            raise ValueError("a null slot needs n_slots >= 2")
        if n_recent < 0 or n_sink < 0:
            raise ValueError("n_recent and n_sink must be >= 0")
        self.shape = (n_layers, n_kv_heads, n_slots)
        self.eviction = eviction
        self.n_recent = n_recent
        self.n_sink = n_sink
        self.null_logit = null_logit
        # Slots the cache may use for tokens: the null slot, if any, is the last one.
        self.n_usable = n_slots - (1 if null_logit is not None else 0)
        self.valid = np.zeros(self.shape, dtype=bool)
        self.position = np.full(self.shape, -1, dtype=np.int64)
        self.modality = np.full(self.shape, -1, dtype=np.int8)
        self.score = np.zeros(self.shape, dtype=np.float32)
        self.prompt_len = 0

    def reset(self) -> None:
        self.valid[:] = False
        self.position[:] = -1
        self.modality[:] = -1
        self.score[:] = 0.0
        self.prompt_len = 0

    def load_prefill(self, positions: np.ndarray, modality: np.ndarray, n_valid: np.ndarray,
                     prompt_len: int, scores: np.ndarray | None = None) -> None:
        """Fill slots 0..C-1 with the pruned prompt entries of each layer and head.

        positions, modality, scores: [layers, kv_heads, C]; n_valid: [layers, kv_heads], entries at
        or past n_valid[l, h] are not loaded. C may not exceed the usable slots.
        """
        n_layers, n_heads, _ = self.shape
        positions = np.asarray(positions)
        c = positions.shape[-1]
        if positions.shape != (n_layers, n_heads, c) or np.asarray(modality).shape != positions.shape:
            raise ValueError(f"positions/modality must be [{n_layers}, {n_heads}, C], got {positions.shape}")
        if c > self.n_usable:
            raise ValueError(f"{c} prompt entries do not fit in {self.n_usable} usable slots")
        n_valid = np.asarray(n_valid).reshape(n_layers, n_heads)
        if (n_valid < 0).any() or (n_valid > c).any():
            raise ValueError("n_valid must be within [0, C]")
        self.reset()
        self.prompt_len = int(prompt_len)
        loaded = np.arange(c)[None, None, :] < n_valid[:, :, None]
        self.valid[:, :, :c] = loaded
        self.position[:, :, :c] = np.where(loaded, positions, -1)
        self.modality[:, :, :c] = np.where(loaded, modality, -1)
        if scores is not None:
            self.score[:, :, :c] = np.where(loaded, scores, 0.0)

    def _evict_one(self, l: int, h: int, position: int) -> int:
        valid = self.valid[l, h, : self.n_usable]
        pos = self.position[l, h, : self.n_usable]
        if self.eviction == RING:
            candidates = valid & (pos >= self.prompt_len)
            if not candidates.any():
                raise SlotTableError("ring eviction found no generated token to overwrite: "
                                     "the buffer has no decode slots (G = 0)")
            return int(np.argmin(np.where(candidates, pos, np.iinfo(np.int64).max)))
        protected = (pos >= position - self.n_recent) | (pos < self.n_sink)
        candidates = valid & ~protected
        if not candidates.any():
            raise SlotTableError("re-score eviction found no slot outside the recent and sink tokens")
        return int(np.argmin(np.where(candidates, self.score[l, h, : self.n_usable], np.inf)))

    def choose_write_slots(self, position: int) -> np.ndarray:
        """Slot index per [layer, head] for the token at ``position``; evicted slots are invalidated."""
        n_layers, n_heads, _ = self.shape
        slots = np.empty((n_layers, n_heads), dtype=np.int32)
        # Choose every slot first, then invalidate: an error leaves the table unchanged.
        for l in range(n_layers):
            for h in range(n_heads):
                free = np.flatnonzero(~self.valid[l, h, : self.n_usable])
                slots[l, h] = int(free[0]) if free.size else self._evict_one(l, h, position)
        l_idx, h_idx = np.indices(slots.shape)
        self.valid[l_idx, h_idx, slots] = False
        self.position[l_idx, h_idx, slots] = -1
        self.modality[l_idx, h_idx, slots] = -1
        self.score[l_idx, h_idx, slots] = 0.0
        return slots

    def attention_bias(self) -> np.ndarray:
        bias = np.where(self.valid, 0.0, -np.inf).astype(np.float32)
        if self.null_logit is not None:
            bias[:, :, -1] = self.null_logit
        return bias

    def commit_token(self, slots: np.ndarray, position: int, modality: int = 0) -> None:
        l_idx, h_idx = np.indices(slots.shape)
        self.valid[l_idx, h_idx, slots] = True
        self.position[l_idx, h_idx, slots] = position
        self.modality[l_idx, h_idx, slots] = modality
        self.score[l_idx, h_idx, slots] = 0.0

    def accumulate(self, mass: np.ndarray) -> None:
        """Add the attention mass each valid slot received in a decode step ([layers, heads, slots])."""
        self.score += np.where(self.valid, np.asarray(mass, dtype=np.float32), 0.0)

    def n_valid(self) -> np.ndarray:
        return self.valid.sum(-1)


def null_slot_logit(n: float) -> float | None:
    """Bias of the n-softmax null slot: exp(log n) = n joins the denominator; None when n = 0."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return math.log(n) if n > 0 else None
