"""Cross-Self Pruning (CSP): window attention under n-softmax, split into intra-modality (self) and
inter-modality (cross) parts, with two top-k sets plus the recent window (csp-spec.md, sections 3-4).

Variants:
  "distinct" (default): top K_c keys by cross score, then top K_s by self score among the rest:
             exactly C distinct entries.
  "paper":   the authors' code: two independent top-k over the same candidates, concatenated, so
             a key chosen by both is stored twice (it then carries log 2 more logit at decode time).
"""

import torch

from cspkv.pruning.base import (IMAGE, TEXT, PruningPolicy, floor_ratio,
                               grouped_window_attention, top_k_mask)

VARIANTS = ("distinct", "paper")


class CrossSelfPruning(PruningPolicy):
    name = "csp"

    def __init__(self, n: float = 1.0, cross_ratio: float = 0.5, variant: str = "distinct", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(n, (int, float)) or n < 0:
            raise ValueError(f"n (the n-softmax constant) must be >= 0, got {n!r}")
        if not (0.0 <= cross_ratio <= 1.0):
            raise ValueError(f"cross_ratio (rho) must be in [0, 1], got {cross_ratio!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.n = float(n)
        self.cross_ratio = float(cross_ratio)
        self.variant = variant

    def params(self):
        return {**super().params(), "n": self.n, "cross_ratio": self.cross_ratio, "variant": self.variant}

    def score_identity(self):
        return ("csp", self.n, self.window_ratio)  # rho, beta, the cap and the variant only select

    def score(self, window_logits, key_modality, query_modality):
        """Channels: 0 = S_self (query and key of the same modality), 1 = S_cross.

        The n-softmax mass from text rows and from image rows, each summed once; a key's self score
        is the mass from rows of its own modality, its cross score the rest. (Padded keys get 0
        from every row either way.)"""
        row_groups = torch.stack([query_modality == TEXT, query_modality == IMAGE], dim=-1)  # [B, W, 2]
        sums = grouped_window_attention(window_logits, key_modality, row_groups, n=self.n)
        from_text, from_image = sums[:, :, 0], sums[:, :, 1]
        is_image = (key_modality == IMAGE)[:, None, :]
        self_score = torch.where(is_image, from_image, from_text)
        cross_score = torch.where(is_image, from_text, from_image)
        return torch.stack([self_score, cross_score], dim=2)

    def split(self, key_modality, n_keep):
        """(K_c, K_s): the cross and self shares of the K = C - R selectable slots."""
        selectable = self._selectable(key_modality, n_keep)
        cross_k = floor_ratio(self.cross_ratio, selectable)
        return cross_k, selectable - cross_k

    def keep_mask(self, scores, key_modality, n_keep):
        if self.variant != "distinct":
            raise ValueError("the 'paper' variant may keep a key twice, so it has no keep mask; use select()")
        _, recent, candidates = self.regions(key_modality, n_keep)
        cross_k, self_k = self.split(key_modality, n_keep)
        by_cross = top_k_mask(scores[:, :, 1], candidates, cross_k)
        by_self = top_k_mask(scores[:, :, 0], candidates & ~by_cross, self_k)
        return recent | by_cross | by_self

    def indices_from_scores(self, scores, key_modality, n_keep):
        if self.variant == "distinct":
            return super().indices_from_scores(scores, key_modality, n_keep)
        _, recent, candidates = self.regions(key_modality, n_keep)
        cross_k, self_k = self.split(key_modality, n_keep)
        by_cross = top_k_mask(scores[:, :, 1], candidates, cross_k)
        by_self = top_k_mask(scores[:, :, 0], candidates, self_k)  # independent of by_cross
        copies = (recent | by_cross).long() + by_self.long()       # a key in both is stored twice
        length = key_modality.shape[-1]
        positions = torch.arange(length, device=key_modality.device)
        # First copies and second copies ordered by position, duplicates side by side.
        first = torch.where(copies >= 1, 2 * (length - positions) + 1, 0)
        second = torch.where(copies >= 2, 2 * (length - positions), 0)
        order = torch.topk(torch.cat([first, second], dim=-1), n_keep, dim=-1).indices
        return order % length
