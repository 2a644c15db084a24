"""Static-shape forward passes of a Llama-style decoder, written as plain tensor code.

These are what the ONNX graphs are traced from (no HF cache objects, no data-dependent shapes), and
the reference decoder calls ``decode_step`` too, so the exported decode graph and the reference run
one implementation. The prefill here is checked against the unmodified HF forward in the tests.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class DecoderShape:
    """Head counts and sizes read from a text config."""

    def __init__(self, config):
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.groups = self.n_heads // self.n_kv_heads


def project_heads(linear, hidden: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, hidden] -> [B, n_heads, T, head_dim]."""
    batch, rows, _ = hidden.shape
    return linear(hidden).view(batch, rows, n_heads, head_dim).transpose(1, 2)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                      scaling: float):
    """Attention of q [B, H_q, T, D] over keys/values [B, H_kv, S, D] with an additive bias
    broadcastable to [B, H_kv, G, T, S]. Returns the output [B, T, H_q * D] and the probabilities
    [B, H_kv, G, T, S].

    The G query heads of a KV head are stacked as G * T rows (a view: head h reads KV head h // G),
    so each product is one matmul per KV head with keys and values as they are, not G matmuls
    broadcast over a size-1 axis (about 10% faster in ONNX Runtime, and K's transpose folds into
    the matmul).
    """
    batch, n_heads, rows, dim = q.shape
    n_kv, length = keys.shape[1], keys.shape[2]
    groups = n_heads // n_kv
    stacked = q.reshape(batch, n_kv, groups * rows, dim)
    logits = (stacked @ keys.transpose(-1, -2) * scaling).reshape(batch, n_kv, groups, rows, length) + bias
    probs = torch.softmax(logits.float(), dim=-1).to(values.dtype)
    out = probs.reshape(batch, n_kv, groups * rows, length) @ values                 # [B, H_kv, G*T, D]
    return out.reshape(batch, n_heads, rows, dim).transpose(1, 2).reshape(batch, rows, n_heads * dim), probs


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, bias: torch.Tensor, scaling: float):
    """One query token over the slot buffer plus itself, without concatenating K/V.

    q [1, H_q, 1, D]; cache_k/v [1, H_kv, S, D]; k/v (the token's own) [1, H_kv, 1, D]; bias
    [1, H_kv, S]. Only the S+1 logits are joined for the softmax, so a step never copies the cache.
    Returns the output [1, 1, H_q * D] and the probabilities [1, H_kv, G, 1, S+1].
    """
    _, n_heads, _, dim = q.shape
    n_kv = cache_k.shape[1]
    grouped = q.reshape(1, n_kv, n_heads // n_kv, 1, dim)
    cache_logits = grouped @ cache_k[:, :, None].transpose(-1, -2) * scaling + bias[:, :, None, None, :]
    self_logit = (grouped * k[:, :, None]).sum(-1, keepdim=True) * scaling     # [1, H_kv, G, 1, 1]
    probs = torch.softmax(torch.cat([cache_logits, self_logit], dim=-1).float(), dim=-1).to(cache_v.dtype)
    slots = cache_k.shape[2]
    out = probs[..., :slots] @ cache_v[:, :, None] + probs[..., slots:] * v[:, :, None]
    return out.reshape(1, n_heads, 1, dim).transpose(1, 2).reshape(1, 1, n_heads * dim), probs


def attention_inputs(layer, hidden: torch.Tensor, shape: DecoderShape, cos, sin):
    """A layer's rotary-applied q [B, H_q, T, D] and k, v [B, H_kv, T, D] for ``hidden``."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    q = project_heads(attn.q_proj, normed, shape.n_heads, shape.head_dim)
    k = project_heads(attn.k_proj, normed, shape.n_kv_heads, shape.head_dim)
    v = project_heads(attn.v_proj, normed, shape.n_kv_heads, shape.head_dim)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def layer_output(layer, hidden: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
    """Residual attention output, then the residual MLP (pre-norm Llama block)."""
    hidden = hidden + layer.self_attn.o_proj(attention_out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def decode_step(text_model, lm_head, token: torch.Tensor, position: torch.Tensor, past, bias: torch.Tensor):
    """One token through every decoder layer over a slot buffer.

    token [1, 1] int64; position [1] int64 (absolute); past: one (keys, values) pair per layer, each
    [1, H_kv, S, D] (separate tensors, so an exported graph reads each layer's block of the runtime's
    buffer in place instead of splitting one big input, which copies it); bias
    [layers, 1, H_kv, S] (0 valid, -inf free, log n for the n-softmax null slot). The token attends
    to the slots and to itself; the buffer is not modified (the caller writes the new K/V in place).
    Returns logits [1, vocab], new_kv [layers, 2, 1, H_kv, 1, D], and mass [layers, 1, H_kv, S]:
    the attention each slot received, summed over the query heads of its group.
    """
    shape = DecoderShape(text_model.config)
    hidden = text_model.embed_tokens(token)
    cos, sin = text_model.rotary_emb(hidden, position.reshape(1, 1))
    new_kv, masses = [], []
    n_slots = past[0][0].shape[2]
    for index, layer in enumerate(text_model.layers):
        q, k, v = attention_inputs(layer, hidden, shape, cos, sin)
        past_k, past_v = past[index]
        out, probs = decode_attention(q, past_k, past_v, k, v, bias[index], layer.self_attn.scaling)
        hidden = layer_output(layer, hidden, out)
        new_kv.append(torch.stack([k, v]))
        masses.append(probs.sum(dim=(2, 3))[..., :n_slots])
    logits = lm_head(text_model.norm(hidden))[:, -1].float()
    return logits, torch.stack(new_kv), torch.stack(masses)


# Query rows per attention block in the prefill: the largest logits tensor is
# [H_q, ATTENTION_BLOCK, P] instead of [H_q, P, P].
ATTENTION_BLOCK = 256
# Prompt rows taken through every layer at a time (a multiple of ATTENTION_BLOCK). Chunk-major
# order gives each chunk its own tensor shapes, which its layers share and nothing after it
# reuses: ONNX Runtime's planner reuses a freed buffer only for a tensor of the same shape and
# keeps it allocated in between, so in layer-major order every block's differently shaped
# buffers stayed allocated from the first layer to the last (memory growing with P^2).
PREFILL_CHUNK = 1024


def after(x: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """``x``, made to depend on ``done`` (plus zero times one of its values). Graph runtimes order
    independent branches as they like, and ONNX Runtime's default order runs the blocks of a layer
    side by side, holding every block's logits at once; this dependency makes each block (and each
    chunk, and each layer's scoring) finish before the next starts."""
    return x + done.reshape(-1)[:1].to(x.dtype) * 0.0


def causal_block_biases(length: int, valid_length: torch.Tensor):
    """The additive masks of each query block (ATTENTION_BLOCK rows) of a right-padded prompt:
    block i's rows against the keys before the block's end, 0 where a key is at or before the row
    and before valid_length, -inf elsewhere. Computed once per prefill and shared by every layer."""
    block = ATTENTION_BLOCK
    offsets = torch.arange(block, dtype=torch.int64)
    triangle = offsets[None, :] <= offsets[:, None]          # the one constant: [block, block]
    biases = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        keys = torch.arange(stop, dtype=torch.int64)
        valid = keys < valid_length                              # [stop], known only at run time
        # keys before the block are causal for all its rows; the block's own keys by the triangle
        # (built from run-time pieces so that no [block, stop] mask is stored in the graph)
        allowed = torch.cat([valid[None, :start].expand(stop - start, start),
                             triangle[: stop - start, : stop - start] & valid[None, start:]], dim=1)
        biases.append(torch.where(allowed, torch.tensor(0.0), torch.tensor(float("-inf"))))
    return biases


def causal_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases, scaling: float) -> torch.Tensor:
    """Causal attention of consecutive query rows, one block at a time.

    q [1, H_q, T, D] holds the rows of ``biases`` (from :func:`causal_block_biases`, in order);
    k/v [1, H_kv, S, D] the keys up to the last block's end. Block i's rows see only keys before
    the block's end (a static slice), so the causal upper triangle is never computed and no
    P x P tensor exists. Returns [1, T, H_q * D].
    """
    outputs, start = [], 0
    for bias in biases:
        rows, stop = bias.shape
        block = q[:, :, start:start + rows] if not outputs else after(q[:, :, start:start + rows], outputs[-1])
        out, _ = grouped_attention(block, k[:, :, :stop], v[:, :, :stop], bias, scaling)
        outputs.append(out)
        start += rows
    return torch.cat(outputs, dim=1)


