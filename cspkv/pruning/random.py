"""Random eviction: a fixed pseudo-random priority per (position, KV head), plus the recent window.

The priority is an integer hash computed with tensor ops rather than a torch RNG, so the exported
graph and the reference draw the same "random" keys for any padded length.
"""

import torch

from cspkv.pruning.base import PruningPolicy

_MODULUS = 16_777_213  # prime below 2^24: priorities stay exact in float32


class RandomPolicy(PruningPolicy):
    name = "random"
    uses_window_attention = False

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed

    def params(self):
        return {**super().params(), "seed": self.seed}

    def score(self, window_logits, key_modality, query_modality):
        batch, heads = window_logits.shape[:2]
        length = key_modality.shape[-1]
        position = torch.arange(length, dtype=torch.int64, device=key_modality.device)[None, :]
        head = torch.arange(heads, dtype=torch.int64, device=key_modality.device)[:, None]
        # A linear mix of (position, head, seed), then two squarings mod a prime: the squarings
        # break the linear pattern a plain LCG would leave in the ranking. int64 never overflows.
        x = (position * 2654435761 + head * 40503 + self.seed * 7919 + 12345) % _MODULUS
        x = (x * x + 1013904223) % _MODULUS
        x = (x * x + 374761393) % _MODULUS
        return x.to(torch.float32)[None, :, None, :].expand(batch, heads, 1, length)
