"""The shared base of every pruning policy: validation, n-softmax, window sizes and static top-k.

A policy turns the pre-softmax attention logits of a window of prefill queries into the set of key
positions kept in the cache. It works in two steps, so the same code serves the PyTorch reference
and the traced ONNX graph:

  1. ``score``: per-key scores, summed over the window's query rows and the G query heads of each
     KV head. Sums over rows are additive, so a caller may score the window in chunks (H2O scores
     every prefill query that way without holding an L x L matrix).
  2. ``keep_mask``: which keys to keep, given the scores and the budget. Budgets may be Python ints
     or integer tensors (the export's valid length is a graph input), and every op is static-shape.

Key positions carry a modality id: TEXT (0), IMAGE (1) or PAD (-1). Valid keys are a prefix of the
L positions (prompts are right-padded); padded keys are never kept and padded window rows (query
modality PAD) contribute nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Union

import torch

TEXT, IMAGE, PAD = 0, 1, -1
# The re-score eviction's starting mass: attention received from the last 10% of the prompt's queries.
MASS_WINDOW_RATIO = 0.1

IntOrTensor = Union[int, torch.Tensor]


def n_softmax(logits: torch.Tensor, n: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``exp(x_i) / (n + sum_j exp(x_j))``, computed stably; n = 0 is the ordinary softmax.

    Shifted by the row max m: ``exp(x - m) / (n * exp(-m) + sum exp(x - m))``, with ``n * exp(-m)``
    written as ``exp(log n - m)`` so that n = 0 contributes exactly nothing even when exp(-m)
    overflows. Fully masked rows (all -inf) give zeros instead of NaN.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A fully masked row has max -inf; clamping keeps exp(x - m) at exactly 0 there without an
    # IsInf op (TensorRT-friendly), and no real logit is anywhere near -1e30.
    row_max = torch.clamp(logits.amax(dim=dim, keepdim=True), min=-1e30)
    shifted = torch.exp(logits - row_max)
    denom = shifted.sum(dim=dim, keepdim=True)
    if n > 0:
        denom = denom + torch.exp(math.log(n) - row_max)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, shifted / safe, torch.zeros_like(shifted))


def n_softmax_eager(logits: torch.Tensor, n: float = 1.0, dim: int = -1) -> torch.Tensor:
    """:func:`n_softmax`'s values through logsumexp, in about half the passes over memory.

    For eager PyTorch only (the reference and the sweep, where H2O's L x L rows dominate the
    time); exported graphs keep :func:`n_softmax`, whose ops every backend takes. Checked against
    it in the tests, fully masked rows (zeros) included.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lse = torch.logsumexp(logits, dim=dim, keepdim=True)
    if n > 0:
        lse = torch.logaddexp(lse, torch.full_like(lse, math.log(n)))
    # A fully masked row has lse -inf (or log n): clamped, exp(-inf - lse) is exactly 0.
    return (logits - lse.clamp(min=-1e30)).exp_()


def in_graph_capture() -> bool:
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


# Set while the caller's window logits already hold -inf at every padded key.
_PADDED_KEYS_MASKED = contextvars.ContextVar("padded_keys_masked", default=False)


@contextlib.contextmanager
def padded_keys_masked():
    """Within this block the window logits given to the policies already hold -inf at every padded
    key, so ``_masked_logits`` skips its own mask: one pass over the W x L logits fewer in the
    exported prefill, whose causal window logits mask every key after each row (padding follows
    the last valid row). Outside it, padded keys are masked whatever logits the caller gave."""
    token = _PADDED_KEYS_MASKED.set(True)
    try:
        yield
    finally:
        _PADDED_KEYS_MASKED.reset(token)


def _masked_logits(window_logits: torch.Tensor, key_modality: torch.Tensor) -> torch.Tensor:
    """float32 window logits with padded keys at -inf (eager: no copy when nothing is padded)."""
    logits = window_logits.float()
    if _PADDED_KEYS_MASKED.get():
        return logits
    key_valid = (key_modality >= 0)[:, None, None, None, :]
    if not in_graph_capture() and bool(key_valid.all()):
        return logits
    return logits.masked_fill(~key_valid, float("-inf"))


