"""The torch modules traced into the three static-shape ONNX graphs.

vision:  pixel_values [N_img, 3, H, W] -> image_features [N_img, T, hidden]
prefill: input_ids [1, P], image_embeds [1, P, hidden] (image features already placed at the image
         positions, zeros elsewhere: placing them is an index assignment the runtime does in
         place, while the token embedding stays inside the graph that owns the table), modality
         [1, P], valid_length [1]
         -> logits [1, vocab] of the last valid token, kv [layers, 2, 1, H_kv, S, D], and per slot
         position / modality / valid [layers, H_kv, S] (int64) and mass [layers, H_kv, S] (float)
decode:  token [1, 1], position [1], bias [layers, 1, H_kv, S], past_key_<i> and past_value_<i>
         [1, H_kv, S, D] for each layer i (blocks of the runtime's buffer, bound in place)
         -> logits [1, vocab], new_kv [layers, 2, 1, H_kv, 1, D], mass [layers, 1, H_kv, S]

Pruning inside prefill is the policy's own ``score`` and ``keep_mask`` with the budget as a tensor
(C = ceil(budget * valid_length)), so a prompt shorter than P gets what the reference gives it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cspkv.models import static_llama
from cspkv.models.static_llama import DecoderShape, after, decode_step, prefill_layers
from cspkv.models.llava import causal_window_logits
from cspkv.pruning import IMAGE, PAD, PruningPolicy, keep_count
from cspkv.pruning.base import MASS_WINDOW_RATIO, floor_ratio, padded_keys_masked



class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.llava = model.model

    def forward(self, pixel_values):
        features = self.llava.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def window_rows(valid_length: torch.Tensor, rows_needed: torch.Tensor, max_rows: int):
    """The last ``max_rows`` query positions ending at valid_length - 1 (clamped at 0) and a mask of
    the ones that belong to a window of ``rows_needed`` rows (the others are padding rows)."""
    offsets = torch.arange(max_rows, dtype=torch.int64)
    positions = torch.clamp(valid_length - max_rows + offsets, min=0)
    in_window = offsets >= max_rows - rows_needed
    return positions, in_window


def window_sum(q, k, key_modality, rows, in_window, scaling, row_sums):
    """Each ``row_sum(logits, query_modality)`` of ``row_sums`` summed over the window queries
    ``q`` [1, H_q, R, D] at positions ``rows`` [R], ATTENTION_BLOCK rows at a time (one logits
    tensor per chunk serves them all).

    Every window quantity (policy scores, re-score mass) is a sum over rows of a row-local
    function, so chunking gives the same sums while the largest logits tensor stays
    [H_q, chunk, P]: the window is 10% of P, and all of it at once would grow with P^2.
    Rows outside the window carry query modality PAD and add nothing.
    """
    totals, chunk = [None] * len(row_sums), static_llama.ATTENTION_BLOCK
    for start in range(0, rows.shape[0], chunk):
        part_rows = rows[start:start + chunk]
        query_modality = torch.where(in_window[None, start:start + chunk], key_modality[:, part_rows], PAD)
        queries = q[:, :, start:start + chunk]
        if totals[0] is not None:
            queries = after(queries, totals[0])
        logits = causal_window_logits(queries, k, part_rows, scaling)
        with padded_keys_masked():          # the window rows' causal mask covers every padded key
            for i, row_sum in enumerate(row_sums):
                part = row_sum(logits, query_modality)
                totals[i] = part if totals[i] is None else totals[i] + part
    return totals


class PrefillGraph(nn.Module):
    def __init__(self, model, policy: PruningPolicy, budget: float, max_prompt: int, n_slots: int):
        super().__init__()
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        self.policy = policy
        self.budget = budget
        self.max_prompt = max_prompt
        self.shape = DecoderShape(self.text.config)
        # the widest layer's count (layer-adaptive budgets keep more in some layers)
        self.max_keep = max(int(c) for c in policy.layer_keep_counts(
            keep_count(budget, max_prompt), self.shape.n_layers, n_valid=max_prompt))
        if n_slots < self.max_keep:
            raise ValueError(f"n_slots ({n_slots}) is below the prompt entries kept ({self.max_keep})")
        self.n_slots = n_slots
        # Static row counts: the most rows a window can need at P valid tokens.
        self.max_score_rows = int(policy.scoring_window(max_prompt))
        self.max_mass_rows = max(1, math.floor(MASS_WINDOW_RATIO * max_prompt))
        # The score's rows are the mass rows when the policy scores the default window.
        self.shared_window = (policy.uses_window_attention and policy.window_ratio == MASS_WINDOW_RATIO
                              and type(policy).scoring_window is PruningPolicy.scoring_window)

    def forward(self, input_ids, image_embeds, modality, valid_length):
        text_embeds = self.text.embed_tokens(input_ids)
        embeds = torch.where((modality == IMAGE)[..., None], image_embeds.to(text_embeds.dtype), text_embeds)
        positions = torch.arange(self.max_prompt, dtype=torch.int64)
        key_modality = torch.where(positions[None] < valid_length, modality, torch.full_like(modality, PAD))
        n_keep = keep_count(self.budget, valid_length)                                # [1]
        layer_keep = self.policy.layer_keep_counts(n_keep, self.shape.n_layers, n_valid=valid_length)  # [layers, 1]
        slot_index = torch.arange(self.max_keep, dtype=torch.int64)
        slot_valid = slot_index[None, None, :] < layer_keep[:, :, None]               # [layers, 1, C_max]
        score_rows, score_in = window_rows(valid_length, self.policy.scoring_window(valid_length),
                                           self.max_score_rows)
        mass_needed = torch.clamp(floor_ratio(MASS_WINDOW_RATIO, valid_length), min=1)
        mass_rows, mass_in = window_rows(valid_length, mass_needed, self.max_mass_rows)
        # Both windows end at the last valid token: the queries of the longer one serve both.
        kept_rows = max(self.max_mass_rows, self.max_score_rows if self.policy.uses_window_attention else 0)
        window, _ = window_rows(valid_length, valid_length, kept_rows)

        hidden, layers = prefill_layers(self.text, embeds, valid_length, window)
        outputs, done = [], hidden
        for index, (q, k, v) in enumerate(layers):
            scaling = self.text.layers[index].self_attn.scaling
            # one layer's scoring at a time; k too, or its transposes for the window logits run
            # as soon as k exists and every layer's copy waits here
            q, k = after(q, done), after(k, done)

            def score(logits, rows):
                return self.policy.score(logits, key_modality, rows)

            def window_mass(logits, rows):
                return PruningPolicy.attention_score(logits, key_modality, rows)[:, :, 0]

            mass_q = q[:, :, kept_rows - self.max_mass_rows:]
            if self.shared_window:      # the score's window is the mass window: one pass for both
                scores, mass = window_sum(mass_q, k, key_modality, mass_rows, mass_in, scaling, [score, window_mass])
            else:
                mass, = window_sum(mass_q, k, key_modality, mass_rows, mass_in, scaling, [window_mass])
                if self.policy.uses_window_attention:
                    score_q = q[:, :, kept_rows - self.max_score_rows:]
                    scores, = window_sum(score_q, k, key_modality, score_rows, score_in, scaling, [score])
                else:  # the score ignores attention: one call over a window of no rows
                    no_rows = k.new_zeros(1, self.shape.n_kv_heads, self.shape.groups, 0, self.max_prompt)
                    scores = self.policy.score(no_rows, key_modality, key_modality[:, :0])
            outputs.append((k, v, scores, mass[0] / mass_needed.to(mass.dtype)))      # mass [H, P]
            done = scores.reshape(-1)[:1] + mass.reshape(-1)[:1]
        last = torch.index_select(hidden, 1, valid_length - 1)                       # [1, 1, hidden], a Gather
        logits = self.lm_head(self.text.norm(last))[:, -1].float()
        # One selection for all layers (layers as the batch): the same choice per layer with one
        # layer's worth of graph nodes; the price is holding every layer's K/V until here.
        layers = len(outputs)
        scores = torch.cat([o[2] for o in outputs])                                   # [layers, H, S, P]
        kept = self.policy.kept_indices(scores, key_modality.expand(layers, -1), layer_keep.reshape(-1),
                                        self.max_keep, self.shape.n_kv_heads)         # [layers, H, C]
        pad = self.n_slots - self.max_keep
        heads, dim = self.shape.n_kv_heads, self.shape.head_dim
        head_rows = torch.arange(heads, dtype=torch.int64)[:, None] * self.max_prompt           # [H, 1]
        layer_kv = []
        for index, (k, v, _, _) in enumerate(outputs):
            # each layer's kept rows by one Gather over its [H * P, D] rows (no index tensor
            # expanded to [C, D], no stacked copy of every layer's K/V)
            rows = (kept[index] + head_rows).reshape(-1)
            pair = torch.stack([x.reshape(heads * self.max_prompt, dim).index_select(0, rows).reshape(1, heads, -1, dim)
                                for x in (k, v)])                                     # [2, 1, H, C, D]
            layer_kv.append(nn.functional.pad(pair * slot_valid[index, 0][:, None].to(pair.dtype), (0, 0, 0, pad)))
        kv = torch.stack(layer_kv)                                                    # [layers, 2, 1, H, S, D]
        slot_position = nn.functional.pad(torch.where(slot_valid, kept, -1), (0, pad), value=-1)
        kept_modality = key_modality[0][kept]
        slot_modality = nn.functional.pad(torch.where(slot_valid, kept_modality, -1), (0, pad), value=-1)
        valid = slot_valid.to(torch.int64).expand_as(kept).contiguous()
        slot_valid_out = nn.functional.pad(valid, (0, pad), value=0)
        mass = torch.stack([o[3] for o in outputs]).gather(2, kept) * slot_valid.to(torch.float32)
        slot_mass = nn.functional.pad(mass, (0, pad))
        return logits, kv, slot_position, slot_modality, slot_valid_out, slot_mass


class DecodeGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.text = model.model.language_model
        self.lm_head = model.lm_head

    def forward(self, token, position, bias, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        return decode_step(self.text, self.lm_head, token, position, pairs, bias)


def decode_input_names(n_layers: int) -> list[str]:
    """The decode graph's inputs, in order: token, position, bias, then K and V of each layer."""
    past = [name for i in range(n_layers) for name in (f"past_key_{i}", f"past_value_{i}")]
    return ["token", "position", "bias", *past]
