"""CSP's modality-aware top-k outside PyTorch (cspkv/engines/plugin): the C reference equals the
PyTorch policy (CrossSelfPruning.keep_mask + mask_to_indices) on random inputs, bad arguments give
error codes, the CUDA source compiles for sm_87 and sm_90, and (with a GPU) the kernel equals the C
reference."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cspkv.engines import modality_topk as mt

RATIOS = (0.0, 0.1, 0.5, 0.9, 1.0)


def random_case(rng, batch, heads, length, ties="none", full_budget=False, special=False):
    """One random input set: scores, padded modality, budgets (0 <= R <= C <= n_valid) and c_max."""
    shape = (batch, heads, length)
    if ties == "heavy":      # a handful of distinct values: most comparisons are ties
        self_s = rng.integers(0, 3, shape).astype(np.float32)
        cross_s = rng.integers(0, 3, shape).astype(np.float32)
    elif ties == "rounded":  # probabilities rounded to a coarse grid
        self_s = np.round(rng.random(shape) * 8).astype(np.float32) / 8
        cross_s = np.round(rng.random(shape) * 8).astype(np.float32) / 8
    else:
        self_s = rng.random(shape, dtype=np.float32)
        cross_s = rng.random(shape, dtype=np.float32)
    if special:  # -0.0 vs 0.0, infinities and NaN, placed at random
        values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype=np.float32)
        for scores in (self_s, cross_s):
            hit = rng.random(shape) < 0.3
            scores[hit] = rng.choice(values, size=int(hit.sum()))
    n_valid = rng.integers(1, length + 1, batch)
    if rng.random() < 0.5:
        n_valid[rng.integers(batch)] = length  # a row without padding
    modality = np.where(rng.random((batch, length)) < 0.6, 1, 0).astype(np.int32)
    modality[np.arange(length)[None, :] >= n_valid[:, None]] = -1
    n_keep = n_valid.copy() if full_budget else np.array([rng.integers(0, v + 1) for v in n_valid])
    n_recent = np.array([rng.integers(0, c + 1) if rng.random() < 0.8 else 0 for c in n_keep])
    c_max = int(rng.integers(1, length + 1)) if rng.random() < 0.3 else max(1, int(n_keep.max()))
    return self_s, cross_s, modality, n_keep.astype(np.int32), n_recent.astype(np.int32), c_max


def assert_same(case, rho, actual, expected):
    if not np.array_equal(actual, expected):
        bad = np.argwhere(actual != expected)[0]
        raise AssertionError(f"rho={rho} differ first at {tuple(bad)}: n_keep={case[3]}, "
                             f"n_recent={case[4]}, c_max={case[5]}\n{actual[tuple(bad[:2])]}\n"
                             f"{expected[tuple(bad[:2])]}")


def check_against_policy(case, rho):
    ref = mt.modality_topk_ref(*case[:5], cross_ratio=rho, c_max=case[5])
    expected = mt.modality_topk_torch(*case[:5], cross_ratio=rho, c_max=case[5]).numpy()
    assert ref.dtype == np.int64 and ref.shape == expected.shape
    assert_same(case, rho, ref, expected)
    return ref


# --- C reference vs the PyTorch policy ------------------------------------------------------------

@pytest.mark.parametrize("ties", ["none", "rounded", "heavy"])
def test_reference_equals_policy_random(ties):
    rng = np.random.default_rng({"none": 1, "rounded": 2, "heavy": 3}[ties])
    for trial in range(60):
        length = int(rng.choice([1, 2, 3, 5, 8, 17, 64, 130, 257]))
        case = random_case(rng, int(rng.integers(1, 4)), int(rng.integers(1, 5)), length, ties,
                           full_budget=trial % 5 == 0)
        for rho in RATIOS:
            check_against_policy(case, rho)


def test_reference_equals_policy_long_rows():
    rng = np.random.default_rng(4)
    for length, ties in ((1024, "rounded"), (4096, "none"), (4096, "heavy")):
        case = random_case(rng, 2, 2, length, ties)
        for rho in (0.1, 0.5):
            check_against_policy(case, rho)


def test_reference_equals_policy_non_finite_scores():
    """NaN ranks first, -0.0 ties +0.0, and a -inf candidate can lose its place to a lower position
    that is not allowed -- all exactly as the policy's stable sort does it."""
    rng = np.random.default_rng(5)
    for _ in range(40):
        case = random_case(rng, 2, 2, int(rng.choice([4, 9, 33])), "heavy", special=True)
        for rho in RATIOS:
            check_against_policy(case, rho)


