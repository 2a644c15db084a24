"""The pruning policies: agreement with loop-based references, invariants, CSP's own properties."""

import math

import pytest
import torch

from cspkv.pruning import available_policies, get_policy, keep_count, n_softmax
from naive_policies import naive_n_softmax, naive_select, random_inputs

POLICY_PARAMS = {
    "full": {},
    "random": {"seed": 3},
    "streaming_llm": {"n_sink": 4},
    "h2o": {},
    "snapkv": {"kernel_size": 5},
    "lookm": {},
    "csp": {"n": 1.0, "cross_ratio": 0.5},
}


def test_every_policy_is_covered():
    assert set(available_policies()) == set(POLICY_PARAMS)


@pytest.mark.parametrize("name", list(POLICY_PARAMS))
@pytest.mark.parametrize("seed", range(4))
def test_vectorised_agrees_with_naive(name, seed):
    groups = 1 + seed % 3                                # MHA (G=1) and GQA
    logits, key_mod, query_mod = random_inputs(seed, batch=2, heads=3, groups=groups, length=48,
                                               window=6, n_pad=seed, n_pad_rows=seed % 2,
                                               ties=seed % 2 == 1)
    n_valid = 48 - seed
    n_keep = n_valid if name == "full" else [5, 12, 20, n_valid][seed]
    params = POLICY_PARAMS[name]
    kept = get_policy(name, **params).select(logits, key_mod, query_mod, n_keep)
    assert kept.shape == (2, 3, n_keep) and kept.dtype == torch.int64
    for b in range(2):
        for h in range(3):
            expected = naive_select(name, logits[b, h], key_mod[b], query_mod[b], n_keep, head=h, **params)
            assert kept[b, h].tolist() == expected, (name, b, h)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("variant", ["distinct", "paper"])
def test_csp_cross_ratios_and_variants_agree_with_naive(ratio, variant):
    logits, key_mod, query_mod = random_inputs(11, heads=2, groups=3, length=60, window=6)
    params = {"cross_ratio": ratio, "variant": variant, "n": 2.0, "recent_ratio": 0.5}
    kept = get_policy("csp", **params).select(logits, key_mod, query_mod, 20)
    for h in range(2):
        assert kept[0, h].tolist() == naive_select("csp", logits[0, h], key_mod[0], query_mod[0], 20, **params)


@pytest.mark.parametrize("name", [n for n in POLICY_PARAMS if n != "full"])
@pytest.mark.parametrize("n_keep", [1, 3, 9, 30, 45])
def test_invariants(name, n_keep):
    logits, key_mod, query_mod = random_inputs(5, batch=1, heads=2, groups=2, length=50, window=5, n_pad=5)
    policy = get_policy(name)
    kept = policy.select(logits, key_mod, query_mod, n_keep)
    n_valid = 45
    _, recent = 5, min(5, n_keep)            # W = floor(0.1 * 45) = 4 -> R = 4, capped by n_keep
    recent = min(math.floor(1.0 * max(1, math.floor(0.1 * n_valid))), n_keep)
    for row in kept[0]:
        values = row.tolist()
        assert values == sorted(values)
        assert len(set(values)) == n_keep                      # distinct
        assert all(0 <= j < n_valid for j in values)           # in range, never padding
        assert set(range(n_valid - recent, n_valid)) <= set(values)


def test_padding_is_never_looked_at():
    """Changing padded keys' logits or padded window rows must not change the choice."""
    logits, key_mod, query_mod = random_inputs(7, heads=2, groups=2, length=40, window=4, n_pad=6, n_pad_rows=1)
    noisy = logits.clone()
    noisy[..., 34:] = torch.randn_like(noisy[..., 34:]) * 100       # padded keys
    noisy[:, :, :, 0, :] = torch.randn_like(noisy[:, :, :, 0, :]) * 100  # padded window row
    for name in POLICY_PARAMS:
        if name == "full":
            continue
        policy = get_policy(name)
        assert torch.equal(policy.select(logits, key_mod, query_mod, 10),
                           policy.select(noisy, key_mod, query_mod, 10)), name