def grouped_window_attention(window_logits: torch.Tensor, key_modality: torch.Tensor,
                             row_groups: torch.Tensor, n: float = 0.0) -> torch.Tensor:
    """(n-)softmax attention of each window row, summed over the G heads and over the rows of each
    group: [B, H_kv, M, L] for ``row_groups`` [B, W, M] (1 where row w belongs to group m).

    How the window scores are computed, eagerly and in graphs: the per-row normaliser is folded
    into one matmul over the unnormalised exponentials, so the probabilities are never written
    out (a few passes over the W x L logits instead of one per mask and split). Padded keys are
    masked as in ``window_probabilities``; a fully masked row contributes zeros. Checked against
    the probabilities form in the tests.
    """
    batch, heads, groups, window, length = window_logits.shape
    logits = _masked_logits(window_logits, key_modality)
    row_max = logits.amax(dim=-1, keepdim=True).clamp(min=-1e30)  # as n_softmax: masked rows stay 0
    exps = torch.sub(logits, row_max).exp_()
    denom = exps.sum(dim=-1)
    if n > 0:
        denom = denom + torch.exp(math.log(n) - row_max[..., 0])
    inverse = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.zeros_like(denom))                                  # [B, H, G, W]
    weights = inverse[..., None] * row_groups.to(inverse.dtype)[:, None, None]      # [B, H, G, W, M]
    exps = exps.reshape(batch, heads, groups * window, length)
    # one [1, G*W] @ [G*W, L] product per group: a matrix-vector product, which reads the
    # exponentials once (in ONNX Runtime ~9x faster than one [M, G*W] product with M = 2)
    return torch.cat([weights[..., m].reshape(batch, heads, 1, groups * window) @ exps
                      for m in range(row_groups.shape[-1])], dim=2)


def floor_ratio(ratio: float, count: IntOrTensor) -> IntOrTensor:
    """floor(ratio * count) in float64, identical for Python ints and tensors (and in ONNX)."""
    if isinstance(count, torch.Tensor):
        return torch.floor(count.to(torch.float64) * ratio).to(torch.int64)
    return math.floor(ratio * count)


def keep_count(budget: float, n_valid: IntOrTensor) -> IntOrTensor:
    """Entries kept per layer and KV head for a budget: C = ceil(budget * L)."""
    check_budget(budget)
    if isinstance(n_valid, torch.Tensor):
        return torch.ceil(n_valid.to(torch.float64) * budget).to(torch.int64)
    return math.ceil(budget * n_valid)


def check_budget(budget: float) -> None:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not (0.0 < budget <= 1.0):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")


def _as_batch(value: IntOrTensor, like: torch.Tensor) -> torch.Tensor:
    """An int64 tensor broadcastable to [B, H, 1] from an int, a [B] or a [B, H] tensor."""
    if isinstance(value, torch.Tensor):
        value = value.to(torch.int64)
        return value[..., None] if value.dim() == 2 else value.reshape(-1, 1, 1)
    return torch.full((1, 1, 1), value, dtype=torch.int64, device=like.device)


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, best first; ties go to the lower index.

    A stable descending sort gives exactly ONNX TopK's tie rule (lower index first), so the
    reference and the exported graph pick the same keys even on equal scores.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def top_k_mask(scores: torch.Tensor, allowed: torch.Tensor, k: IntOrTensor) -> torch.Tensor:
    """Boolean mask of the k best ``allowed`` entries along the last dim (k may differ per batch);
    ties go to the lower index. Scores must be >= 0 (every policy's are: attention sums, pooled
    sums, priorities). Eager code ranks by a stable sort; traced graphs use the sort-free
    :func:`top_k_mask_by_threshold`, which picks the same entries (checked in the tests)."""
    if in_graph_capture():
        return top_k_mask_by_threshold(scores, allowed, k)
    masked = scores.masked_fill(~allowed, float("-inf"))
    return allowed & (rank_descending(masked) < _as_batch(k, scores))


# 2^(e - 127) for each float32 exponent field e (e = 0, subnormals: 0; e = 255: inf, past every
# finite score).
_POW2 = torch.tensor([0.0] + [2.0 ** (e - 127) for e in range(1, 255)] + [float("inf")], dtype=torch.float32)
_MANTISSA_BITS = 23
# Each round of the threshold search tests 15 candidates at once (4 bits of the bit pattern).
_DIGITS = torch.arange(1, 16)