def test_budget_covers_every_candidate():
    """C == n_valid: every valid key is kept whatever the split, then the padding in order."""
    rng = np.random.default_rng(6)
    for _ in range(20):
        case = random_case(rng, 2, 3, 40, "heavy", full_budget=True)
        for rho in RATIOS:
            ref = check_against_policy(case, rho)
            n_valid = (case[2] >= 0).sum(-1)
            for b in range(2):
                expected = np.arange(case[5])  # all valid positions, then padding, all ascending
                np.testing.assert_array_equal(ref[b], np.broadcast_to(expected, ref[b].shape))
                assert n_valid[b] == case[3][b]


def test_hand_checked_row():
    # L = 10, 8 valid; C = 5, R = 2 -> recent {6, 7}; K = 3, rho = 0.5 -> K_c = 1, K_s = 2.
    self_s = np.array([[[0.9, 0.1, 0.9, 0.5, 0.0, 0.9, 0.0, 0.0, 7.0, 7.0]]], np.float32)
    cross_s = np.array([[[0.0, 0.0, 0.0, 0.0, 0.8, 0.8, 0.0, 0.0, 9.0, 9.0]]], np.float32)
    modality = np.array([[0, 0, 1, 1, 1, 1, 0, 0, -1, -1]], np.int32)
    # by_cross: 4 (tie with 5, lower index wins); by_self among {0,1,2,3,5}: 0, 2 (tie with 5).
    for fn in (mt.modality_topk_ref, lambda *a, **k: mt.modality_topk_torch(*a, **k).numpy()):
        out = fn(self_s, cross_s, modality, 5, 2, cross_ratio=0.5, c_max=7)
        np.testing.assert_array_equal(out[0, 0], [0, 2, 4, 6, 7, 1, 3])


@pytest.mark.parametrize("rho,cross_k", [(0.9, 9), (0.7, 7), (0.3, 3), (0.1, 1)])
def test_cross_share_is_floored_in_double(rho, cross_k):
    """K = 10: K_c = floor(rho * 10) in double, so 0.9 -> 9 (float32 0.9 would give 8)."""
    cross_s = np.zeros((1, 1, 12), np.float32)
    cross_s[0, 0, :10] = np.arange(10, 0, -1)  # cross prefers 0, 1, 2, ... in that order
    self_s = np.zeros((1, 1, 12), np.float32)
    self_s[0, 0, 10:] = (4.0, 5.0)             # self prefers 11, 10, then 0, 1, ... (ties)
    modality = np.zeros((1, 12), np.int32)
    expected = sorted(set(range(cross_k)) | set([11, 10, *range(cross_k, 10)][:10 - cross_k]))
    for fn in (mt.modality_topk_ref, lambda *a, **k: mt.modality_topk_torch(*a, **k).numpy()):
        out = fn(self_s, cross_s, modality, 10, 0, cross_ratio=rho, c_max=10)
        np.testing.assert_array_equal(out[0, 0], expected)


def test_zero_recent_and_zero_budget():
    rng = np.random.default_rng(7)
    s, c, m, _, _, _ = random_case(rng, 1, 2, 12)
    for keep in (0, 1, int((m >= 0).sum())):
        for rho in RATIOS:
            check_against_policy((s, c, m, np.array([keep], np.int32), np.zeros(1, np.int32), 3), rho)