def test_paper_variant_is_two_independent_top_k_concatenated():
    logits, key_mod, query_mod = random_inputs(2, heads=2, groups=2, length=60, window=6)
    paper = get_policy("csp", variant="paper")
    n_keep = 30
    kept = paper.select(logits, key_mod, query_mod, n_keep)
    scores = paper.score(logits, key_mod, query_mod)
    recent = 6
    cand = 60 - recent
    k = n_keep - recent
    k_c, k_s = math.floor(0.5 * k), k - math.floor(0.5 * k)
    for h in range(2):
        order = lambda s: sorted(range(cand), key=lambda j: (-float(s[j]), j))
        by_cross = order(scores[0, h, 1])[:k_c]
        by_self = order(scores[0, h, 0])[:k_s]
        expected = sorted(list(range(cand, 60)) + by_cross + by_self)
        assert kept[0, h].tolist() == expected
    assert any(len(set(row.tolist())) < n_keep for row in kept[0])   # this input does duplicate


def test_self_plus_cross_is_the_plain_window_score():
    logits, key_mod, query_mod = random_inputs(4, heads=2, groups=3, length=50, window=5, n_pad_rows=1)
    for n in (0.0, 1.0, 3.0):
        scores = get_policy("csp", n=n).score(logits, key_mod, query_mod)
        plain = n_softmax(logits, n=n) * (query_mod >= 0)[:, None, None, :, None]
        torch.testing.assert_close(scores.sum(2), plain.sum(dim=(2, 3)), rtol=0, atol=1e-6)


def test_n_softmax_formula_stability_and_n_zero():
    x = torch.randn(6, 17, dtype=torch.float64)
    for n in (0.5, 1.0, 4.0):
        expected = torch.exp(x) / (n + torch.exp(x).sum(-1, keepdim=True))
        torch.testing.assert_close(n_softmax(x, n=n), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(n_softmax(x, n=0.0), torch.softmax(x, -1), rtol=1e-12, atol=1e-15)
    big = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4 + 2.0]], dtype=torch.float32)
    for n in (0.0, 1.0):
        out = n_softmax(big, n=n)
        assert torch.isfinite(out).all()
        for row, ref in zip(out, big):
            assert row.tolist() == pytest.approx(naive_n_softmax(ref.double().tolist(), n), abs=1e-6)
    masked = torch.full((2, 5), float("-inf"))
    for n in (0.0, 1.0):
        assert torch.equal(n_softmax(masked, n=n), torch.zeros(2, 5))
    # the null term down-weights weak rows: a row of all -5 logits keeps little mass under n = 1
    weak = n_softmax(torch.full((1, 4), -5.0), n=1.0).sum()
    assert weak < 0.03


def test_eager_n_softmax_equals_the_graph_form_and_window_probabilities_match_under_export():
    """n_softmax_eager (the reference's fast path) against n_softmax (what graphs contain): plain,
    huge, partly and fully masked rows, n = 0 and n > 0; and window_probabilities takes the graph
    form while an exporter traces it, the same values either way."""
    from cspkv.pruning.base import PruningPolicy, n_softmax_eager

    x = torch.randn(3, 4, 33, dtype=torch.float64) * 4
    x[0, 1, 5:] = float("-inf")
    x[1, 2] = float("-inf")
    x[2, 0] = torch.linspace(-1e4, 1e4, 33, dtype=torch.float64)
    for n in (0.0, 0.5, 1.0, 7.0):
        torch.testing.assert_close(n_softmax_eager(x.clone(), n=n), n_softmax(x, n=n), rtol=1e-12, atol=1e-15)
        assert torch.equal(n_softmax_eager(x.clone(), n=n)[1, 2], torch.zeros(33, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must be >= 0"):
        n_softmax_eager(x, n=-1.0)

    logits, key_mod, query_mod = random_inputs(5, heads=2, groups=3, length=40, window=6, n_pad_rows=2)
    key_mod[:, :3] = -1                                        # padded keys too
    for n in (0.0, 2.0):
        eager = PruningPolicy.window_probabilities(logits, key_mod, query_mod, n=n)
        expected = n_softmax(logits.float().masked_fill(~(key_mod >= 0)[:, None, None, None, :], float("-inf")), n=n)
        expected = expected * (query_mod >= 0)[:, None, None, :, None]
        torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-7)
        assert (eager[..., :3] == 0).all()

        class Probs(torch.nn.Module):
            def forward(self, logits, key_mod, query_mod):
                return PruningPolicy.window_probabilities(logits, key_mod, query_mod, n=n)

        program = torch.export.export(Probs(), (logits, key_mod, query_mod))
        ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert "aten.amax.default" in ops and not any("logsumexp" in op for op in ops)
        torch.testing.assert_close(program.module()(logits, key_mod, query_mod), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,params", [("snapkv", {}), ("lookm", {}), ("h2o", {}), ("csp", {"n": 0.0}),
                                         ("csp", {"n": 1.0}), ("csp", {"n": 3.0, "cross_ratio": 0.3})])
