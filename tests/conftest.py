"""Shared fixtures: small LLaVA models and their exports, built once per test session."""

import pytest

from cspkv.export.exporter import ExportPlan, export_model
from cspkv.models.tiny import tiny_llava

ARCHS = {"gqa": dict(n_heads=4, n_kv_heads=2, seed=3), "mha": dict(n_heads=4, n_kv_heads=4, seed=4)}
P_MAX, DECODE_SLOTS = 256, 12


@pytest.fixture(scope="session")
def models():
    return {name: tiny_llava(**kw) for name, kw in ARCHS.items()}


@pytest.fixture(scope="session")
def exports(tmp_path_factory, models):
    """exports(arch, policy, budget, decode_n=0.0) -> folder, exported once per session."""
    cache = {}

    def get(arch, policy, budget, decode_n=0.0):
        key = (arch, policy, budget, decode_n)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-{policy}-{budget}-{decode_n}")
            plan = ExportPlan.make(models[arch], policy, {}, budget, P_MAX, DECODE_SLOTS, decode_n)
            export_model(models[arch], folder, plan, f"tiny-{arch}", force=True)
            cache[key] = folder
        return cache[key]

    return get