def test_float32_ratio_is_read_as_its_decimal():
    """The plugin's cross_ratio attribute is float32; widening 0.9f directly would floor 8.99... to 8."""
    assert np.floor(float(np.float32(0.9)) * 10) == 8
    for rho in RATIOS + (0.25, 0.3, 0.7, 1 / 3, 0.123456):
        assert mt.ratio_from_float32(np.float32(rho)) == float(str(np.float32(rho)))
    assert mt.ratio_from_float32(np.float32(0.9)) == 0.9


# --- bad arguments --------------------------------------------------------------------------------

def _raw_call(s, c, m, keep, recent, batch, heads, length, c_max, rho, out):
    lib = mt.load_reference_library()
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    return lib.cspkv_modality_topk_ref(ptr(s), ptr(c), ptr(m), ptr(keep), ptr(recent),
                                       batch, heads, length, c_max, rho, ptr(out))


def test_bad_arguments_give_error_codes_and_leave_output_alone():
    B, H, L = 2, 2, 6
    s = np.zeros((B, H, L), np.float32)
    m = np.zeros((B, L), np.int32)
    keep = np.full(B, 3, np.int32)
    recent = np.ones(B, np.int32)
    out = np.full((B, H, 3), 77, np.int64)
    good = (s, s, m, keep, recent, B, H, L, 3, 0.5, out)
    code = {name: i for i, name in enumerate(mt.STATUS_NAMES)}

    def call(**changes):
        args = dict(zip(["s", "c", "m", "keep", "recent", "batch", "heads", "length", "c_max",
                         "rho", "out"], good))
        args.update(changes)
        return _raw_call(**args)

    for name in ("s", "c", "m", "keep", "recent", "out"):
        assert call(**{name: None}) == code["CSPKV_TOPK_ERR_NULL_POINTER"], name
    for change in ({"batch": 0}, {"heads": 0}, {"length": 0}, {"c_max": 0}, {"c_max": L + 1},
                   {"heads": -1}):
        assert call(**change) == code["CSPKV_TOPK_ERR_SHAPE"], change
    for rho in (-0.01, 1.01, float("nan"), float("inf")):
        assert call(rho=rho) == code["CSPKV_TOPK_ERR_RATIO"], rho
    for row in ([0, 0, 2, 0, 0, 0], [0, -2, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0], [0, 0, -1, 1, -1, -1]):
        bad = m.copy()
        bad[1] = row
        assert call(m=bad) == code["CSPKV_TOPK_ERR_MODALITY"], row
    padded = m.copy()
    padded[0, 4:] = -1  # 4 valid keys in row 0
    for k, r in ((5, 1), (3, 4), (3, -1), (-1, 0)):
        assert call(m=padded, keep=np.array([k, 3], np.int32),
                    recent=np.array([r, 1], np.int32)) == code["CSPKV_TOPK_ERR_BUDGET"], (k, r)
    assert (out == 77).all()
    assert call() == 0 and not (out == 77).any()
    assert "n_recent <= n_keep" in mt.status_message(code["CSPKV_TOPK_ERR_BUDGET"])


def test_scalar_budgets_apply_to_every_row():
    rng = np.random.default_rng(8)
    s, c, _, _, _, _ = random_case(rng, 3, 2, 16)
    m = np.zeros((3, 16), np.int32)
    out = mt.modality_topk_ref(s, c, m, 5, 2, cross_ratio=0.5)
    assert out.shape == (3, 2, 5)
    np.testing.assert_array_equal(out, mt.modality_topk_ref(s, c, m, [5] * 3, [2] * 3, cross_ratio=0.5))


