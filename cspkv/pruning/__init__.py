"""KV-cache pruning policies: CSP and the baselines, one small module each over a shared base.

    policy = cspkv.pruning.get_policy("csp", cross_ratio=0.5)
    kept = policy.select(window_logits, key_modality, query_modality, n_keep)
"""

from cspkv.pruning.base import (
    IMAGE,
    PAD,
    TEXT,
    PruningPolicy,
    check_budget,
    keep_count,
    n_softmax,
)
from cspkv.pruning.csp import CrossSelfPruning
from cspkv.pruning.full import FullCache
from cspkv.pruning.h2o import H2O
from cspkv.pruning.lookm import LookM
from cspkv.pruning.random import RandomPolicy
from cspkv.pruning.snapkv import SnapKV
from cspkv.pruning.streaming_llm import StreamingLLM

POLICIES = {cls.name: cls for cls in (FullCache, RandomPolicy, StreamingLLM, H2O, SnapKV, LookM, CrossSelfPruning)}


def available_policies() -> list[str]:
    return list(POLICIES)


def get_policy(name: str, **params) -> PruningPolicy:
    """A policy by name with its parameters; unknown names and parameters are rejected by name."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameter for policy {name!r}: {exc}") from None


__all__ = [
    "TEXT", "IMAGE", "PAD", "PruningPolicy", "POLICIES", "available_policies", "get_policy",
    "n_softmax", "keep_count", "check_budget",
]
