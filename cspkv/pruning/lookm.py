"""LOOK-M, text-prior: keep text keys first, fill the rest with the best-scored image keys.

Optionally (``merge=True``) each evicted entry is merged into its most similar kept entry (cosine
similarity of keys), LOOK-M's "pivot" merge: the evicted and the pivot entry are averaged, then
the pivot becomes the mean of itself and every such average assigned to it. Merging changes K/V
values, not which entries are kept, so it is a separate step (``merge_evicted``).
"""

import torch
import torch.nn.functional as F

from cspkv.pruning.base import TEXT, PruningPolicy, top_k_mask


class LookM(PruningPolicy):
    name = "lookm"
    score_is_window_attention = True

    def __init__(self, merge: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(merge, bool):
            raise ValueError(f"merge must be True or False, got {merge!r}")
        self.merge = merge

    def params(self):
        return {**super().params(), "merge": self.merge}

    def score(self, window_logits, key_modality, query_modality):
        return self.attention_score(window_logits, key_modality, query_modality)

    def keep_mask(self, scores, key_modality, n_keep):
        _, recent, candidates = self.regions(key_modality, n_keep)
        budget = self._selectable(key_modality, n_keep)
        score = scores[:, :, 0]
        is_text = (key_modality == TEXT)[:, None, :]
        # Text first (best-scored text if even text overflows the budget), then image by score.
        text_kept = top_k_mask(score, candidates & is_text, budget)
        rest = torch.as_tensor(budget).reshape(-1, 1) - text_kept.sum(-1)
        image_kept = top_k_mask(score, candidates & ~text_kept, rest)
        return recent | text_kept | image_kept

    def merge_evicted(self, keys, values, kept_indices, key_modality):
        """Kept K/V [B, H, C, D] with the evicted entries pivot-merged in (``merge=True`` only).

        keys, values: [B, H_kv, L, D] of the whole prompt; kept_indices: [B, H_kv, C].
        """
        gather_index = kept_indices[..., None].expand(-1, -1, -1, keys.shape[-1])
        kept_keys = keys.gather(2, gather_index)
        kept_values = values.gather(2, gather_index)
        if not self.merge:
            return kept_keys, kept_values
        kept = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device)
        kept.scatter_(2, kept_indices, True)
        evicted = (key_modality >= 0)[:, None, :] & ~kept
        similarity = F.normalize(keys, dim=-1) @ F.normalize(kept_keys, dim=-1).transpose(-1, -2)
        pivot = similarity.argmax(-1)                                     # [B, H, L]
        assign = F.one_hot(pivot, kept_indices.shape[-1]).to(keys.dtype)  # [B, H, L, C]
        assign = assign * evicted[..., None]
        count = assign.sum(2)[..., None]                                  # [B, H, C, 1]

        def pivot_merge(full, kept_part):
            averaged = (full + assign @ kept_part) / 2                    # evicted + its pivot
            return (kept_part + assign.transpose(-1, -2) @ averaged) / (1 + count)

        return pivot_merge(keys, kept_keys), pivot_merge(values, kept_values)