def _digit(masked: torch.Tensor, values: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """How many of the increasing candidate ``values`` [..., 15] have at least ``need`` (float32)
    scores >= them: the counts fall as the candidates rise, so this is the next 4-bit digit."""
    # counted in float32 (exact below 2^24 keys): half the bytes of the int64 a bool sum makes
    counts = (masked[..., None, :] >= values[..., None]).to(torch.float32).sum(-1)   # [..., 15]
    return (counts >= need).to(torch.int64).sum(-1, keepdim=True)


def top_k_mask_by_threshold(scores: torch.Tensor, allowed: torch.Tensor, k: IntOrTensor) -> torch.Tensor:
    """:func:`top_k_mask` without a sort, for static graphs at any length (TensorRT's TopK takes
    K < 3840 only).

    The k-th largest allowed score t is found digit by digit of its float32 bit pattern (for x >= 0
    patterns are ordered as values), 4 bits a round: 2 rounds for the exponent field, 6 for the
    mantissa, each counting the scores >= 15 candidates. ONNX has no bitcast, so a candidate
    becomes a float by exact arithmetic: a power of two from a table, plus mantissa times its unit
    (2^(e-150); subnormals: 2^-149). A mantissa candidate past 2^23 reaches the next power of two,
    which the exponent rounds already found too few scores above, so it never counts. Then every
    score above t is kept, and of the scores equal to t the first k - count(> t) by index (a
    running count), as a stable sort would.
    """
    scores = scores.float()
    need = _as_batch(k, scores)                                               # [B, 1|H, 1]
    masked = torch.where(allowed, scores, torch.full_like(scores, float("-inf")))
    need_count = need.to(torch.float32)                                       # what _digit compares counts with
    table = _POW2.to(scores.device)
    digits = _DIGITS.to(scores.device)
    exponent = torch.zeros((*masked.shape[:-1], 1), dtype=torch.int64, device=scores.device)
    for shift in (4, 0):
        candidates = exponent + (digits << shift)                              # [B, H, 15]
        # index_select (one Gather) rather than indexing, whose export leaves the shape dynamic
        values = table.index_select(0, candidates.reshape(-1)).reshape(candidates.shape)
        exponent = exponent + _digit(masked, values, need_count) * (1 << shift)
    base = table.index_select(0, exponent.reshape(-1)).reshape(exponent.shape)
    unit = torch.where(exponent == 0, torch.full_like(base, 2.0 ** -149), base * 2.0 ** -_MANTISSA_BITS)
    mantissa = torch.zeros_like(base)                                         # an integer < 2^23, exact
    for shift in (20, 16, 12, 8, 4, 0):
        values = base + (mantissa + digits.to(base.dtype) * float(1 << shift)) * unit
        mantissa = mantissa + _digit(masked, values, need_count).to(base.dtype) * float(1 << shift)
    threshold = base + mantissa * unit
    above = masked > threshold
    ties = masked == threshold
    remaining = need - above.sum(-1, keepdim=True)
    first_ties = ties & (torch.cumsum(ties.to(torch.int64), dim=-1) <= remaining)
    return allowed & (above | first_ties)


def mask_to_indices(keep: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The first ``n_keep`` kept positions in ascending order, as int64 [B, H, n_keep]; with fewer
    kept than n_keep the tail is the dropped positions in ascending order, which the caller marks
    invalid.

    Sort-free (any length, TensorRT-ready): kept position j goes to output slot "kept before j",
    dropped position j to "all kept + dropped before j". That is a permutation of 0..L-1, so one
    scatter of the positions writes every slot exactly once.
    """
    length = keep.shape[-1]
    kept = keep.to(torch.int64)
    positions = torch.arange(length, device=keep.device).expand_as(kept)
    kept_before = torch.cumsum(kept, dim=-1) - kept
    dropped_before = positions - kept_before
    slot = torch.where(keep, kept_before, kept.sum(-1, keepdim=True) + dropped_before)
    order = torch.zeros_like(positions).scatter(-1, slot, positions)
    return order[..., :n_keep]


class PruningPolicy:
    """Base of every policy. Subclasses set ``name`` and implement ``score`` (and, if the plain
    "recent window + top-k of one score" rule does not fit, ``keep_mask``)."""

    name = "base"
    # True where ``score`` is a sum over rows of each row's softmax attention (H2O): a row then
    # gives keys after it exactly 0, so callers may score early rows over only the keys they see.
    row_additive_score = False
    # False where ``score`` ignores the logits (full, StreamingLLM, random): a caller may pass a
    # window of no rows and skip computing attention for it.
    uses_window_attention = True
    # True where ``score`` is exactly ``attention_score`` (SnapKV, LOOK-M, H2O): a caller scoring
    # several such policies over the same rows may compute it once and share it.
    score_is_window_attention = False

    def __init__(self, window_ratio: float = 0.1, recent_ratio: float = 1.0, recent_cap: float | None = None,
                 pyramid: float = 0.0):
        if not (0.0 < window_ratio <= 1.0):
            raise ValueError(f"window_ratio must be in (0, 1], got {window_ratio!r}")
        if recent_ratio < 0:
            raise ValueError(f"recent_ratio (beta) must be >= 0, got {recent_ratio!r}")
        if recent_cap is not None and (isinstance(recent_cap, bool) or not isinstance(recent_cap, (int, float))
                                       or not 0.0 <= recent_cap <= 1.0):
            raise ValueError(f"recent_cap must be a share of the budget in [0, 1] (or None), got {recent_cap!r}")
        if isinstance(pyramid, bool) or not isinstance(pyramid, (int, float)) or not 0.0 <= pyramid < 1.0:
            raise ValueError(f"pyramid (the layer budgets' slope) must be in [0, 1), got {pyramid!r}")
        self.window_ratio = float(window_ratio)
        self.recent_ratio = float(recent_ratio)
        self.recent_cap = None if recent_cap is None else float(recent_cap)
        self.pyramid = float(pyramid)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict:
        return {"window_ratio": self.window_ratio, "recent_ratio": self.recent_ratio, "recent_cap": self.recent_cap,
                "pyramid": self.pyramid}

    # --- window sizes -------------------------------------------------------------------------
    def observation_window(self, n_valid: IntOrTensor) -> IntOrTensor:
        """W = floor(window_ratio * L), at least 1 (a window of no query would score nothing)."""
        w = floor_ratio(self.window_ratio, n_valid)
        return torch.clamp(w, min=1) if isinstance(w, torch.Tensor) else max(1, w)

    def scoring_window(self, n_valid: IntOrTensor) -> IntOrTensor:
        """How many of the last valid queries the caller must pass to ``score`` (H2O: all)."""
        return self.observation_window(n_valid)

    def recent_window(self, n_valid: IntOrTensor, n_keep: IntOrTensor) -> IntOrTensor:
        """R = floor(beta * W) most recent keys, always kept; the budget wins if C < R.

        With ``recent_cap`` = s, R is at most floor(s * C): the window then leaves C - R slots to
        select even where beta * W reaches the whole budget (budget 0.1 with W = 0.1 L)."""
        r = floor_ratio(self.recent_ratio, self.observation_window(n_valid))
        limit = n_keep if self.recent_cap is None else floor_ratio(self.recent_cap, n_keep)
        if isinstance(r, torch.Tensor) or isinstance(limit, torch.Tensor):
            return torch.minimum(torch.as_tensor(r), torch.as_tensor(limit))
        return min(r, limit)

    def score_identity(self):
        """What ``score``'s output depends on besides its inputs, for policies whose scores a caller
        may share (CSP at several rho); None: not shared."""
        return None

    def layer_keep_counts(self, n_keep: IntOrTensor, n_layers: int, n_valid: IntOrTensor | None = None):
        """Entries kept in each layer: C everywhere, or with ``pyramid`` = s > 0 a linear slope from
        (1 + s) C in the first layer to (1 - s) C in the last (PyramidKV's shape), the same total
        n_layers x C. Each layer keeps floor(C W_(l+1)) - floor(C W_l) for the cumulative shares W, so
        the counts sum to exactly n_layers x C; each is then clamped to [1, n_valid] (a budget above
        1 / (1 + s) keeps less in all). A list of ints, or an int64 tensor [n_layers, *C.shape]."""
        if self.pyramid == 0.0:
            return [n_keep] * n_layers if not isinstance(n_keep, torch.Tensor) else n_keep.expand(n_layers, *n_keep.shape)
        steps = max(n_layers - 1, 1)
        shares = [1.0 + self.pyramid * (1.0 - 2.0 * layer / steps) for layer in range(n_layers)]
        bounds = [0.0]
        for share in shares:
            bounds.append(bounds[-1] + share)
        bounds[-1] = float(n_layers)                     # exact: the float sum may drift by an ulp
        if isinstance(n_keep, torch.Tensor):
            edges = torch.floor(n_keep.to(torch.float64)[None] * torch.tensor(bounds, dtype=torch.float64).reshape(
                -1, *([1] * n_keep.dim()))).to(torch.int64)
            counts = torch.clamp(edges[1:] - edges[:-1], min=1)
            return counts if n_valid is None else torch.minimum(counts, torch.as_tensor(n_valid).to(torch.int64))
        edges = [math.floor(n_keep * bound) for bound in bounds]
        counts = [max(1, b - a) for a, b in zip(edges[:-1], edges[1:])]
        return counts if n_valid is None else [min(c, int(n_valid)) for c in counts]

    # --- the two steps ------------------------------------------------------------------------
    def score(self, window_logits: torch.Tensor, key_modality: torch.Tensor,
              query_modality: torch.Tensor) -> torch.Tensor:
        """Per-key scores [B, H_kv, S, L] (S score channels), summed over window rows and G heads."""
        raise NotImplementedError

    def keep_mask(self, scores: torch.Tensor, key_modality: torch.Tensor,
                  n_keep: IntOrTensor) -> torch.Tensor:
        """Keep the recent window plus the best candidates of score channel 0: bool [B, H_kv, L]."""
        valid, recent, candidates = self.regions(key_modality, n_keep)
        chosen = top_k_mask(scores[:, :, 0], candidates, self._selectable(key_modality, n_keep))
        return recent | chosen

    # --- helpers shared by subclasses ---------------------------------------------------------
    def regions(self, key_modality: torch.Tensor, n_keep: IntOrTensor):
        """(valid, recent, candidates) masks [B, 1, L]: candidates are valid and not recent."""
        n_valid = (key_modality >= 0).sum(-1)
        recent_len = self.recent_window(n_valid, n_keep)
        positions = torch.arange(key_modality.shape[-1], device=key_modality.device)
        valid = (key_modality >= 0)[:, None, :]
        recent = valid & (positions >= (n_valid - recent_len)[:, None])[:, None, :]
        return valid, recent, valid & ~recent

    def _selectable(self, key_modality: torch.Tensor, n_keep: IntOrTensor) -> torch.Tensor:
        """K = C - R: how many candidates each batch row may keep besides the recent window."""
        n_valid = (key_modality >= 0).sum(-1)
        return torch.as_tensor(n_keep) - self.recent_window(n_valid, n_keep)

    @staticmethod
    def window_probabilities(window_logits: torch.Tensor, key_modality: torch.Tensor,
                             query_modality: torch.Tensor, n: float = 0.0) -> torch.Tensor:
        """(n-)softmax over keys of every window row: [B, H_kv, G, W, L].

        Padded keys are masked here whatever logits the caller gave them, and padded rows zeroed,
        so padding can never shift a valid key's score.
        """
        row_valid = (query_modality >= 0)[:, None, None, :, None]
        if not in_graph_capture():  # eager: the same values, fewer passes (n_softmax_eager)
            probs = n_softmax_eager(_masked_logits(window_logits, key_modality), n=n, dim=-1)
            return probs if bool(row_valid.all()) else probs.masked_fill_(~row_valid, 0.0)
        key_valid = (key_modality >= 0)[:, None, None, None, :]
        logits = window_logits.float().masked_fill(~key_valid, float("-inf"))
        probs = n_softmax(logits, n=n, dim=-1)
        return torch.where(row_valid, probs, torch.zeros_like(probs))

    @staticmethod
    def attention_score(window_logits: torch.Tensor, key_modality: torch.Tensor,
                        query_modality: torch.Tensor) -> torch.Tensor:
        """The plain window score: softmax attention summed over rows and G heads, [B, H_kv, 1, L]."""
        valid_rows = (query_modality >= 0)[..., None]
        return grouped_window_attention(window_logits, key_modality, valid_rows, n=0.0)

    # --- the public entry point ---------------------------------------------------------------
    def select(self, window_logits: torch.Tensor, key_modality: torch.Tensor,
               query_modality: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Kept key indices, int64 [B, H_kv, n_keep], sorted ascending.

        window_logits: [B, H_kv, G, W, L] pre-softmax logits of the last W valid queries (causal
        mask applied as -inf); key_modality [B, L] and query_modality [B, W]: 0 text, 1 image,
        -1 padding; n_keep: entries kept per KV head, recent window included.
        """
        check_select_inputs(window_logits, key_modality, query_modality, n_keep)
        scores = self.score(window_logits, key_modality, query_modality)
        return self.indices_from_scores(scores, key_modality, n_keep)

    def kept_indices(self, scores: torch.Tensor, key_modality: torch.Tensor, n_keep, c_max: int,
                     n_kv_heads: int) -> torch.Tensor:
        """The static-shape form of the selection, as exported graphs use it: the first ``c_max`` kept
        positions in ascending order, int64 [B, n_kv_heads, c_max], for an ``n_keep`` that may be a
        tensor (entries past n_keep are the caller's to mark invalid)."""
        keep = self.keep_mask(scores, key_modality, n_keep)
        return mask_to_indices(keep.expand(keep.shape[0], n_kv_heads, -1), c_max)

    def indices_from_scores(self, scores: torch.Tensor, key_modality: torch.Tensor,
                            n_keep: int) -> torch.Tensor:
        """Kept indices [B, H_kv, n_keep] (ascending) from precomputed ``score`` output."""
        keep = self.keep_mask(scores, key_modality, n_keep)
        keep = keep.expand(scores.shape[0], scores.shape[1], -1)
        kept = keep.sum(-1)
        if not bool((kept == n_keep).all()):
            raise RuntimeError(f"{self.name} kept {kept.tolist()} entries instead of n_keep={n_keep}")
        return mask_to_indices(keep, n_keep)


def check_select_inputs(window_logits, key_modality, query_modality, n_keep) -> None:
    """Validate ``select``'s arguments; every message names the argument at fault."""
    if not isinstance(window_logits, torch.Tensor) or window_logits.dim() != 5:
        raise ValueError("window_logits must be a tensor of shape [B, H_kv, G, W, L], got "
                         f"{getattr(window_logits, 'shape', type(window_logits).__name__)}")
    if not window_logits.is_floating_point():
        raise ValueError(f"window_logits must be floating point, got {window_logits.dtype}")
    batch, _, _, window, length = window_logits.shape
    if not isinstance(key_modality, torch.Tensor) or tuple(key_modality.shape) != (batch, length):
        raise ValueError(f"key_modality must have shape [B, L] = [{batch}, {length}], got "
                         f"{getattr(key_modality, 'shape', type(key_modality).__name__)}")
    if not isinstance(query_modality, torch.Tensor) or tuple(query_modality.shape) != (batch, window):
        raise ValueError(f"query_modality must have shape [B, W] = [{batch}, {window}], got "
                         f"{getattr(query_modality, 'shape', type(query_modality).__name__)}")
    for name, mod in (("key_modality", key_modality), ("query_modality", query_modality)):
        if mod.is_floating_point() or not bool(((mod >= PAD) & (mod <= IMAGE)).all()):
            raise ValueError(f"{name} must hold integer ids 0 (text), 1 (image) or -1 (padding)")
    valid = key_modality >= 0
    n_valid = valid.sum(-1)
    prefix = torch.arange(length, device=valid.device)[None, :] < n_valid[:, None]
    if not bool((valid == prefix).all()):
        raise ValueError("key_modality: valid keys must come first and padding (-1) last")
    if isinstance(n_keep, bool) or not isinstance(n_keep, int):
        raise ValueError(f"n_keep must be a Python int, got {type(n_keep).__name__}")
    if n_keep < 1:
        raise ValueError(f"n_keep must be >= 1, got {n_keep}")
    smallest = int(n_valid.min())
    if n_keep > smallest:
        raise ValueError(f"n_keep ({n_keep}) is larger than the number of valid keys ({smallest})")
