"""SnapKV: window attention summed per KV head, max-pooled over neighbouring keys, plus recent.

Pooling (kernel 5) keeps a selected key's neighbours, which SnapKV found preserves local context.
Recent and padded keys are zeroed before pooling so they do not lift their neighbours.
"""

import torch.nn.functional as F

from cspkv.pruning.base import PruningPolicy


class SnapKV(PruningPolicy):
    name = "snapkv"
    score_is_window_attention = True

    def __init__(self, kernel_size: int = 5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        self.kernel_size = kernel_size

    def params(self):
        return {**super().params(), "kernel_size": self.kernel_size}

    def score(self, window_logits, key_modality, query_modality):
        return self.attention_score(window_logits, key_modality, query_modality)

    def keep_mask(self, scores, key_modality, n_keep):
        _, _, candidates = self.regions(key_modality, n_keep)
        raw = scores[:, :, 0] * candidates
        batch, heads, length = raw.shape
        pooled = F.max_pool1d(raw.reshape(batch * heads, 1, length), self.kernel_size, stride=1,
                              padding=self.kernel_size // 2).reshape(batch, heads, 1, length)
        return super().keep_mask(pooled, key_modality, n_keep)