@pytest.mark.parametrize("traced", [False, True])
def test_window_scores_equal_the_probabilities_form(name, params, traced, monkeypatch):
    """The scores (grouped_window_attention: the row normaliser folded into one matmul, no
    probabilities written) against the definition: window probabilities, masked, split by
    query/key modality and summed; eagerly and as traced (the masking path differs), with padded
    keys and rows and a fully masked row."""
    from cspkv.pruning.base import PruningPolicy

    logits, key_mod, query_mod = random_inputs(11, batch=2, heads=2, groups=3, length=40, window=6,
                                               n_pad=4, n_pad_rows=1)
    logits[1, 0, 2, 4] = float("-inf")
    policy = get_policy(name, **params)
    probs = PruningPolicy.window_probabilities(logits, key_mod, query_mod, n=params.get("n", 0.0))
    if name == "csp":
        same = (query_mod[:, :, None] == key_mod[:, None, :])[:, None, None]
        expected = torch.stack([(probs * same).sum(dim=(2, 3)), (probs * ~same).sum(dim=(2, 3))], dim=2)
    else:
        expected = probs.sum(dim=(2, 3))[:, :, None]
    if traced:
        monkeypatch.setattr("cspkv.pruning.base.in_graph_capture", lambda: True)
    scores = policy.score(logits, key_mod, query_mod)
    assert scores.shape == expected.shape
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert (scores[..., -4:] == 0).all()          # padded keys score nothing


@pytest.mark.parametrize("name,params", [("snapkv", {}), ("h2o", {}), ("csp", {"n": 1.0})])
def test_scores_skip_the_padded_key_mask_only_when_the_caller_masked_them(name, params, monkeypatch):
    """Inside padded_keys_masked() (the exported prefill's scoring) the policies trust the caller's
    -inf at padded keys: with causal window logits, whose future mask covers every padded key, the
    scores are the same as with the policies' own mask; given garbage at padded keys, only the
    policies' own mask keeps them at 0."""
    from cspkv.pruning.base import padded_keys_masked

    monkeypatch.setattr("cspkv.pruning.base.in_graph_capture", lambda: True)
    logits, key_mod, query_mod = random_inputs(5, batch=2, heads=2, groups=3, length=40, window=6,
                                               n_pad=4, n_pad_rows=1)
    policy = get_policy(name, **params)
    own = policy.score(logits, key_mod, query_mod)
    with padded_keys_masked():
        trusted = policy.score(logits, key_mod, query_mod)
    torch.testing.assert_close(trusted, own, rtol=0, atol=0)
    garbage = logits.clone()
    garbage[..., -4:] = 5.0
    assert (policy.score(garbage, key_mod, query_mod)[..., -4:] == 0).all()
    with padded_keys_masked():
        assert (policy.score(garbage, key_mod, query_mod)[..., -4:] > 0).all()


def _text_queries_attend_to_two_image_keys():
    """60 positions: text 0-3, image 4-43, text 44-59. Every query sees the text prefix strongly;
    image queries also attend to early image keys; the window's text queries attend moderately to
    image keys 20 and 31 and to nothing else visual."""
    length = 60
    key_mod = torch.tensor([[0] * 4 + [1] * 40 + [0] * 16])
    logits = torch.full((1, 1, 1, length, length), 0.0)
    for i in range(length):
        for j in range(length):
            if j > i:
                logits[0, 0, 0, i, j] = float("-inf")
            elif key_mod[0, j] == 0:
                logits[0, 0, 0, i, j] = 4.0
            elif key_mod[0, i] == 1:
                logits[0, 0, 0, i, j] = 2.0 if j < 12 else 0.0
            elif j in (20, 31):
                logits[0, 0, 0, i, j] = 2.5
    return logits, key_mod


