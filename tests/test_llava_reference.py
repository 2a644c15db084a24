"""The LLaVA reference: parity with the unpruned HF model, window scores, pruned and bounded decoding."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from cspkv.models.llava import LlavaReference, generate_from_ids, modality_ids
from cspkv.pruning import available_policies, get_policy, n_softmax
from cspkv.models.tiny import IMAGE_TOKEN, multi_image_prompt, tiny_llava

ARCHS = {"gqa": dict(n_heads=4, n_kv_heads=2), "mha": dict(n_heads=4, n_kv_heads=4)}


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    return tiny_llava(**ARCHS[request.param], seed=1)


def hf_greedy(model, ids, pixels, n_tokens):
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [s[0] for s in out.scores]


def test_modality_ids_mark_every_spliced_image_token():
    ids, _ = multi_image_prompt(3)
    mod = modality_ids(ids, IMAGE_TOKEN)
    assert int(mod.sum()) == 3 * 16 and torch.equal(mod == 1, ids == IMAGE_TOKEN)
    padded = modality_ids(ids, IMAGE_TOKEN, attention_mask=(torch.arange(ids.shape[1]) < 10)[None])
    assert (padded[0, 10:] == -1).all() and (padded[0, :10] >= 0).all()


@pytest.mark.parametrize("n_images", [1, 3])
def test_budget_one_reproduces_the_unpruned_model_for_every_policy(model, n_images):
    ids, pixels = multi_image_prompt(n_images, seed=n_images)
    hf_tokens, hf_logits = hf_greedy(model, ids, pixels, 32)
    for policy in available_policies():
        result = generate_from_ids(model, ids, pixels, policy=policy, budget=1.0, max_new_tokens=32)
        assert result.tokens == hf_tokens, policy
        assert result.kept_per_layer == [ids.shape[1]] * 2
        diff = max((a - b.float()).abs().max().item() for a, b in zip(result.logits, hf_logits))
        assert diff < 1e-5, (policy, diff)


@pytest.mark.parametrize("chunk_rows", [256, 7])
def test_window_scores_match_hf_eager_attention(model, chunk_rows, monkeypatch):
    """The hook's W x L logits, summed as H2O does, equal HF's own attention probabilities. With
    7-row chunks H2O's early rows are scored over only the keys they see (the rest padded with 0)."""
    monkeypatch.setattr("cspkv.models.llava.SCORE_CHUNK_ROWS", chunk_rows)
    ids, pixels = multi_image_prompt(2, seed=5)
    ref = LlavaReference(model)
    prefill = ref.prefill(ids, pixels, {"h2o": get_policy("h2o"), "csp": get_policy("csp", n=0.0),
                                        "snapkv": get_policy("snapkv"), "lookm": get_policy("lookm")})
    model.config.text_config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    try:
        out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
    finally:
        model.model.language_model.config._attn_implementation = "sdpa"
    groups = ref.n_heads // ref.n_kv_heads
    length = ids.shape[1]
    window = math.floor(0.1 * length)
    for layer, attn in enumerate(out.attentions):                    # [1, H_q, L, L]
        grouped = attn.reshape(1, ref.n_kv_heads, groups, length, length)
        torch.testing.assert_close(prefill.scores["h2o"][layer][:, :, 0], grouped.sum(dim=(2, 3)),
                                   atol=2e-5, rtol=1e-4)
        window_sum = grouped[:, :, :, -window:].sum(dim=(2, 3))
        torch.testing.assert_close(prefill.scores["csp"][layer].sum(2), window_sum, atol=2e-5, rtol=1e-4)
        # SnapKV, LOOK-M and the window mass share one computation of the same sums
        torch.testing.assert_close(prefill.scores["snapkv"][layer][:, :, 0], window_sum, atol=2e-5, rtol=1e-4)
        assert torch.equal(prefill.scores["lookm"][layer], prefill.scores["snapkv"][layer])
        torch.testing.assert_close(prefill.window_mass[layer], window_sum / window, atol=2e-5, rtol=1e-4)


def test_prefill_without_window_mass(model, monkeypatch):
    """window_mass=False changes no score; the re-score eviction (the mass's only reader) then
    refuses clearly; policies that read no attention then need no window logits at all."""
    ids, pixels = multi_image_prompt(2, seed=4)
    ref = LlavaReference(model)
    policies = {name: get_policy(name) for name in available_policies()}
    with_mass = ref.prefill(ids, pixels, policies)
    without = ref.prefill(ids, pixels, policies, window_mass=False)
    assert without.window_mass is None
    for name in policies:
        assert all(torch.equal(a, b) for a, b in zip(with_mass.scores[name], without.scores[name])), name
    pruned = ref.prune(without, "csp", 0.5)
    assert pruned.mass is None
    first = int(without.logits[0].argmax())
    assert ref.decode(pruned, first, 6, eviction="ring", decode_slots=3).tokens == \
        ref.decode(ref.prune(with_mass, "csp", 0.5), first, 6, eviction="ring", decode_slots=3).tokens
    with pytest.raises(ValueError, match="rescore.*window_mass=True"):
        ref.decode(pruned, first, 6, eviction="rescore", decode_slots=3)

    calls = []
    monkeypatch.setattr("cspkv.models.llava.causal_window_logits", lambda *a: calls.append(1))
    bare = ref.prefill(ids, pixels, {name: get_policy(name) for name in ("full", "streaming_llm", "random")},
                       window_mass=False)
    assert calls == []
    for name in ("full", "streaming_llm", "random"):
        assert all(torch.equal(a, b) for a, b in zip(bare.scores[name], with_mass.scores[name])), name
    assert torch.equal(bare.logits, with_mass.logits)