def gather_rows(x: torch.Tensor, positions: torch.Tensor, start: int, into: torch.Tensor | None) -> torch.Tensor:
    """``into`` [1, H, R, D] with the rows of ``positions`` that fall in ``x`` (the rows
    start .. start + T of [1, H, T, D]) taken from it. Without ``into`` (the first chunk) every row
    is taken from ``x``, clamped: rows outside it are overwritten by the chunk that holds them, as
    every position is in some chunk."""
    rows = x.shape[2]
    picked = torch.index_select(x, 2, torch.clamp(positions - start, min=0, max=rows - 1))
    if into is None:
        return picked
    inside = ((positions >= start) & (positions < start + rows))[None, None, :, None]
    return torch.where(inside, picked, into)


def prefill_layers(text_model, embeds: torch.Tensor, valid_length: torch.Tensor, window: torch.Tensor):
    """Causal attention over a right-padded prompt [1, P, hidden], PREFILL_CHUNK rows through
    every layer at a time (:func:`causal_block_attention` over the keys so far); keys at or past
    valid_length are masked.

    ``window`` [R] are the query positions whose rotary-applied queries each layer keeps. Returns
    the final hidden states [1, P, hidden] and per layer the window queries [1, H_q, R, D] and the
    keys and values [1, H_kv, P, D].
    """
    shape = DecoderShape(text_model.config)
    length = embeds.shape[1]
    positions = torch.arange(length, dtype=torch.int64)
    cos, sin = text_model.rotary_emb(embeds, positions[None])
    biases = causal_block_biases(length, valid_length)
    if PREFILL_CHUNK % ATTENTION_BLOCK:
        raise ValueError(f"PREFILL_CHUNK ({PREFILL_CHUNK}) must be a multiple of ATTENTION_BLOCK ({ATTENTION_BLOCK})")
    per_chunk = PREFILL_CHUNK // ATTENTION_BLOCK
    n_layers = len(text_model.layers)
    keys, values, queries = [None] * n_layers, [None] * n_layers, [None] * n_layers
    outputs = []
    for first in range(0, length, PREFILL_CHUNK):
        stop = min(first + PREFILL_CHUNK, length)
        hidden = embeds[:, first:stop]
        if outputs:                # the previous chunk finishes before this one starts
            hidden = after(hidden, outputs[-1])
        chunk_biases = biases[first // ATTENTION_BLOCK:][:per_chunk]
        for index, layer in enumerate(text_model.layers):
            q, k, v = attention_inputs(layer, hidden, shape, cos[:, first:stop], sin[:, first:stop])
            keys[index] = k if keys[index] is None else torch.cat([keys[index], k], dim=2)
            values[index] = v if values[index] is None else torch.cat([values[index], v], dim=2)
            queries[index] = gather_rows(q, window, first, queries[index])
            out = causal_block_attention(q, keys[index], values[index], chunk_biases, layer.self_attn.scaling)
            # the next layer waits for the window rows: gathered later, they would hold all of q
            hidden = after(layer_output(layer, hidden, out), queries[index])
        outputs.append(hidden)
    return torch.cat(outputs, dim=1), list(zip(queries, keys, values))
