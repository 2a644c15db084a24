"""The PyTorch reference of CSP on transformers' LlavaForConditionalGeneration.

Prefill runs the unmodified HF model with full attention, so the first generated token is the
unpruned model's. While it runs, a hook on every attention layer recomputes the queries of the
last W prompt positions (W x L logits per layer, never L x L) and hands them to each requested
pruning policy, which keeps only its per-key scores. Pruning then gathers the kept K/V per layer and
KV head, and decoding runs one token at a time over a static slot buffer (gpt-fast style) whose
slot bookkeeping is :class:`cspkv.runtime.slot_reference.SlotTable`, the same specification the C
runtime implements. Every other implementation (the ONNX graphs, the runtime) is checked against
this module.

Decoder layers must be Llama-style (pre-norm, q/k/v/o projections, rotary embeddings, gated MLP):
Llama, Vicuna, Mistral and Qwen2 language models are.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cspkv.pruning import IMAGE, PAD, TEXT, PruningPolicy, check_budget, get_policy, keep_count
from cspkv.pruning.base import MASS_WINDOW_RATIO, in_graph_capture
from cspkv.models.static_llama import DecoderShape, decode_step, project_heads
from cspkv.runtime.slot_reference import RING, RESCORE, SlotTable, null_slot_logit

SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")
UNBOUNDED = "unbounded"
DECODE_EVICTIONS = (UNBOUNDED, RING, RESCORE)   # what decode does when its slots are full
SCORE_CHUNK_ROWS = 256  # query rows scored at once: bounds memory at chunk x L per head


def modality_ids(input_ids: torch.Tensor, image_token_id: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Modality of every prompt position: 1 where image features are spliced in, 0 text, -1 pad."""
    modality = torch.where(input_ids == image_token_id, IMAGE, TEXT).to(torch.int64)
    if attention_mask is not None:
        modality = torch.where(attention_mask.bool(), modality, torch.full_like(modality, PAD))
    return modality


def check_llava_like(model) -> None:
    """Refuse, with what to do, a model this reference cannot drive."""
    inner = getattr(model, "model", None)
    text_model = getattr(inner, "language_model", None)
    if text_model is None or not hasattr(inner, "vision_tower") or not hasattr(model, "lm_head"):
        raise ValueError(f"{type(model).__name__} is not LLaVA-like: cspkv needs a transformers "
                         "LlavaForConditionalGeneration (vision tower + projector + language model)")
    model_type = getattr(model.config.text_config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"language model type {model_type!r} is not supported; cspkv drives "
                         f"Llama-style decoders: {', '.join(SUPPORTED_TEXT_MODELS)}")


