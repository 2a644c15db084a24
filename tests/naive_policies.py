"""Independent, loop-based implementations of every policy for one (batch, KV head).

Written from csp-spec.md without reusing cspkv.pruning, so that agreement means something: plain
Python loops, math.exp, and sorted() with the (score descending, index ascending) tie rule.
"""

import math

import torch


def naive_n_softmax(row, n):
    finite = [x for x in row if x != float("-inf")]
    if not finite:
        return [0.0] * len(row)
    # in log space: log(n + sum exp x) = logaddexp(log n, logsumexp(x)), no overflow at +-1e4
    m = max(finite)
    log_denom = m + math.log(sum(math.exp(x - m) for x in finite))
    if n > 0:
        a, b = log_denom, math.log(n)
        log_denom = max(a, b) + math.log1p(math.exp(-abs(a - b)))
    return [math.exp(x - log_denom) if x != float("-inf") else 0.0 for x in row]


def windows(n_valid, window_ratio=0.1, recent_ratio=1.0, n_keep=None, recent_cap=None):
    w = max(1, math.floor(window_ratio * n_valid))
    r = math.floor(recent_ratio * w)
    if n_keep is not None:
        r = min(r, n_keep if recent_cap is None else math.floor(recent_cap * n_keep))
    return w, r


def top(scores, allowed, k):
    return sorted(allowed, key=lambda j: (-scores[j], j))[:max(k, 0)]


def column_sums(logits, query_mod, n, length):
    """Sum over G heads and valid window rows of (n-)softmax probabilities, per key."""
    total = [0.0] * length
    for head_rows in logits:                     # G
        for w, row in enumerate(head_rows):      # W
            if query_mod[w] < 0:
                continue
            probs = naive_n_softmax(row.tolist(), n)
            for j in range(length):
                total[j] += probs[j]
    return total


def naive_select(name, logits, key_mod, query_mod, n_keep, **p):
    """logits: [G, W, L] for one KV head; key_mod [L]; query_mod [W] (lists or tensors)."""
    key_mod = [int(x) for x in key_mod]
    query_mod = [int(x) for x in query_mod]
    length = len(key_mod)
    n_valid = sum(1 for m in key_mod if m >= 0)
    _, r = windows(n_valid, p.get("window_ratio", 0.1), p.get("recent_ratio", 1.0), n_keep, p.get("recent_cap"))
    recent = list(range(n_valid - r, n_valid))
    cand = list(range(0, n_valid - r))
    k = n_keep - r
    if name == "full":
        return list(range(n_valid))
    if name == "random":
        seed, mod = p.get("seed", 0), 16_777_213
        head = p["head"]
        pri = []
        for j in range(length):
            x = (j * 2654435761 + head * 40503 + seed * 7919 + 12345) % mod
            x = (x * x + 1013904223) % mod
            pri.append((x * x + 374761393) % mod)
        return sorted(recent + top(pri, cand, k))
    if name == "streaming_llm":
        sinks = [j for j in cand if j < p.get("n_sink", 4)][:k]
        rest = sorted([j for j in cand if j not in sinks], reverse=True)[: k - len(sinks)]
        return sorted(recent + sinks + rest)
    n = p.get("n", 1.0) if name == "csp" else 0.0
    sums = column_sums(logits, query_mod, n, length)
    if name in ("h2o",):
        return sorted(recent + top(sums, cand, k))
    if name == "snapkv":
        ks = p.get("kernel_size", 5)
        base = [sums[j] if j in cand else 0.0 for j in range(length)]
        pooled = [max(base[max(0, j - ks // 2): j + ks // 2 + 1]) for j in range(length)]
        return sorted(recent + top(pooled, cand, k))
    if name == "lookm":
        text = [j for j in cand if key_mod[j] == 0]
        chosen = top(sums, text, k)
        chosen += top(sums, [j for j in cand if j not in chosen], k - len(chosen))
        return sorted(recent + chosen)
    if name == "csp":
        self_s, cross_s = [0.0] * length, [0.0] * length
        for head_rows in logits:
            for w, row in enumerate(head_rows):
                if query_mod[w] < 0:
                    continue
                probs = naive_n_softmax(row.tolist(), n)
                for j in range(length):
                    if key_mod[j] == query_mod[w]:
                        self_s[j] += probs[j]
                    else:
                        cross_s[j] += probs[j]
        k_c = math.floor(p.get("cross_ratio", 0.5) * k)
        by_cross = top(cross_s, cand, k_c)
        if p.get("variant", "distinct") == "paper":
            return sorted(recent + by_cross + top(self_s, cand, k - k_c))
        return sorted(recent + by_cross + top(self_s, [j for j in cand if j not in by_cross], k - k_c))
    raise ValueError(name)


def random_inputs(seed, batch=1, heads=2, groups=2, length=50, window=5, n_pad=0, n_pad_rows=0,
                  ties=False):
    """Random window logits with a causal mask, right padding, and modality ids."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, groups, window, length, generator=g) * 3
    if ties:
        logits = torch.round(logits)  # many equal scores: exercises the tie rule
    n_valid = length - n_pad
    key_mod = torch.randint(0, 2, (batch, length), generator=g)
    key_mod[:, n_valid:] = -1
    # window rows are the last `window` valid queries; the first n_pad_rows are marked padding
    q_pos = torch.arange(n_valid - window, n_valid)
    query_mod = key_mod[:, n_valid - window:n_valid].clone()
    query_mod[:, :n_pad_rows] = -1
    future = torch.arange(length)[None, :] > q_pos[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    return logits, key_mod, query_mod