def test_csp_keeps_the_image_tokens_text_attends_to_where_h2o_and_snapkv_drop_them():
    logits, key_mod = _text_queries_attend_to_two_image_keys()
    window = 6                                    # floor(0.1 * 60)
    n_keep = 14
    csp = get_policy("csp").select(logits[..., -window:, :], key_mod, key_mod[:, -window:], n_keep)
    h2o = get_policy("h2o").select(logits, key_mod, key_mod, n_keep)
    snap = get_policy("snapkv").select(logits[..., -window:, :], key_mod, key_mod[:, -window:], n_keep)
    assert {20, 31} <= set(csp[0, 0].tolist())
    assert not {20, 31} & set(h2o[0, 0].tolist())
    assert not {20, 31} & set(snap[0, 0].tolist())


def test_bad_input_names_the_argument():
    logits, key_mod, query_mod = random_inputs(0, length=30, window=3)
    policy = get_policy("csp")
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        get_policy("nope")
    with pytest.raises(ValueError, match="cross_ratio"):
        get_policy("csp", cross_ratio=1.5)
    with pytest.raises(ValueError, match="bad parameter.*colour"):
        get_policy("snapkv", colour="red")
    with pytest.raises(ValueError, match="window_ratio"):
        get_policy("h2o", window_ratio=0.0)
    with pytest.raises(ValueError, match="n_keep \\(31\\) is larger"):
        policy.select(logits, key_mod, query_mod, 31)
    with pytest.raises(ValueError, match="n_keep must be a Python int"):
        policy.select(logits, key_mod, query_mod, 3.0)
    with pytest.raises(ValueError, match="key_modality must have shape"):
        policy.select(logits, key_mod[:, :-1], query_mod, 10)
    with pytest.raises(ValueError, match="query_modality must have shape"):
        policy.select(logits, key_mod, query_mod[:, :-1], 10)
    with pytest.raises(ValueError, match="window_logits must be a tensor"):
        policy.select(logits[0], key_mod, query_mod, 10)
    with pytest.raises(ValueError, match="key_modality: valid keys must come first"):
        bad = key_mod.clone()
        bad[0, 3] = -1
        policy.select(logits, bad, query_mod, 10)
    with pytest.raises(ValueError, match="full cache keeps every entry"):
        get_policy("full").select(logits, key_mod, query_mod, 10)
    for budget in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="budget must be a number in \\(0, 1\\]"):
            keep_count(budget, 100)
    assert keep_count(0.2, 101) == 21 and keep_count(1.0, 7) == 7


def test_tensor_budgets_match_int_budgets():
    """The export passes the budget as a tensor (valid length is a graph input): same result."""
    logits, key_mod, query_mod = random_inputs(9, heads=2, groups=2, length=40, window=4)
    for name in ("csp", "snapkv", "lookm", "streaming_llm"):
        policy = get_policy(name)
        scores = policy.score(logits, key_mod, query_mod)
        as_int = policy.keep_mask(scores, key_mod, 13)
        as_tensor = policy.keep_mask(scores, key_mod, torch.tensor([13]))
        assert torch.equal(as_int, as_tensor), name


def _sorted_top_k(scores, allowed, k):
    """The stable-sort reference of top_k_mask (ties to the lower index)."""
    from cspkv.pruning.base import _as_batch, rank_descending
    return allowed & (rank_descending(scores.masked_fill(~allowed, float("-inf"))) < _as_batch(k, scores))