def causal_window_logits(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """Pre-softmax logits of some query rows against all keys, causal mask as -inf.

    queries: [B, H_q, W, D] (rotary applied), keys: [B, H_kv, L, D] -> [B, H_kv, G, W, L], the G
    query heads that share a KV head grouped together.
    """
    batch, n_q_heads, rows, dim = queries.shape
    n_kv_heads, length = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(batch, n_kv_heads, n_q_heads // n_kv_heads, rows, dim)
    logits = grouped @ keys[:, :, None].transpose(-1, -2)
    future = torch.arange(length, device=keys.device)[None, :] > query_positions[:, None]
    if in_graph_capture():
        return (logits * scaling).masked_fill(future, float("-inf"))
    # eager (the sweep's H2O rows): in place, the same values without two fresh W x L buffers
    return logits.mul_(scaling).masked_fill_(future, float("-inf"))


@dataclass
class Prefill:
    """The unpruned prefill of one prompt, and each policy's per-key scores per layer."""

    logits: torch.Tensor                  # [1, vocab]: next-token logits of the last prompt token
    keys: list[torch.Tensor]              # per layer [1, H_kv, L, D], rotary applied
    values: list[torch.Tensor]            # per layer [1, H_kv, L, D]
    modality: torch.Tensor                # [1, L]
    scores: dict[str, list[torch.Tensor]]  # policy key -> per layer [1, H_kv, S, L]
    window_mass: list[torch.Tensor] | None  # per layer [1, H_kv, L]: mean softmax mass per window query
    policies: dict[str, PruningPolicy] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.modality.shape[-1]


@dataclass
class PrunedCache:
    keys: list[torch.Tensor]       # per layer [1, H_kv, C, D]
    values: list[torch.Tensor]
    positions: torch.Tensor        # [layers, H_kv, C] absolute positions of the kept entries
    modality: torch.Tensor         # [layers, H_kv, C]
    mass: torch.Tensor | None      # [layers, H_kv, C] window attention mass (re-score's start)
    prompt_len: int
    # entries kept per layer where layers keep different numbers (layer-adaptive budgets): each
    # layer's first counts[l] entries are real, the rest padding (position and modality -1, K/V 0)
    counts: list[int] | None = None

    @property
    def n_entries(self) -> int:
        """Entries per layer and KV head in the tensors (the most any layer keeps)."""
        return self.positions.shape[-1]

    @property
    def layer_counts(self) -> list[int]:
        return list(self.counts) if self.counts is not None else [self.n_entries] * len(self.keys)

    @property
    def kept_entries(self) -> float:
        """Mean entries kept per layer and KV head."""
        return sum(self.layer_counts) / len(self.keys)

    def distinct_per_layer(self) -> list[int]:
        """Distinct kept positions per layer (min over heads): below the layer's count only for csp 'paper'."""
        return [min(len({p for p in head.tolist() if p >= 0}) for head in layer) for layer in self.positions]


@dataclass
class DecodeResult:
    tokens: list[int]
    logits: list[torch.Tensor]     # per generated token, [vocab]
    slots: int                     # slots per layer and KV head the cache held
    step_s: list[float] = field(default_factory=list)   # wall time of each decode step


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str | None
    kept_per_layer: list[int]      # KV entries per layer and head after pruning (C)
    distinct_per_layer: list[int]
    prompt_len: int
    slots: int
    logits: list[torch.Tensor]


class LlavaReference:
    """Prefill, prune and decode a LlavaForConditionalGeneration, one prompt at a time (batch 1)."""

    def __init__(self, model):
        check_llava_like(model)
        self.model = model.eval()
        self.text_model = model.model.language_model
        self.config = model.config.text_config
        shape = DecoderShape(self.config)
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = (
            shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim)
        self.image_token_id = model.config.image_token_id

    # --- prefill ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                policies: dict[str, PruningPolicy], mass_window_ratio: float = MASS_WINDOW_RATIO,
                window_mass: bool = True) -> Prefill:
        """Run the full-attention prefill and score every key with every policy, layer by layer.

        ``window_mass=False`` skips the window attention mass (only the "rescore" eviction reads
        it); with it off and only policies that read no attention (full, StreamingLLM, random) the
        prefill is the bare model forward."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape [1, L] (batch 1), got {tuple(input_ids.shape)}")
        max_pos = getattr(self.config, "max_position_embeddings", None)
        if max_pos is not None and input_ids.shape[1] > max_pos:
            raise ValueError(f"the prompt has {input_ids.shape[1]} tokens, more than the model's "
                             f"context ({max_pos}): shorten it or use fewer images")
        modality = modality_ids(input_ids, self.image_token_id)
        length = input_ids.shape[1]
        scores = {key: [None] * self.n_layers for key in policies}
        mass = [None] * self.n_layers
        mass_rows = max(1, math.floor(mass_window_ratio * length))
        attending = {key: policy for key, policy in policies.items() if policy.uses_window_attention}

        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            layer = module.layer_idx
            keys = project_heads(module.k_proj, hidden, self.n_kv_heads, self.head_dim)
            queries_all = module.q_proj  # projected lazily per chunk below
            _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)

            chunks: dict = {}  # CSP, SnapKV, LOOK-M and the mass share the same last-W-row chunks
            plain: dict = {}   # and SnapKV, LOOK-M and the mass the same plain attention sums

            def window_logits(first_row: int, last_row: int, seen_keys_only: bool = False) -> torch.Tensor:
                if (first_row, last_row) in chunks:
                    return chunks[first_row, last_row]
                if first_row < length - mass_rows:  # H2O's rows before the window: used once
                    # these rows see only keys before last_row; the rest of the L x L block is masked
                    return compute_logits(first_row, last_row, last_row if seen_keys_only else length)
                chunks[first_row, last_row] = compute_logits(first_row, last_row, length)
                return chunks[first_row, last_row]

            def compute_logits(first_row: int, last_row: int, n_keys: int) -> torch.Tensor:
                h = hidden[:, first_row:last_row]
                q = project_heads(queries_all, h, self.n_heads, self.head_dim)
                q, _ = apply_rotary_pos_emb(q, q, cos[:, first_row:last_row], sin[:, first_row:last_row])
                rows = torch.arange(first_row, last_row, device=hidden.device)
                return causal_window_logits(q, keys[:, :, :n_keys], rows, module.scaling)

            def chunk_score(score, start: int, stop: int, seen_keys_only: bool) -> torch.Tensor:
                logits = window_logits(start, stop, seen_keys_only)
                seen = logits.shape[-1]  # keys after `seen` got exactly 0 from these rows
                part = score(logits, modality[:, :seen], modality[:, start:stop])
                return torch.nn.functional.pad(part, (0, length - seen)) if seen < length else part

            def plain_attention(start: int, stop: int, seen_keys_only: bool = False) -> torch.Tensor:
                if (start, stop) not in plain:
                    plain[start, stop] = chunk_score(PruningPolicy.attention_score, start, stop, seen_keys_only)
                return plain[start, stop]

            def summed(part, rows: int) -> torch.Tensor:
                total = None
                for start in range(length - rows, length, SCORE_CHUNK_ROWS):
                    value = part(start, min(start + SCORE_CHUNK_ROWS, length))
                    total = value if total is None else total + value
                return total

            same_scores: dict = {}  # policies that differ only in their selection share one score
            for key, policy in attending.items():
                def part(start, stop, policy=policy):
                    if policy.score_is_window_attention:  # shared with the other such policies
                        return plain_attention(start, stop, policy.row_additive_score)
                    return chunk_score(policy.score, start, stop, policy.row_additive_score)
                identity = policy.score_identity()
                if identity is None or identity not in same_scores:
                    scored = summed(part, int(policy.scoring_window(length)))
                    if identity is not None:
                        same_scores[identity] = scored
                scores[key][layer] = same_scores[identity] if identity is not None else scored
            if window_mass:
                mass[layer] = summed(plain_attention, mass_rows)[:, :, 0] / mass_rows

        hooked = bool(attending) or window_mass
        handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True)
                   for layer in self.text_model.layers] if hooked else []
        try:
            out = self.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        no_window = torch.empty(1, self.n_kv_heads, self.n_heads // self.n_kv_heads, 0, length)
        for key, policy in policies.items():
            if key not in attending:  # the same scores in every layer: computed once
                scores[key] = [policy.score(no_window, modality, modality[:, :0])] * self.n_layers
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        keys = [cache.layers[i].keys for i in range(self.n_layers)]
        values = [cache.layers[i].values for i in range(self.n_layers)]
        return Prefill(logits=out.logits[:, -1].float(), keys=keys, values=values, modality=modality,
                       scores=scores, window_mass=mass if window_mass else None, policies=dict(policies))

    # --- pruning ------------------------------------------------------------------------------
    def prune(self, prefill: Prefill, policy_key: str, budget: float) -> PrunedCache:
        """Keep C = ceil(budget * L) entries per layer and KV head with the named policy's scores
        (with layer-adaptive budgets, the policy's count per layer: n_layers x C in all)."""
        policy = prefill.policies[policy_key]
        n_keep = keep_count(budget, prefill.length)
        if policy.name == "full" and n_keep != prefill.length:
            raise ValueError("the full cache keeps every entry: use budget 1.0 with policy 'full'")
        counts = policy.layer_keep_counts(n_keep, self.n_layers, n_valid=prefill.length)
        widest = max(counts)
        keys, values, positions, modality, mass = [], [], [], [], []
        for layer in range(self.n_layers):
            kept = self._kept_indices(policy, prefill, layer, counts[layer])[0]  # [H_kv, C_l]
            k_all, v_all = prefill.keys[layer], prefill.values[layer]
            if hasattr(policy, "merge_evicted"):
                k, v = policy.merge_evicted(k_all, v_all, kept[None], prefill.modality)
            else:
                index = kept[None, :, :, None].expand(-1, -1, -1, self.head_dim)
                k, v = k_all.gather(2, index), v_all.gather(2, index)
            pad = widest - counts[layer]           # a layer keeping fewer: padding after its entries
            keys.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
            positions.append(torch.nn.functional.pad(kept, (0, pad), value=-1))
            modality.append(torch.nn.functional.pad(prefill.modality[0][kept], (0, pad), value=PAD))
            if prefill.window_mass is not None:
                mass.append(torch.nn.functional.pad(prefill.window_mass[layer][0].gather(-1, kept), (0, pad)))
        return PrunedCache(keys, values, torch.stack(positions), torch.stack(modality),
                           torch.stack(mass) if mass else None, prefill.length,
                           counts=None if len(set(counts)) == 1 else list(counts))

    def _kept_indices(self, policy: PruningPolicy, prefill: Prefill, layer: int, n_keep: int):
        key = next(k for k, p in prefill.policies.items() if p is policy)
        scores = prefill.scores[key][layer]
        return policy.indices_from_scores(scores, prefill.modality, n_keep).expand(1, self.n_kv_heads, -1)

    # --- decoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pruned: PrunedCache, first_token: int, max_new_tokens: int,
               eviction: str = UNBOUNDED, decode_slots: int | None = None, decode_n: float = 0.0,
               n_recent: int = 16, n_sink: int = 4, eos_token_id: int | None = None) -> DecodeResult:
        """Greedy decoding over a static slot buffer; ``first_token`` came from the prefill.

        eviction "unbounded": room for every generated token (the paper's growing cache);
        "ring": ``decode_slots`` slots for generated tokens, the oldest overwritten when full;
        "rescore": same slots, the lowest-scored non-recent, non-sink entry evicted when full.
        decode_n > 0 adds the n-softmax null slot (zero K/V, logit log n) to every decode step.
        """
        if eviction not in DECODE_EVICTIONS:
            raise ValueError(f"eviction must be one of {DECODE_EVICTIONS}, got {eviction!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if eviction == UNBOUNDED:
            decode_slots = max_new_tokens
        elif decode_slots is None or decode_slots < 1:
            raise ValueError(f"decode_slots must be >= 1 for eviction {eviction!r}, got {decode_slots!r}")
        if eviction == RESCORE and pruned.mass is None:
            raise ValueError("eviction 'rescore' starts from the window attention mass: prefill with "
                             "window_mass=True")
        null_logit = null_slot_logit(decode_n)
        n_slots = pruned.n_entries + decode_slots + (1 if null_logit is not None else 0)
        table = SlotTable(self.n_layers, self.n_kv_heads, n_slots,
                          eviction=RESCORE if eviction == RESCORE else RING,
                          n_recent=n_recent, n_sink=n_sink, null_logit=null_logit)
        table.load_prefill(pruned.positions.numpy(), pruned.modality.numpy(),
                           np.repeat(np.array(pruned.layer_counts)[:, None], self.n_kv_heads, axis=1),
                           pruned.prompt_len,
                           # ring and unbounded never read the scores: zeros when the mass was skipped
                           (pruned.mass if pruned.mass is not None else torch.zeros(pruned.positions.shape)).float().numpy())
        dtype = pruned.keys[0].dtype
        kv = torch.zeros((self.n_layers, 2, 1, self.n_kv_heads, n_slots, self.head_dim), dtype=dtype)
        c = pruned.n_entries
        for layer in range(self.n_layers):
            kv[layer, 0, :, :, :c] = pruned.keys[layer]
            kv[layer, 1, :, :, :c] = pruned.values[layer]

        tokens, all_logits, step_s = [first_token], [], []
        layer_idx = torch.arange(self.n_layers)[:, None]
        head_idx = torch.arange(self.n_kv_heads)[None, :]
        for step in range(max_new_tokens - 1):
            if eos_token_id is not None and tokens[-1] == eos_token_id:
                break
            started = time.perf_counter()
            position = pruned.prompt_len + step
            slots = torch.from_numpy(table.choose_write_slots(position)).long()
            bias = torch.from_numpy(table.attention_bias())[:, None]          # [layers, 1, H, S]
            logits, new_kv, mass = decode_step(self.text_model, self.model.lm_head,
                                               torch.tensor([[tokens[-1]]]), torch.tensor([position]),
                                               [(kv[i, 0], kv[i, 1]) for i in range(self.n_layers)], bias)
            # Write the new token's K/V into its slot in place (what the runtime does).
            kv[layer_idx, :, 0, head_idx, slots] = new_kv[:, :, 0, :, 0].permute(0, 2, 1, 3)
            table.commit_token(slots.numpy(), position)
            table.accumulate(mass[:, 0].numpy())
            all_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            step_s.append(time.perf_counter() - started)
        return DecodeResult(tokens=tokens, logits=all_logits, slots=n_slots, step_s=step_s)


def generate_from_ids(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                      policy: str = "csp", budget: float = 0.5, max_new_tokens: int = 32,
                      policy_params: dict | None = None, eviction: str = UNBOUNDED,
                      decode_slots: int | None = None, decode_n: float = 0.0,
                      eos_token_id: int | None = None, **decode_kwargs) -> GenerationResult:
    """Prefill, prune with one policy at one budget, and decode greedily."""
    check_budget(budget)  # fail before the expensive prefill
    if eviction not in DECODE_EVICTIONS:
        raise ValueError(f"eviction must be one of {DECODE_EVICTIONS}, got {eviction!r}")
    reference = LlavaReference(model)
    pruning_policy = get_policy(policy, **(policy_params or {}))
    prefill = reference.prefill(input_ids, pixel_values, {policy: pruning_policy})
    pruned = reference.prune(prefill, policy, budget)
    first = int(prefill.logits[0].argmax())
    result = reference.decode(pruned, first, max_new_tokens, eviction=eviction, decode_slots=decode_slots,
                              decode_n=decode_n, eos_token_id=eos_token_id, **decode_kwargs)
    return GenerationResult(tokens=result.tokens, text=None,
                            kept_per_layer=pruned.layer_counts,
                            distinct_per_layer=pruned.distinct_per_layer(),
                            prompt_len=prefill.length, slots=result.slots,
                            logits=[prefill.logits[0]] + result.logits)


def generate(model, processor, images, prompt: str, policy: str = "csp", budget: float = 0.5,
             max_new_tokens: int = 32, **kwargs) -> GenerationResult:
    """Reference generation from images and a prompt: tokens, text and kept entries per layer.

    ``processor`` is the model's processor (it expands the image token and makes pixel_values);
    the prompt must contain one image token per image.
    """
    inputs = processor(images=list(images) or None, text=prompt, return_tensors="pt")
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs.setdefault("eos_token_id", getattr(tokenizer, "eos_token_id", None))
    result = generate_from_ids(model, inputs["input_ids"], inputs.get("pixel_values"), policy=policy,
                               budget=budget, max_new_tokens=max_new_tokens, **kwargs)
    result.text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    return result
