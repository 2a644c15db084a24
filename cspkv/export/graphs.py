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

from cspkv.models.static_llama import ATTENTION_BLOCK, DecoderShape, after, decode_step, prefill_layers
from cspkv.models.llava import causal_window_logits
from cspkv.pruning import IMAGE, PAD, PruningPolicy, keep_count
from cspkv.pruning.base import MASS_WINDOW_RATIO, floor_ratio



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


def window_sum(q, k, key_modality, rows, in_window, scaling, row_sums, chunk: int = ATTENTION_BLOCK):
    """Each ``row_sum(logits, query_modality)`` of ``row_sums`` summed over the window ``rows``,
    ``chunk`` rows at a time (one logits tensor per chunk serves them all).

    Every window quantity (policy scores, re-score mass) is a sum over rows of a row-local
    function, so chunking gives the same sums while the largest logits tensor stays
    [H_q, chunk, P]: the window is 10% of P, and all of it at once would grow with P^2.
    Rows outside the window carry query modality PAD and add nothing.
    """
    totals = [None] * len(row_sums)
    for start in range(0, rows.shape[0], chunk):
        part_rows = rows[start:start + chunk]
        query_modality = torch.where(in_window[None, start:start + chunk], key_modality[:, part_rows], PAD)
        queries = q[:, :, part_rows] if totals[0] is None else after(q[:, :, part_rows], totals[0])
        logits = causal_window_logits(queries, k, part_rows, scaling)
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
        self.max_keep = keep_count(budget, max_prompt)
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
        slot_index = torch.arange(self.max_keep, dtype=torch.int64)
        slot_valid = slot_index < n_keep                                              # [C_max]
        score_rows, score_in = window_rows(valid_length, self.policy.scoring_window(valid_length),
                                           self.max_score_rows)
        mass_needed = torch.clamp(floor_ratio(MASS_WINDOW_RATIO, valid_length), min=1)
        mass_rows, mass_in = window_rows(valid_length, mass_needed, self.max_mass_rows)
        outputs = []

        def on_layer(index, q, k, v):
            scaling = self.text.layers[index].self_attn.scaling

            def score(logits, rows):
                return self.policy.score(logits, key_modality, rows)

            def window_mass(logits, rows):
                return PruningPolicy.attention_score(logits, key_modality, rows)[:, :, 0]

            if self.shared_window:      # the score's window is the mass window: one pass for both
                scores, mass = window_sum(q, k, key_modality, mass_rows, mass_in, scaling, [score, window_mass])
            else:
                mass, = window_sum(q, k, key_modality, mass_rows, mass_in, scaling, [window_mass])
                if self.policy.uses_window_attention:
                    scores, = window_sum(q, k, key_modality, score_rows, score_in, scaling, [score])
                else:  # the score ignores attention: one call over a window of no rows
                    no_rows = k.new_zeros(1, self.shape.n_kv_heads, self.shape.groups, 0, self.max_prompt)
                    scores = self.policy.score(no_rows, key_modality, key_modality[:, :0])
            outputs.append((k, v, scores, mass[0] / mass_needed.to(mass.dtype)))      # mass [H, P]
            return scores.reshape(-1)[:1] + mass.reshape(-1)[:1]    # what the next layer waits for

        hidden = prefill_layers(self.text, embeds, valid_length, on_layer)
        last = torch.index_select(hidden, 1, valid_length - 1)                       # [1, 1, hidden], a Gather
        logits = self.lm_head(self.text.norm(last))[:, -1].float()
        # One selection for all layers (layers as the batch): the same choice per layer with one
        # layer's worth of graph nodes; the price is holding every layer's K/V until here.
        layers = len(outputs)
        scores = torch.cat([o[2] for o in outputs])                                   # [layers, H, S, P]
        kept = self.policy.kept_indices(scores, key_modality.expand(layers, -1), n_keep, self.max_keep,
                                        self.shape.n_kv_heads)                        # [layers, H, C]
        gather = kept[:, None, :, :, None].expand(-1, 1, -1, -1, self.shape.head_dim)
        keys = torch.stack([o[0] for o in outputs]).gather(3, gather)                 # [layers, 1, H, C, D]
        values = torch.stack([o[1] for o in outputs]).gather(3, gather)
        pad = self.n_slots - self.max_keep
        kv = torch.stack([keys, values], dim=1)                                       # [layers, 2, 1, H, C, D]
        kv = kv * slot_valid[:, None].to(kv.dtype)
        kv = nn.functional.pad(kv, (0, 0, 0, pad))
        slot_position = nn.functional.pad(torch.where(slot_valid, kept, -1), (0, pad), value=-1)
        kept_modality = key_modality[0][kept]
        slot_modality = nn.functional.pad(torch.where(slot_valid, kept_modality, -1), (0, pad), value=-1)
        valid = slot_valid.to(torch.int64).expand_as(kept)
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