def _selection_cases(seed, count):
    """Scores as the policies make them (>= 0): random, many exact ties (pooled / rounded),
    subnormal, all zero; masks with gaps; k from 0 to every allowed entry, per batch row."""
    g = torch.Generator().manual_seed(seed)
    for case in range(count):
        length = int(torch.randint(1, 200, (1,), generator=g))
        scores = torch.rand(2, 3, length, generator=g)
        kind = case % 6
        if kind == 1:
            scores = torch.round(scores * 4) / 4
        elif kind == 2:
            scores = scores * 1e-40                             # subnormal float32
        elif kind == 3:
            scores = torch.zeros_like(scores)
        elif kind == 4:
            scores = torch.nn.functional.max_pool1d(scores.reshape(6, 1, length), 5, stride=1,
                                                    padding=2).reshape(2, 3, length)
        elif kind == 5:                                         # powers of two and their neighbours,
            powers = torch.exp2(torch.randint(-150, 12, (2, 3, length), generator=g).float())  # 2^-150 = 0
            scores = torch.where(torch.rand(2, 3, length, generator=g) > 0.5, powers,
                                 torch.nextafter(powers, torch.tensor(float("inf"))))
        allowed = torch.rand(2, 1, length, generator=g) > 0.3
        k = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=g)[0] for n in allowed.sum(-1)[:, 0]])
        yield scores, allowed, k


def test_sort_free_selection_equals_the_stable_sort():
    """The graphs' selection (threshold by bit-pattern bisection, ties by a running count) keeps
    exactly the entries a stable descending sort ranks below k."""
    from cspkv.pruning.base import mask_to_indices, top_k_mask_by_threshold

    for scores, allowed, k in _selection_cases(0, 250):
        chosen = top_k_mask_by_threshold(scores, allowed, k)
        assert torch.equal(chosen, _sorted_top_k(scores, allowed, k))
        assert torch.equal(chosen.sum(-1), k[:, None].expand(2, 3))
    g = torch.Generator().manual_seed(1)
    for length in (1, 7, 300):
        keep = torch.rand(2, 3, length, generator=g) > 0.5
        key = torch.where(keep, length - torch.arange(length), 0)
        expected = torch.sort(key, dim=-1, descending=True, stable=True).indices
        assert torch.equal(mask_to_indices(keep, length), expected)    # kept ascending, then dropped


