"""Greedy decoding of many pruned caches of one prompt at once: the sweep's fast path.

``LlavaReference.decode`` decodes one cache a step at a time through the slot table; it is the
readable reference (and what the exported decode graph is checked against). A sweep decodes ~20
caches of the same prompt (every policy and budget, plus the blanked images), and at batch 1 each
step is bound by reading the 135M weights. Here every cache takes its step together: the linear
layers run once on a [B, 1, hidden] batch, and attention runs per group of caches that kept the
same number of entries (every policy keeps the same count at a budget), over exactly the entries
each cache holds, so no cache is padded. A cache that reaches EOS leaves the batch (replies
in a sweep end anywhere from 1 to 112 tokens). Same results as ``LlavaReference.decode`` in its
"unbounded" eviction (no null slot); the tests check the tokens and logits against it.
"""

from __future__ import annotations

import torch

from cspkv.models.llava import LlavaReference, PrunedCache
from cspkv.models.static_llama import DecoderShape, attention_inputs, layer_output


class _Group:
    """Caches with the same entry count: one K/V buffer [layers, 2, B, H_kv, C + new, D] whose batch
    rows are the still-decoding ``members`` (cache indices)."""

    def __init__(self, members: list[int], caches: list[PrunedCache], max_new_tokens: int):
        self.members = members
        first = caches[members[0]]
        self.filled = first.n_entries
        n_layers, (_, n_kv, _, dim) = len(first.keys), first.keys[0].shape
        self.kv = torch.zeros((n_layers, 2, len(members), n_kv, self.filled + max_new_tokens, dim),
                              dtype=first.keys[0].dtype)
        for row, index in enumerate(members):
            for layer in range(n_layers):
                self.kv[layer, 0, row, :, :self.filled] = caches[index].keys[layer][0]
                self.kv[layer, 1, row, :, :self.filled] = caches[index].values[layer][0]
        # layer-adaptive budgets: a layer keeping fewer entries than the widest has padding slots
        self.valid = None
        if any(caches[index].counts is not None for index in members):
            slots = torch.arange(self.filled)
            self.valid = torch.stack([torch.stack([slots < count for count in caches[index].layer_counts])
                                      for index in members], dim=1)                  # [layers, B, C]

    def keep_unfinished(self, finished: list[bool]) -> None:
        """Drop the rows whose cache finished: one copy of the buffer, after which every step
        reads and computes only for rows still decoding (replies end at very different lengths)."""
        rows = [row for row, index in enumerate(self.members) if not finished[index]]
        if len(rows) < len(self.members):
            self.kv = self.kv.index_select(2, torch.tensor(rows, dtype=torch.long))
            if self.valid is not None:
                self.valid = self.valid.index_select(1, torch.tensor(rows, dtype=torch.long))
            self.members = [self.members[row] for row in rows]


def _attend(q: torch.Tensor, kv: torch.Tensor, filled: int, k: torch.Tensor, v: torch.Tensor, scaling: float,
            prompt_valid: torch.Tensor | None = None):
    """One query token per row over its ``filled`` cached entries plus itself (``prompt_valid``
    [B, C]: which of the first C entries are real, for layers that keep fewer than C).

    q [B, H_q, 1, D]; kv [2, B, H_kv, S, D]; k, v [B, H_kv, 1, D]. Grouped queries are laid out as
    [B, H_kv, G, D] so each matmul reads K/V once per KV head (no broadcast copy per group).
    """
    batch, n_heads, _, dim = q.shape
    n_kv = kv.shape[2]
    grouped = q.reshape(batch, n_kv, n_heads // n_kv, dim)
    keys, values = kv[0, :, :, :filled], kv[1, :, :, :filled]
    cache_logits = grouped @ keys.transpose(-1, -2) * scaling                     # [B, H_kv, G, C]
    if prompt_valid is not None:
        mask = torch.nn.functional.pad(prompt_valid, (0, filled - prompt_valid.shape[-1]), value=True)
        cache_logits = cache_logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    self_logit = (grouped * k).sum(-1, keepdim=True) * scaling                     # [B, H_kv, G, 1]
    probs = torch.softmax(torch.cat([cache_logits, self_logit], dim=-1).float(), dim=-1).to(values.dtype)
    out = probs[..., :filled] @ values + probs[..., filled:] * v                   # [B, H_kv, G, D]
    return out.reshape(batch, 1, n_heads * dim)


@torch.no_grad()
def decode_batch(reference: LlavaReference, caches: list[PrunedCache], first_tokens: list[int],
                 max_new_tokens: int, eos_token_id: int | None = None, logits_out: list | None = None
                 ) -> list[list[int]]:
    """Greedy tokens for every cache (each starting from its ``first_tokens`` entry), as
    ``reference.decode(cache, first, max_new_tokens, eos_token_id=...)`` gives them one by one.
    All caches must come from prompts of one length: they share every decode position. With
    ``logits_out`` (a list) each cache's per-token logits [vocab] are appended there, one list per cache."""
    if len(caches) != len(first_tokens):
        raise ValueError(f"{len(caches)} caches but {len(first_tokens)} first tokens")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not caches:
        return []
    prompt_len = caches[0].prompt_len
    if any(cache.prompt_len != prompt_len for cache in caches):
        raise ValueError("decode_batch needs caches of prompts of one length (they share positions); "
                         f"got prompt lengths {sorted({c.prompt_len for c in caches})}")
    by_size: dict[int, list[int]] = {}
    for index, cache in enumerate(caches):
        by_size.setdefault(cache.n_entries, []).append(index)
    groups = [_Group(members, caches, max_new_tokens) for members in by_size.values()]

    text_model = reference.text_model
    shape = DecoderShape(text_model.config)
    tokens = [[first] for first in first_tokens]
    if logits_out is not None:
        logits_out.extend([] for _ in caches)
    finished = [eos_token_id is not None and first == eos_token_id for first in first_tokens]
    for step in range(max_new_tokens - 1):
        for group in groups:
            group.keep_unfinished(finished)
        groups = [group for group in groups if group.members]
        if not groups:
            break
        order = [index for group in groups for index in group.members]   # batch row -> cache index
        rows, start = [], 0
        for group in groups:
            rows.append(slice(start, start + len(group.members)))
            start += len(group.members)
        last = torch.tensor([[tokens[i][-1]] for i in order])
        hidden = text_model.embed_tokens(last)                                        # [B, 1, hidden]
        position = torch.tensor([[prompt_len + step]])
        cos, sin = text_model.rotary_emb(hidden, position)
        for index, layer in enumerate(text_model.layers):
            q, k, v = attention_inputs(layer, hidden, shape, cos, sin)
            outs = []
            for group, rows_of in zip(groups, rows):
                kv = group.kv[index]
                slot = group.filled + step
                kv[0, :, :, slot] = k[rows_of, :, 0]
                kv[1, :, :, slot] = v[rows_of, :, 0]
                valid = None if group.valid is None else group.valid[index]
                outs.append(_attend(q[rows_of], kv, slot, k[rows_of], v[rows_of], layer.self_attn.scaling, valid))
            hidden = layer_output(layer, hidden, torch.cat(outs))
        logits = reference.model.lm_head(text_model.norm(hidden))[:, -1].float()
        for row, cache_index in enumerate(order):
            if logits_out is not None:
                logits_out[cache_index].append(logits[row].clone())
            token = int(logits[row].argmax())
            tokens[cache_index].append(token)
            finished[cache_index] = eos_token_id is not None and token == eos_token_id
    return tokens
