"""StreamingLLM: the first ``n_sink`` tokens (attention sinks) plus the most recent ones."""

import torch

from cspkv.pruning.base import PruningPolicy


class StreamingLLM(PruningPolicy):
    name = "streaming_llm"
    uses_window_attention = False

    def __init__(self, n_sink: int = 4, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"n_sink must be a non-negative int, got {n_sink!r}")
        self.n_sink = n_sink

    def params(self):
        return {**super().params(), "n_sink": self.n_sink}

    def score(self, window_logits, key_modality, query_modality):
        batch, heads = window_logits.shape[:2]
        length = key_modality.shape[-1]
        position = torch.arange(length, device=key_modality.device, dtype=torch.float32)
        # Sinks first, then the latest positions: the top-k of this is "sinks + recent".
        priority = torch.where(position < self.n_sink, position.new_full((), 2.0 * length), position)
        return priority[None, None, None, :].expand(batch, heads, 1, length)
