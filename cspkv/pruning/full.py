"""Full cache: keep every valid entry (the unpruned model). Only n_keep = L is meaningful."""

import torch

from cspkv.pruning.base import PruningPolicy


class FullCache(PruningPolicy):
    name = "full"
    uses_window_attention = False

    def score(self, window_logits, key_modality, query_modality):
        batch, heads = window_logits.shape[:2]
        return torch.zeros(batch, heads, 1, key_modality.shape[-1], device=window_logits.device)

    def keep_mask(self, scores, key_modality, n_keep):
        # Everything valid is kept; select() rejects an n_keep that disagrees with that.
        return (key_modality >= 0)[:, None, :]

    def select(self, window_logits, key_modality, query_modality, n_keep):
        n_valid = int((key_modality >= 0).sum(-1).min())
        if isinstance(n_keep, int) and not isinstance(n_keep, bool) and 0 < n_keep < n_valid:
            raise ValueError(f"n_keep ({n_keep}) is below the valid length ({n_valid}): the full "
                             "cache keeps every entry, use budget 1.0")
        return super().select(window_logits, key_modality, query_modality, n_keep)