def test_exported_selection_equals_the_stable_sort_without_top_k(tmp_path):
    """The same selection traced to ONNX and run by ONNX Runtime: identical masks, and the graph
    holds no TopK (TensorRT's TopK takes K < 3840; this works at any length)."""
    import onnx
    import onnxruntime as ort

    from cspkv.pruning.base import mask_to_indices, top_k_mask

    class Select(torch.nn.Module):
        def forward(self, scores, allowed, k):
            keep = top_k_mask(scores, allowed, k)
            return keep, mask_to_indices(keep.expand(2, 3, -1), scores.shape[-1])

    length = 8192
    example = (torch.rand(2, 3, length), torch.ones(2, 1, length, dtype=torch.bool), torch.tensor([4096, 5000]))
    path = tmp_path / "select.onnx"
    torch.onnx.export(Select(), example, str(path), dynamo=True, opset_version=18, verbose=False)
    assert not any(node.op_type == "TopK" for node in onnx.load(str(path)).graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(2)
    cases = [example] + [(torch.nn.functional.pad(s, (0, length - s.shape[-1])),
                          torch.nn.functional.pad(a, (0, length - a.shape[-1])), k)
                         for s, a, k in _selection_cases(3, 10)]
    cases.append((torch.round(torch.rand(2, 3, length, generator=g) * 8) / 8, example[1], torch.tensor([4095, 3840])))
    for scores, allowed, k in cases:
        keep, order = session.run(None, {"scores": scores.numpy(), "allowed": allowed.numpy(), "k": k.numpy()})
        expected = _sorted_top_k(scores, allowed, k)
        assert (keep == expected.numpy()).all()
        assert (order == mask_to_indices(expected.expand(2, 3, -1), length).numpy()).all()


@pytest.mark.parametrize("name", ["h2o", "snapkv", "lookm", "csp", "streaming_llm"])
@pytest.mark.parametrize("cap", [0.0, 0.25, 0.5, 1.0])
def test_recent_cap_agrees_with_naive(name, cap):
    # W = floor(0.5 * 45) = 22 recent keys by beta alone: above every capped share of C = 20
    logits, key_mod, query_mod = random_inputs(7, batch=2, heads=2, groups=2, length=50, window=22, n_pad=5)
    params = {**POLICY_PARAMS[name], "window_ratio": 0.5, "recent_cap": cap}
    kept = get_policy(name, **params).select(logits, key_mod, query_mod, 20)
    for b in range(2):
        for h in range(2):
            assert kept[b, h].tolist() == naive_select(name, logits[b, h], key_mod[b], query_mod[b], 20, head=h,
                                                       **params), (name, cap, b, h)


def test_recent_cap_leaves_room_to_select_at_budget_0_1():
    """At budget 0.1 the default recent window (beta x W = 0.1 L) is the whole budget, so every
    window policy keeps the same last C keys; capped at half of C, half is chosen by score."""
    length = 400
    logits, key_mod, query_mod = random_inputs(3, heads=2, groups=2, length=length, window=40)
    n_keep = keep_count(0.1, length)                                     # 40 = W
    recent_only = list(range(length - n_keep, length))
    for name in ("csp", "snapkv", "h2o"):
        policy = get_policy(name)
        assert policy.recent_window(length, n_keep) == n_keep
        assert get_policy(name).select(logits, key_mod, query_mod, n_keep)[0, 0].tolist() == recent_only
        capped = get_policy(name, recent_cap=0.5)
        assert capped.recent_window(length, n_keep) == 20
        assert int(capped.recent_window(torch.tensor([length]), torch.tensor([n_keep]))[0]) == 20  # the graphs' form
        kept = capped.select(logits, key_mod, query_mod, n_keep)[0, 0].tolist()
        assert kept[-20:] == recent_only[-20:] and all(k < length - 20 for k in kept[:20])
    csp = get_policy("csp", recent_cap=0.5).select(logits, key_mod, query_mod, n_keep)
    snap = get_policy("snapkv", recent_cap=0.5).select(logits, key_mod, query_mod, n_keep)
    assert not torch.equal(csp, snap)                                    # the selections now differ


@pytest.mark.parametrize("cap", [-0.1, 1.5, True, "half"])
def test_recent_cap_out_of_range_is_refused_by_name(cap):
    with pytest.raises(ValueError, match="recent_cap must be a share of the budget"):
        get_policy("csp", recent_cap=cap)


@pytest.mark.parametrize("slope", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("n_keep,n_layers", [(7, 2), (40, 5), (550, 30), (3, 30)])
def test_layer_budgets_keep_the_same_total_with_more_in_early_layers(slope, n_keep, n_layers):
    policy = get_policy("snapkv", pyramid=slope)
    counts = policy.layer_keep_counts(n_keep, n_layers)
    assert len(counts) == n_layers and min(counts) >= 1
    # falling from layer to layer, up to the one entry the cumulative rounding may move
    assert all(later <= earlier + 1 for earlier, later in zip(counts, counts[1:]))
    assert counts[0] >= counts[-1]
    if slope == 0.0:
        assert counts == [n_keep] * n_layers
    if (1 - slope) * n_keep >= 1:                            # nothing clamped up to one entry
        assert sum(counts) == n_layers * n_keep
        assert abs(counts[0] - (1 + slope) * n_keep) <= 1 + slope * n_keep / max(n_layers - 1, 1)
    graph_form = policy.layer_keep_counts(torch.tensor([n_keep]), n_layers)          # [layers, 1]
    assert graph_form[:, 0].tolist() == counts


def test_layer_budgets_are_clamped_to_the_prompt_and_validated():
    policy = get_policy("csp", pyramid=0.5)
    assert policy.layer_keep_counts(100, 4) == [150, 116, 84, 50]                 # 1.5 C down to 0.5 C
    assert policy.layer_keep_counts(100, 4, n_valid=120) == [120, 116, 84, 50]   # never past the prompt
    clamped = policy.layer_keep_counts(torch.tensor([100]), 4, n_valid=torch.tensor([120]))
    assert clamped[:, 0].tolist() == [120, 116, 84, 50]
    for slope in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match=r"pyramid \(the layer budgets' slope\) must be in \[0, 1\)"):
            get_policy("csp", pyramid=slope)
