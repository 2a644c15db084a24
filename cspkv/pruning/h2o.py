"""H2O (heavy hitters): attention accumulated over ALL prefill queries, plus the recent window.

Unlike the window policies, H2O asks ``score`` for every valid prefill query
(``scoring_window(L) = L``). Scores add up over rows, so callers pass the queries in chunks and sum
``score`` over chunks instead of holding the L x L matrix.
"""

from cspkv.pruning.base import PruningPolicy


class H2O(PruningPolicy):
    name = "h2o"
    score_is_window_attention = True
    row_additive_score = True

    def scoring_window(self, n_valid):
        return n_valid

    def score(self, window_logits, key_modality, query_modality):
        return self.attention_score(window_logits, key_modality, query_modality)