def hf_decode_over(model, keys, values, token, position):
    """One HF decoding step over an explicit per-layer cache (positions absolute)."""
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    length = keys[0].shape[2]
    out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]),
                attention_mask=torch.ones(1, length + 1, dtype=torch.long), cache=cache)
    new_k = [cache.layers[i].keys[:, :, -1:] for i in range(len(keys))]
    new_v = [cache.layers[i].values[:, :, -1:] for i in range(len(keys))]
    return out.logits[0, -1].float(), new_k, new_v


@pytest.mark.parametrize("eviction,slots", [("unbounded", None), ("ring", 5)])
def test_pruned_decoding_matches_hf_over_the_same_cache(model, eviction, slots):
    """Decoding over the pruned cache equals HF decoding over an explicitly built cache holding
    the kept prompt entries plus the generated tokens the eviction keeps (ring: the last `slots`)."""
    ids, pixels = multi_image_prompt(3, seed=2)
    ref = LlavaReference(model)
    prefill = ref.prefill(ids, pixels, {"csp": get_policy("csp")})
    pruned = ref.prune(prefill, "csp", 0.3)
    first = int(prefill.logits[0].argmax())
    ours = ref.decode(pruned, first, 20, eviction=eviction, decode_slots=slots)
    generated_k, generated_v = [], []
    tokens = [first]
    for step in range(19):
        # ring: the step's own token takes one of the `slots` decode slots, so it sees the
        # slots - 1 most recent earlier tokens
        first_kept = 0 if slots is None else max(0, len(generated_k) - (slots - 1))
        keep, keep_v = generated_k[first_kept:], generated_v[first_kept:]
        keys = [torch.cat([pruned.keys[l]] + [g[l] for g in keep], 2) for l in range(ref.n_layers)]
        values = [torch.cat([pruned.values[l]] + [g[l] for g in keep_v], 2) for l in range(ref.n_layers)]
        logits, new_k, new_v = hf_decode_over(model, keys, values, tokens[-1], ids.shape[1] + step)
        generated_k.append(new_k)
        generated_v.append(new_v)
        torch.testing.assert_close(ours.logits[step], logits, atol=1e-5, rtol=1e-5)
        tokens.append(int(logits.argmax()))
    assert ours.tokens == tokens
    assert ours.slots == pruned.n_entries + (slots or 20)


def test_bounded_evictions_equal_unbounded_until_the_slots_overflow(model):
    ids, pixels = multi_image_prompt(2, seed=3)
    ref = LlavaReference(model)
    prefill = ref.prefill(ids, pixels, {"snapkv": get_policy("snapkv")})
    pruned = ref.prune(prefill, "snapkv", 0.5)
    first = int(prefill.logits[0].argmax())
    unbounded = ref.decode(pruned, first, 24)
    for eviction in ("ring", "rescore"):
        roomy = ref.decode(pruned, first, 24, eviction=eviction, decode_slots=23)
        assert roomy.tokens == unbounded.tokens
        tight = ref.decode(pruned, first, 24, eviction=eviction, decode_slots=4)
        assert len(tight.tokens) == 24 and tight.slots == pruned.n_entries + 4
        # the first tokens before overflow (4 decode slots -> 4 steps) agree exactly
        for a, b in zip(tight.logits[:4], unbounded.logits[:4]):
            torch.testing.assert_close(a, b)


def test_null_slot_is_decode_time_n_softmax():
    """softmax over [logits, log n] with a zero value row == n-softmax over the logits."""
    g = torch.Generator().manual_seed(0)
    logits, values = torch.randn(3, 9, generator=g), torch.randn(9, 5, generator=g)
    for n in (0.5, 1.0, 3.0):
        extended = torch.cat([logits, torch.full((3, 1), math.log(n))], -1)
        via_slot = torch.softmax(extended, -1) @ torch.cat([values, torch.zeros(1, 5)])
        torch.testing.assert_close(via_slot, n_softmax(logits, n=n) @ values)


def test_decode_n_softmax_is_wired_in(model):
    ids, pixels = multi_image_prompt(2, seed=4)
    plain = generate_from_ids(model, ids, pixels, budget=0.5, max_new_tokens=6)
    tiny_n = generate_from_ids(model, ids, pixels, budget=0.5, max_new_tokens=6, decode_n=1e-30)
    with_n = generate_from_ids(model, ids, pixels, budget=0.5, max_new_tokens=6, decode_n=1.0)
    assert tiny_n.slots == plain.slots + 1
    torch.testing.assert_close(tiny_n.logits[1], plain.logits[1])
    assert not torch.allclose(with_n.logits[1], plain.logits[1])


