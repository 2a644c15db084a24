"""Shared fixtures: small LLaVA models and their exports, built once per test session."""

import contextlib
import re

import pytest

from cspkv.export.exporter import ExportPlan, export_model
from cspkv.pruning.spec import parse_policy
from cspkv.models import static_llama
from cspkv.models.tiny import tiny_llava

ARCHS = {"gqa": dict(n_heads=4, n_kv_heads=2, seed=3), "mha": dict(n_heads=4, n_kv_heads=4, seed=4)}
P_MAX, DECODE_SLOTS = 256, 12
# Small prefill blocks so that P_MAX spans many attention blocks and several chunks, the last one
# shorter (256 = 3 x 80 + 16), and the window scores span more than one block.
TEST_BLOCK, TEST_CHUNK = 16, 80


@contextlib.contextmanager
def prefill_blocks(block: int = TEST_BLOCK, chunk: int = TEST_CHUNK):
    saved = static_llama.ATTENTION_BLOCK, static_llama.PREFILL_CHUNK
    static_llama.ATTENTION_BLOCK, static_llama.PREFILL_CHUNK = block, chunk
    try:
        yield
    finally:
        static_llama.ATTENTION_BLOCK, static_llama.PREFILL_CHUNK = saved


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
            spec = parse_policy(policy)                  # a name, or a name with settings
            folder = tmp_path_factory.mktemp(re.sub(r"[^\w.-]", "_", f"{arch}-{policy}-{budget}-{decode_n}"))
            plan = ExportPlan.make(models[arch], spec.name, spec.policy.params(), budget, P_MAX, DECODE_SLOTS, decode_n)
            with prefill_blocks():
                export_model(models[arch], folder, plan, f"tiny-{arch}", force=True)
            cache[key] = folder
        return cache[key]

    return get
