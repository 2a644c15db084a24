"""The sweep's batched greedy decoder against the one-cache reference decoder."""

import pytest
import torch

from cspkv.models.batched_decode import decode_batch
from cspkv.models.llava import LlavaReference
from cspkv.models.tiny import multi_image_prompt, tiny_llava
from cspkv.pruning import get_policy

POLICIES = ["full", "csp", "h2o", "streaming_llm", "random"]
PYRAMID = "csp(pyramid=0.5)"


@pytest.fixture(scope="module", params=[dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, n_kv_heads=4)],
                ids=["gqa", "mha"])
def reference(request):
    return LlavaReference(tiny_llava(**request.param, seed=1))


def caches_of_one_prompt(reference, seed=2):
    """Pruned caches of several policies and budgets (groups of equal and unequal sizes), plus the
    full cache of a second prompt of the same length, as the sweep's blanked-image prompt is."""
    ids, pixels = multi_image_prompt(3, seed=seed)
    policies = {name: get_policy(name) for name in POLICIES}
    policies[PYRAMID] = get_policy("csp", pyramid=0.5)          # layers keeping different counts
    prefill = reference.prefill(ids, pixels, policies)
    caches = [reference.prune(prefill, "full", 1.0)]
    caches += [reference.prune(prefill, name, budget) for name in POLICIES[1:] + [PYRAMID] for budget in (0.5, 0.2)]
    firsts = [int(prefill.logits[0].argmax())] * len(caches)
    other = reference.prefill(ids, torch.zeros_like(pixels), {"full": get_policy("full")})
    caches.append(reference.prune(other, "full", 1.0))
    firsts.append(int(other.logits[0].argmax()))
    return caches, firsts


def test_batched_tokens_and_logits_equal_the_reference_decoder(reference):
    caches, firsts = caches_of_one_prompt(reference)
    assert len({c.n_entries for c in caches}) >= 3          # budget groups 1.0, 0.5, 0.2 and the widest layers
    assert any(c.counts is not None and len(set(c.counts)) > 1 for c in caches)
    logits = []
    batched = decode_batch(reference, caches, firsts, 12, logits_out=logits)
    for cache, first, tokens, step_logits in zip(caches, firsts, batched, logits):
        one = reference.decode(cache, first, 12)
        assert tokens == one.tokens
        assert len(step_logits) == len(one.logits) == 11
        for a, b in zip(step_logits, one.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_each_row_stops_at_its_own_eos_and_leaves_the_batch(reference, monkeypatch):
    """A row stops where the reference stops for that eos; the others run on, with the same logits,
    and from then on the finished row is no longer computed."""
    import cspkv.models.batched_decode as bd

    caches, firsts = caches_of_one_prompt(reference, seed=4)
    full = [reference.decode(cache, first, 10).tokens for cache, first in zip(caches, firsts)]
    eos = full[1][3]          # a token the second cache produces at its fourth step
    rows_attended = []
    attend = bd._attend
    monkeypatch.setattr(bd, "_attend", lambda q, *rest: rows_attended.append(q.shape[0]) or attend(q, *rest))
    logits = []
    batched = decode_batch(reference, caches, firsts, 10, eos_token_id=eos, logits_out=logits)
    for cache, first, tokens, step_logits in zip(caches, firsts, batched, logits):
        one = reference.decode(cache, first, 10, eos_token_id=eos)
        assert tokens == one.tokens
        assert len(step_logits) == len(one.logits)
        for a, b in zip(step_logits, one.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(batched[1]) <= 4 and max(map(len, batched)) <= 10
    assert min(map(len, batched)) < max(map(len, batched))
    # every row computed in every layer produced one recorded token: finished rows cost nothing
    assert sum(rows_attended) == reference.n_layers * sum(len(tokens) - 1 for tokens in batched)


def test_bad_batches_get_a_clear_error(reference):
    caches, firsts = caches_of_one_prompt(reference)
    with pytest.raises(ValueError, match="2 caches but 1 first tokens"):
        decode_batch(reference, caches[:2], firsts[:1], 4)
    ids, pixels = multi_image_prompt(2, seed=1)
    shorter = reference.prune(reference.prefill(ids, pixels, {"full": get_policy("full")}), "full", 1.0)
    with pytest.raises(ValueError, match="prompts of one length"):
        decode_batch(reference, [caches[0], shorter], [firsts[0], firsts[0]], 4)
    assert decode_batch(reference, [], [], 4) == []