def test_kept_entries_per_layer_follow_the_budget(model):
    ids, pixels = multi_image_prompt(4, seed=6)
    length = ids.shape[1]
    for budget in (0.5, 0.2):
        result = generate_from_ids(model, ids, pixels, budget=budget, max_new_tokens=2)
        assert result.kept_per_layer == [math.ceil(budget * length)] * 2
        assert result.distinct_per_layer == result.kept_per_layer
    paper = generate_from_ids(model, ids, pixels, budget=0.5, max_new_tokens=2,
                              policy_params={"variant": "paper"})
    assert paper.kept_per_layer == [math.ceil(0.5 * length)] * 2
    assert all(d <= c for d, c in zip(paper.distinct_per_layer, paper.kept_per_layer))


@pytest.mark.parametrize("name", ["csp", "snapkv", "lookm", "h2o"])
def test_layer_budgets_keep_each_layers_count_and_pad_the_rest(model, name):
    """With layer-adaptive budgets each layer keeps the policy's own selection at its count (the
    first layer more); the tensors are padded to the widest layer with position -1 and zero K/V."""
    ids, pixels = multi_image_prompt(4, seed=6)
    length = ids.shape[1]
    policy = get_policy(name, pyramid=0.6)
    reference = LlavaReference(model)
    prefill = reference.prefill(ids, pixels, {name: policy})
    pruned = reference.prune(prefill, name, 0.3)
    counts = pruned.layer_counts
    assert counts == policy.layer_keep_counts(math.ceil(0.3 * length), 2, n_valid=length)
    assert counts[0] > counts[1] and sum(counts) == 2 * math.ceil(0.3 * length)
    assert pruned.n_entries == counts[0] and pruned.kept_entries == math.ceil(0.3 * length)
    for layer, count in enumerate(counts):
        expected = policy.indices_from_scores(prefill.scores[name][layer], prefill.modality, count)[0]
        assert torch.equal(pruned.positions[layer, :, :count], expected.expand(pruned.positions.shape[1], -1))
        assert bool((pruned.positions[layer, :, count:] == -1).all())
        assert bool((pruned.keys[layer][:, :, count:] == 0).all()) and bool((pruned.values[layer][:, :, count:] == 0).all())
    result = generate_from_ids(model, ids, pixels, policy=name, budget=0.3, max_new_tokens=2,
                               policy_params={"pyramid": 0.6})
    assert result.kept_per_layer == counts and result.distinct_per_layer == counts


def test_lookm_pivot_merge_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 12, 4, generator=g), torch.randn(1, 2, 12, 4, generator=g)
    modality = torch.tensor([[0] * 10 + [-1] * 2])
    kept = torch.tensor([[[0, 3, 7, 9], [1, 2, 8, 9]]])
    merged_k, merged_v = get_policy("lookm", merge=True).merge_evicted(keys, values, kept, modality)
    for h in range(2):
        kk = {j: [keys[0, h, j]] for j in kept[0, h].tolist()}
        vv = {j: [values[0, h, j]] for j in kept[0, h].tolist()}
        for e in range(10):
            if e in kk:
                continue
            sims = {j: float(torch.nn.functional.cosine_similarity(keys[0, h, e], keys[0, h, j], dim=0))
                    for j in kk}
            pivot = max(sims, key=lambda j: (sims[j], -j))
            kk[pivot].append((keys[0, h, e] + keys[0, h, pivot]) / 2)
            vv[pivot].append((values[0, h, e] + values[0, h, pivot]) / 2)
        for c, j in enumerate(kept[0, h].tolist()):
            torch.testing.assert_close(merged_k[0, h, c], torch.stack(kk[j]).mean(0))
            torch.testing.assert_close(merged_v[0, h, c], torch.stack(vv[j]).mean(0))
    plain_k, _ = get_policy("lookm").merge_evicted(keys, values, kept, modality)
    assert torch.equal(plain_k[0, 0, 1], keys[0, 0, 3])


def test_bad_input_gets_a_clear_error(model):
    ids, pixels = multi_image_prompt(1)
    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="not LLaVA-like"):
        LlavaReference(text_only)
    with pytest.raises(ValueError, match="budget must be a number in \\(0, 1\\]"):
        generate_from_ids(model, ids, pixels, budget=0.0)
    with pytest.raises(ValueError, match="unknown policy"):
        generate_from_ids(model, ids, pixels, policy="magic")
    with pytest.raises(ValueError, match="eviction must be one of"):
        generate_from_ids(model, ids, pixels, eviction="sometimes")
    with pytest.raises(ValueError, match="decode_slots must be >= 1"):
        generate_from_ids(model, ids, pixels, eviction="ring")
    with pytest.raises(ValueError, match="full cache keeps every entry"):
        generate_from_ids(model, ids, pixels, policy="full", budget=0.5)
    long_ids = torch.cat([ids] * 40, dim=1)
    with pytest.raises(ValueError, match="more than the model's context \\(1024\\)"):
        generate_from_ids(model, long_ids, torch.cat([pixels] * 40))