def test_binding_raises_named_errors():
    s = np.zeros((1, 1, 4), np.float32)
    m = np.array([[0, 1, -1, -1]], np.int32)
    with pytest.raises(mt.ModalityTopKError, match="CSPKV_TOPK_ERR_BUDGET"):
        mt.modality_topk_ref(s, s, m, 3, 0, cross_ratio=0.5, c_max=3)
    with pytest.raises(mt.ModalityTopKError, match="CSPKV_TOPK_ERR_SHAPE"):
        mt.modality_topk_ref(s, s, m, 2, 0, cross_ratio=0.5, c_max=5)
    with pytest.raises(ValueError, match="key_modality"):
        mt.modality_topk_ref(s, s, m[:, :3], 2, 0, cross_ratio=0.5)
    with pytest.raises(ValueError, match="int32"):
        mt.modality_topk_ref(s, s, m, 2**40, 0, cross_ratio=0.5, c_max=2)


# --- CUDA ---------------------------------------------------------------------------------------

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, /usr/local/cuda/bin): cannot build-check the CUDA kernel")
def test_cuda_source_compiles_for_orin_and_hopper(tmp_path):
    proc = subprocess.run(["make", "-C", str(mt.PLUGIN_DIR), f"B={tmp_path}", f"NVCC={NVCC}", "cuda-check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    for arch in ("sm87", "sm90"):
        assert (tmp_path / f"modality_topk_{arch}.o").stat().st_size > 0


def test_reference_builds_without_warnings(tmp_path):
    proc = subprocess.run(["make", "-C", str(mt.PLUGIN_DIR), f"B={tmp_path}", "OPT=-O2 -Werror", "ref"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lib = ctypes.CDLL(str(tmp_path / "libcspkv_modality_topk_ref.so"))
    assert lib.cspkv_modality_topk_ref  # exported despite -fvisibility=hidden


def _gpu_skip_reason():
    if NVCC is None:
        return "nvcc not found: cannot build the CUDA kernel library"
    if not torch.cuda.is_available() and not os.path.exists("/dev/nvidia0"):
        return "no NVIDIA GPU here (torch.cuda.is_available() is False and there is no /dev/nvidia0)"
    return None


@pytest.fixture(scope="module")
def cuda_ready():
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        count = mt.cuda_device_count()
    except mt.LibraryNotFoundError as exc:
        pytest.fail(f"the CUDA kernel library did not build: {exc}")
    if count < 1:
        pytest.skip("the CUDA runtime sees no device")


def test_cuda_kernel_equals_reference(cuda_ready):
    rng = np.random.default_rng(11)
    cases = []
    for trial in range(60):
        length = int(rng.choice([1, 2, 3, 31, 64, 100, 257, 1000]))
        ties = ("none", "rounded", "heavy")[trial % 3]
        cases.append(random_case(rng, int(rng.integers(1, 4)), int(rng.integers(1, 5)), length, ties,
                                 full_budget=trial % 7 == 0, special=trial % 4 == 3))
    for length in (1024, 2048, 4096, 5000, 8192):  # 5000, 8192: past 48 KiB of shared memory
        cases.append(random_case(rng, 2, 4, length, "rounded"))
    for case in cases:
        for rho in RATIOS:
            ref = mt.modality_topk_ref(*case[:5], cross_ratio=rho, c_max=case[5])
            gpu, _ = mt.modality_topk_cuda(*case[:5], cross_ratio=rho, c_max=case[5])
            assert_same(case, rho, gpu, ref)


def test_cuda_kernel_reports_bad_rows(cuda_ready):
    s = np.zeros((2, 2, 6), np.float32)
    m = np.zeros((2, 6), np.int32)
    with pytest.raises(mt.ModalityTopKError, match="CSPKV_TOPK_ERR_BUDGET"):
        mt.modality_topk_cuda(s, s, m, [3, 7], [1, 1], cross_ratio=0.5, c_max=3)
    m[1, 0] = -1
    with pytest.raises(mt.ModalityTopKError, match="CSPKV_TOPK_ERR_MODALITY"):
        mt.modality_topk_cuda(s, s, m, [3, 3], [1, 1], cross_ratio=0.5, c_max=3)
    with pytest.raises(mt.ModalityTopKError, match="CSPKV_TOPK_ERR_RATIO"):
        mt.modality_topk_cuda(s, s, np.zeros((2, 6), np.int32), 3, 1, cross_ratio=1.5, c_max=3)
