"""libcspkv through its ctypes binding (KVBuffer), against the Python reference (SlotTable).

Scripted sequences, hypothesis-generated operation sequences (metadata, bias, chosen slots and K/V
contents must match the reference exactly), bad input (clear error, buffer still usable), and the C
test suite under ASan/UBSan, valgrind and the fuzz driver via make.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cspkv.runtime.kv_buffer import (KVBuffer, KVBufferError, LibraryNotFoundError, NonFiniteError,
                                     NoEvictableSlotError, load_library)
from cspkv.runtime.slot_reference import RESCORE, RING, SlotTable, SlotTableError

CSRC = Path(__file__).resolve().parents[1] / "cspkv" / "runtime" / "csrc"


class Twin:
    """A KVBuffer and a SlotTable driven in lockstep, plus the K/V every valid slot should hold."""

    def __init__(self, L, H, S, D, dtype=np.float32, eviction=RING, n_recent=0, n_sink=0,
                 null_logit=None, seed=0):
        self.buf = KVBuffer(L, H, S, D, dtype, eviction, n_recent, n_sink, null_logit)
        self.ref = SlotTable(L, H, S, eviction, n_recent, n_sink, null_logit)
        self.expected_kv = np.zeros(self.buf.kv_shape, dtype)
        self.rng = np.random.default_rng(seed)
        self.L, self.H, self.S, self.D, self.dtype = L, H, S, D, np.dtype(dtype)

    def random_kv(self, shape):
        return self.rng.standard_normal(shape).astype(self.dtype)

    def check(self):
        buf, ref = self.buf, self.ref
        np.testing.assert_array_equal(buf.valid, ref.valid)
        np.testing.assert_array_equal(buf.position, ref.position)
        np.testing.assert_array_equal(buf.modality, ref.modality)
        assert buf.score.tobytes() == ref.score.tobytes()  # bit-exact float32 sums
        np.testing.assert_array_equal(buf.attention_bias(), ref.attention_bias())
        np.testing.assert_array_equal(buf.n_valid(), ref.n_valid())
        assert buf.prompt_len == ref.prompt_len
        # K/V: every valid slot holds what was written for it; the null slot stays zero.
        valid = np.broadcast_to(ref.valid[:, None, :, :, None], buf.kv_shape)
        np.testing.assert_array_equal(buf.kv[valid], self.expected_kv[valid])
        if ref.null_logit is not None:
            assert not buf.kv[:, :, :, -1, :].any()

    def prefill(self, c, prompt_len, n_valid=None, with_scores=True):
        L, H = self.L, self.H
        positions = np.stack([self.rng.permutation(prompt_len)[:c] for _ in range(L * H)]).reshape(L, H, c)
        modality = self.rng.integers(0, 3, (L, H, c)).astype(np.int8)
        if n_valid is None:
            n_valid = self.rng.integers(0, c + 1, (L, H))
        scores = self.rng.random((L, H, c), dtype=np.float32) * 4 if with_scores else None
        kv = self.random_kv((L, 2, H, c, self.D))
        self.buf.load_prefill(kv, positions, modality, n_valid, prompt_len, scores)
        self.ref.load_prefill(positions, modality, n_valid, prompt_len, scores)
        self.expected_kv[:, :, :, :c, :] = kv

    def step(self, position, modality=0):
        """choose + write on both; returns the slots, or None when both found nothing to evict."""
        saved = [a.copy() for a in (self.ref.valid, self.ref.position, self.ref.modality, self.ref.score)]
        try:
            ref_slots = self.ref.choose_write_slots(position)
        except SlotTableError:
            with pytest.raises(NoEvictableSlotError):
                self.buf.choose_write_slots(position)
            # The reference invalidates the heads before the failing one; the library changes
            # nothing. Roll the reference back to compare the rest of the sequence.
            self.ref.valid, self.ref.position, self.ref.modality, self.ref.score = saved
            return None
        slots = self.buf.choose_write_slots(position)
        np.testing.assert_array_equal(slots, ref_slots)
        np.testing.assert_array_equal(self.buf.attention_bias(), self.ref.attention_bias())
        delta = self.random_kv((self.L, 2, 1, self.H, 1, self.D))
        self.buf.write_token(slots, delta, position, modality)
        self.ref.commit_token(ref_slots, position, modality)
        l_idx, h_idx = np.indices(slots.shape)
        self.expected_kv[l_idx, :, h_idx, slots, :] = delta[:, :, 0, :, 0, :].transpose(0, 2, 1, 3)
        return slots

    def accumulate(self, mass=None):
        if mass is None:
            mass = self.rng.random(self.ref.shape, dtype=np.float32)
            mass[self.rng.random(self.ref.shape) < 0.2] = 0.0
        self.buf.accumulate(mass)
        self.ref.accumulate(mass)

    def reset(self):
        self.buf.reset()
        self.ref.reset()


# ---- scripted sequences ----

def test_ring_overflow_evicts_oldest_generated():
    t = Twin(1, 2, 4, 3, eviction=RING)
    t.prefill(2, 10, n_valid=np.array([[2, 1]]))
    expected = [[2, 1], [3, 2], [2, 3], [3, 1], [2, 2], [3, 3]]  # worked out by hand
    for i, want in enumerate(expected):
        slots = t.step(10 + i)
        np.testing.assert_array_equal(slots[0], want)
        t.check()
    assert (t.buf.position[0, :, :] < 10).sum() == 3  # the prompt entries survive


def test_ring_without_decode_slots_raises_and_changes_nothing():
    t = Twin(1, 2, 3, 2, eviction=RING)
    t.prefill(3, 3, n_valid=np.array([[2, 3]]))
    before = t.buf.position
    with pytest.raises(NoEvictableSlotError, match="no free slot") as err:
        t.buf.choose_write_slots(3)
    assert isinstance(err.value, SlotTableError)  # callers of the reference catch it unchanged
    np.testing.assert_array_equal(t.buf.position, before)
    assert t.step(3) is None
    t.check()


def test_rescore_protects_recent_and_sink_tokens():
    t = Twin(1, 1, 4, 2, eviction=RESCORE, n_recent=1, n_sink=1)
    positions = np.array([[[0, 1, 2]]])
    kv = t.random_kv((1, 2, 1, 3, 2))
    scores = np.array([[[5.0, 1.0, 3.0]]], np.float32)
    t.buf.load_prefill(kv, positions, np.zeros((1, 1, 3), np.int8), [[3]], 3, scores)
    t.ref.load_prefill(positions, np.zeros((1, 1, 3), np.int8), [[3]], 3, scores)
    t.expected_kv[:, :, :, :3] = kv
    assert t.step(3)[0, 0] == 3
    t.accumulate(np.full((1, 1, 4), 0.5, np.float32))
    assert t.step(4)[0, 0] == 1  # slot 0 is a sink, slot 3 (position 3) is recent
    assert t.step(5)[0, 0] == 3
    t.accumulate(np.array([[[0.0, 3.5, 0.0, 0.0]]], np.float32))
    assert t.step(6)[0, 0] == 1  # a tie (3.5) goes to the lower slot
    t.check()
    t2 = Twin(1, 1, 2, 1, eviction=RESCORE, n_recent=10)
    t2.step(0), t2.step(1)
    assert t2.step(2) is None  # everything is recent


def test_null_slot_bias_and_zero_kv():
    logit = math.log(2.0)
    t = Twin(2, 2, 3, 4, dtype=np.float16, null_logit=logit)
    np.testing.assert_array_equal(t.buf.attention_bias()[..., -1], np.float32(logit))
    for p in range(7):
        assert (t.step(p) < 2).all()
        t.check()
    with pytest.raises(KVBufferError, match="prompt entries") as err:
        t.prefill(3, 3)
    assert err.value.status_name == "CSPKV_ERR_CAPACITY"
    t.check()


def test_reset_clears_everything_but_keeps_the_buffer():
    t = Twin(2, 1, 4, 2, eviction=RESCORE, null_logit=0.0, seed=3)
    t.prefill(2, 6)
    t.step(6), t.accumulate()
    t.buf.kv[:, :, :, -1, :] = 1.0  # scribble on the null slot through the raw view
    t.reset()
    assert not t.buf.valid.any() and t.buf.prompt_len == 0
    t.check()  # includes: the null slot is zero again
    t.step(0)
    t.check()


def test_kv_view_is_zero_copy_and_outlives_close():
    buf = KVBuffer(2, 2, 3, 4, np.float16)
    view = buf.kv
    assert view.ctypes.data == buf.kv_ptr and view.nbytes == buf.nbytes == 2 * 2 * 2 * 3 * 4 * 2
    assert view.flags.c_contiguous and view.flags.writeable
    slots = buf.choose_write_slots(0)
    delta = np.arange(2 * 2 * 2 * 4, dtype=np.float16).reshape(2, 2, 1, 2, 1, 4)
    buf.write_token(slots, delta, 0)
    np.testing.assert_array_equal(view[:, :, :, 0, :], delta[:, :, 0, :, 0, :])  # seen without a copy
    buf.close()
    with pytest.raises(ValueError, match="closed"):
        buf.reset()
    np.testing.assert_array_equal(view[1, 1, 1, 0], delta[1, 1, 0, 1, 0])  # memory still alive


# ---- bad input: a clear error naming the argument, and the buffer still usable ----

L_, H_, S_, D_ = 2, 2, 4, 3


def _bad_calls():
    f32 = np.float32
    good_delta = np.zeros((L_, 2, 1, H_, 1, D_), f32)
    pos, mod = np.zeros((L_, H_, 1), np.int64), np.zeros((L_, H_, 1), np.int8)
    return {
        "kv dtype": (lambda b: b.load_prefill(np.zeros((L_, 2, H_, 1, D_)), pos, mod, [[1, 1]] * 2, 1),
                     TypeError, "kv must have the buffer's dtype float32"),
        "kv shape": (lambda b: b.load_prefill(np.zeros((L_, 2, H_, 2, D_), f32), pos, mod, [[1, 1]] * 2, 1),
                     ValueError, r"kv must have shape \(2, 2, 2, 1, 3\)"),
        "positions dtype": (lambda b: b.load_prefill(np.zeros((L_, 2, H_, 1, D_), f32), pos.astype(float),
                                                     mod, [[1, 1]] * 2, 1),
                            TypeError, "positions must be an integer array"),
        "n_valid shape": (lambda b: b.load_prefill(np.zeros((L_, 2, H_, 1, D_), f32), pos, mod, [1, 1], 1),
                          ValueError, r"n_valid must have shape \(2, 2\)"),
        "n_valid > C": (lambda b: b.load_prefill(np.zeros((L_, 2, H_, 1, D_), f32), pos, mod, [[2, 1]] * 2, 1),
                        KVBufferError, r"n_valid\[0, 0\] = 2 is outside \[0, c = 1\]"),
        "C too large": (lambda b: b.load_prefill(np.zeros((L_, 2, H_, 5, D_), f32), np.zeros((L_, H_, 5), int),
                                                 np.zeros((L_, H_, 5), np.int8), [[0, 0]] * 2, 5),
                        KVBufferError, r"more prompt entries than usable slots: c = 5 entries per head, but only 4 usable "
                                       r"slots \(C=5, usable slots=4"),
        "prompt position": (lambda b: b.load_prefill(np.zeros((L_, 2, H_, 1, D_), f32), pos + 1, mod,
                                                     [[1, 1]] * 2, 1),
                            KVBufferError, r"positions\[0, 0, 0\] = 1 is outside \[0, prompt_len 1\)"),
        "kv nan": (lambda b: b.load_prefill(np.full((L_, 2, H_, 1, D_), np.nan, f32), pos, mod, [[1, 1]] * 2, 1),
                   NonFiniteError, "kv: non-finite value at layer 0, K, kv_head 0, entry 0, dim 0"),
        "kv inf": (
            lambda b: b.load_prefill(np.array([[[[[0, 0, 0]], [[0, 0, np.inf]]]] * 2] * 2, f32), pos, mod,
                                     [[1, 1], [1, 1]], 1),
            NonFiniteError, "kv: non-finite value at layer 0, K, kv_head 1, entry 0, dim 2"),
        "delta dtype": (lambda b: b.write_token(b.choose_write_slots(9), good_delta.astype(np.float16), 9),
                        TypeError, "kv_delta must have the buffer's dtype"),
        "delta shape": (lambda b: b.write_token(b.choose_write_slots(9), np.zeros((L_, 2, H_, D_), f32), 9),
                        ValueError, r"kv_delta must have shape \(2, 2, 1, 2, 1, 3\)"),
        "slots shape": (lambda b: b.write_token([0, 0], good_delta, 9), ValueError, "slots must have shape"),
        "slot out of range": (lambda b: b.write_token([[0, 4], [0, 0]], good_delta, 9),
                              KVBufferError, "slot index out of range"),
        "slot negative": (lambda b: b.write_token([[0, -1], [0, 0]], good_delta, 9),
                          KVBufferError, "slot index out of range"),
        "slot overflows int32": (lambda b: b.write_token([[0, 2**40], [0, 0]], good_delta, 9),
                                 ValueError, "slots values must fit in int32"),
        "write without choose": (lambda b: b.write_token([[0, 0], [0, 0]], good_delta, 9),
                                 KVBufferError, "call out of order"),
        "position negative": (lambda b: b.choose_write_slots(-1), ValueError, "position must be in"),
        "position float": (lambda b: b.choose_write_slots(1.5), TypeError, "position must be an integer"),
        "position duplicate": (lambda b: b.choose_write_slots(1), KVBufferError, "already held"),
        "position < prompt_len": (lambda b: b.choose_write_slots(0), KVBufferError,
                                  "position 0 is inside the prompt"),
        "delta nan": (lambda b: b.write_token(b.choose_write_slots(9), np.where(
            np.arange(good_delta.size).reshape(good_delta.shape) == 13, np.float32(np.nan), good_delta), 9),
                      NonFiniteError, r"non-finite value \(NaN or infinity\): kv_delta: non-finite value at layer 1, K, "
                                     r"kv_head 0, dim 1 \(slots="),
        "delta -inf fp": (lambda b: b.write_token(b.choose_write_slots(9), good_delta - np.inf, 9), ValueError,
                          "non-finite value"),
        "modality": (lambda b: b.write_token(b.choose_write_slots(9), good_delta, 9, modality=300),
                     ValueError, "modality must be in"),
        "mass shape": (lambda b: b.accumulate(np.zeros((L_, H_, S_ + 1))), ValueError, "mass must have shape"),
        "mass nan": (lambda b: b.accumulate(np.full((L_, H_, S_), np.nan)), NonFiniteError,
                     r"mass\[0, 0, 0\] is non-finite \(nan\)"),
        "mass dtype": (lambda b: b.accumulate(np.zeros((L_, H_, S_), complex)), TypeError, "mass must be a real"),
    }


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_gives_clear_error_and_buffer_stays_usable(case):
    call, exc, pattern = BAD_CALLS[case]
    t = Twin(L_, H_, S_, D_, eviction=RING, seed=1)
    t.prefill(1, 1, n_valid=np.ones((L_, H_), int))  # prompt position 0, prompt_len 1
    t.step(1)
    with pytest.raises(exc, match=pattern):
        call(t.buf)
    # Where the failing call chose first (choose_write_slots(9) took a free slot), the choice is
    # just pending; the next choose replaces it, so both sides continue alike.
    t.check()
    for p in range(10, 16):
        t.step(p)
        t.check()


def test_closed_or_missing_library_errors():
    with pytest.raises(LibraryNotFoundError, match=r"pip install -e \."):
        load_library("/nonexistent/libcspkv.so")
    env = dict(os.environ, CSPKV_LIBRARY="/nonexistent/libcspkv.so")
    code = "from cspkv.runtime.kv_buffer import KVBuffer; KVBuffer(1, 1, 2, 1)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "pip install -e ." in r.stderr
    with pytest.raises(ValueError, match="null slot needs n_slots >= 2"):
        KVBuffer(1, 1, 1, 1, null_logit=0.0)
    with pytest.raises(TypeError, match="dtype must be float32 or float16"):
        KVBuffer(1, 1, 2, 1, dtype=np.float64)


# ---- property test: random operation sequences ----

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_sequences_match_reference(data):
    null = data.draw(st.booleans(), "null slot")
    t = Twin(
        L=data.draw(st.integers(1, 3), "layers"),
        H=data.draw(st.integers(1, 3), "kv_heads"),
        S=data.draw(st.integers(2 if null else 1, 8), "slots"),
        D=data.draw(st.integers(1, 4), "head_dim"),
        dtype=data.draw(st.sampled_from([np.float32, np.float16]), "dtype"),
        eviction=data.draw(st.sampled_from([RING, RESCORE]), "eviction"),
        n_recent=data.draw(st.integers(0, 3), "n_recent"),
        n_sink=data.draw(st.integers(0, 3), "n_sink"),
        null_logit=data.draw(st.floats(-4, 4, width=32), "null_logit") if null else None,
        seed=data.draw(st.integers(0, 2**32 - 1), "seed"),
    )
    next_pos = 0
    # Drawn one by one (not as st.lists, whose average length is a handful): eviction needs long
    # runs of steps, and shrinking still removes operations.
    for _ in range(data.draw(st.integers(1, 60), "operations")):
        op = data.draw(st.sampled_from(["prefill", "step", "step", "step", "accumulate", "reset"]))
        if op == "prefill":
            c = data.draw(st.integers(0, t.buf.n_usable), "C")
            prompt_len = c + data.draw(st.integers(0, 4), "extra prompt")
            t.prefill(c, prompt_len, with_scores=data.draw(st.booleans(), "scores"))
            next_pos = prompt_len
        elif op == "step":
            t.step(next_pos, modality=int(t.rng.integers(0, 3)))
            next_pos += 1 + data.draw(st.integers(0, 2), "gap")
        elif op == "accumulate":
            t.accumulate()
        else:
            t.reset()
        t.check()


# ---- the C test suite: sanitizers, valgrind, fuzz, cross build ----

@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """A private build folder, so test runs never reuse (or race on) stale objects."""
    return tmp_path_factory.mktemp("cspkv_build")


MAKE_TARGETS = {  # target: tools it needs
    "asan": ["make", "cc"],
    "valgrind": ["make", "cc", "valgrind"],
    "fuzz": ["make", "cc"],
    "cross-aarch64": ["make", "aarch64-linux-gnu-gcc", "qemu-aarch64"],
}


@pytest.mark.parametrize("target", list(MAKE_TARGETS))
def test_c_suite(target, build_dir):
    missing = [tool for tool in MAKE_TARGETS[target] if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"`make {target}` needs {', '.join(missing)}, not installed")
    r = subprocess.run(["make", "-C", str(CSRC), target, f"B={build_dir}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = re.findall(r"^(\d+) passed, (\d+) failed$", r.stdout, re.MULTILINE)
    runs = 2 if target in ("valgrind", "cross-aarch64") else 1  # these run tests and fuzz
    assert len(summaries) == runs and all(int(n) > 0 and f == "0" for n, f in summaries), r.stdout
    if target == "valgrind":
        assert r.stderr.count("ERROR SUMMARY: 0 errors") == 2
