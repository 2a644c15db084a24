"""Python binding of libcspkv: the C-owned fixed-budget KV buffer of one sequence.

``KVBuffer`` mirrors :class:`cspkv.runtime.slot_reference.SlotTable` (same metadata, same choices)
and additionally owns the K/V memory, laid out ``[layers, 2, kv_heads, slots, head_dim]`` and exposed
as a zero-copy numpy view (``KVBuffer.kv``, or the raw address ``kv_ptr`` for onnxruntime IOBinding).
Where SlotTable has ``commit_token(slots, position, modality)``, KVBuffer has ``write_token(slots,
kv_delta, position, modality)``, which also copies the new token's K/V into the chosen slots.

Why ctypes rather than cffi: ctypes is in the standard library, so the binding adds no dependency and
no second build step, and the C API is small (about twenty functions taking scalars and flat
arrays), so the hand-written signatures below stay short. The library does not use the Python C API;
``pip install -e .`` builds it (see setup.py) as ``cspkv/runtime/_libcspkv*.so``.

Arguments are checked here first (shape, dtype, range; errors name the argument), then by the C
library, whose failures raise :class:`KVBufferError` with the C status message. Either way the buffer
is unchanged and stays usable.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
import operator
import os
from pathlib import Path

import numpy as np

from cspkv.runtime.slot_reference import EVICTIONS, RESCORE, RING, SlotTableError

ABI_VERSION = 1  # must equal CSPKV_ABI_VERSION in cspkv/runtime/include/cspkv.h

_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}  # cspkv_dtype
_EVICTIONS = {RING: 0, RESCORE: 1}  # cspkv_eviction
_STATUS_NAMES = (
    "CSPKV_OK", "CSPKV_ERR_NULL_POINTER", "CSPKV_ERR_INVALID_ARGUMENT", "CSPKV_ERR_SIZE_MISMATCH",
    "CSPKV_ERR_SLOT_OUT_OF_RANGE", "CSPKV_ERR_CAPACITY", "CSPKV_ERR_BAD_STATE",
    "CSPKV_ERR_NO_EVICTABLE", "CSPKV_ERR_DUPLICATE_POSITION", "CSPKV_ERR_OUT_OF_MEMORY",
    "CSPKV_ERR_COPY_FAILED", "CSPKV_ERR_ABI_MISMATCH", "CSPKV_ERR_NON_FINITE",
)
_NO_EVICTABLE = _STATUS_NAMES.index("CSPKV_ERR_NO_EVICTABLE")
_NON_FINITE = _STATUS_NAMES.index("CSPKV_ERR_NON_FINITE")
_INT32 = np.iinfo(np.int32)
_INT64 = np.iinfo(np.int64)


class KVBufferError(RuntimeError):
    """A libcspkv call failed; ``status`` is the C status code, ``status_name`` its enum name."""

    def __init__(self, function: str, status: int, message: str, detail: str = ""):
        self.function = function
        self.status = status
        self.detail = detail  # what the library found (cspkv_last_error), naming the argument
        self.status_name = _STATUS_NAMES[status] if 0 <= status < len(_STATUS_NAMES) else str(status)
        super().__init__(f"{function}: {message} [{self.status_name}]")


class NoEvictableSlotError(KVBufferError, SlotTableError):
    """No free slot and nothing the eviction may evict; also a SlotTableError, as in the reference."""


class NonFiniteError(KVBufferError, ValueError):
    """A NaN or infinity in K/V, a score or a mass: refused, the buffer unchanged. Also a
    ValueError, as other bad values are."""


class LibraryNotFoundError(ImportError):
    """libcspkv has not been built (or CSPKV_LIBRARY points nowhere)."""


class _Config(ctypes.Structure):
    _fields_ = [  # cspkv_config, field for field
        ("abi_version", ctypes.c_uint32),
        ("n_layers", ctypes.c_int32),
        ("n_kv_heads", ctypes.c_int32),
        ("n_slots", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("eviction", ctypes.c_int32),
        ("n_recent", ctypes.c_int32),
        ("n_sink", ctypes.c_int32),
        ("has_null_slot", ctypes.c_int32),
        ("null_logit", ctypes.c_float),
    ]


_P, _I, _SZ, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int64

# cspkv_allocator's hooks (cspkv.h): where the K/V memory lives (e.g. cudaMalloc'd device memory).
ALLOC_FN = ctypes.CFUNCTYPE(_P, _P, _SZ)
FREE_FN = ctypes.CFUNCTYPE(None, _P, _P, _SZ)
COPY_FN = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, _P, _SZ, ctypes.c_int)


class Allocator(ctypes.Structure):
    """cspkv_allocator, field for field: alloc/free/copy hooks and their user pointer. The Python
    callables behind the hooks must outlive the buffer (KVBuffer keeps the structure)."""

    _fields_ = [("alloc", ALLOC_FN), ("free", FREE_FN), ("copy", COPY_FN), ("user", _P)]
_SIGNATURES = {  # name: (restype, argtypes); arrays travel as raw addresses (c_void_p)
    "cspkv_abi_version": (_I, []),
    "cspkv_status_string": (ctypes.c_char_p, [_I]),
    "cspkv_last_error": (ctypes.c_char_p, [_P]),
    "cspkv_create": (_I, [ctypes.POINTER(_Config), _P, ctypes.POINTER(_P)]),
    "cspkv_destroy": (None, [_P]),
    "cspkv_reset": (_I, [_P]),
    "cspkv_load_prefill": (_I, [_P, _I64, _P, _SZ, _P, _P, _P, _SZ, _P, _SZ, _I64]),
    "cspkv_choose_write_slots": (_I, [_P, _I64, _P, _SZ]),
    "cspkv_attention_bias": (_I, [_P, _P, _SZ]),
    "cspkv_write_token": (_I, [_P, _P, _SZ, _P, _SZ, _I64, ctypes.c_int32]),
    "cspkv_accumulate": (_I, [_P, _P, _SZ]),
    "cspkv_get_valid": (_I, [_P, _P, _SZ]),
    "cspkv_get_positions": (_I, [_P, _P, _SZ]),
    "cspkv_get_modality": (_I, [_P, _P, _SZ]),
    "cspkv_get_scores": (_I, [_P, _P, _SZ]),
    "cspkv_get_n_valid": (_I, [_P, _P, _SZ]),
    "cspkv_get_prompt_len": (_I, [_P, ctypes.POINTER(_I64)]),
    "cspkv_kv_pointer": (_I, [_P, ctypes.POINTER(_P)]),
    "cspkv_bytes_held": (_I, [_P, ctypes.POINTER(_SZ), ctypes.POINTER(_SZ)]),
}

_lib: ctypes.CDLL | None = None


def library_candidates() -> list[Path]:
    """Where the library is looked for: $CSPKV_LIBRARY, else the extension built by setup.py."""
    if os.environ.get("CSPKV_LIBRARY"):
        return [Path(os.environ["CSPKV_LIBRARY"])]
    here = Path(__file__).resolve().parent
    return [here / f"_libcspkv{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Loads libcspkv (once, unless ``path`` is given) and declares its signatures."""
    global _lib
    if path is None and _lib is not None:
        return _lib
    candidates = [Path(path)] if path is not None else library_candidates()
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise LibraryNotFoundError(
            "libcspkv is not built (looked for " + ", ".join(map(str, candidates)) + "): "
            "run `pip install -e .` in the repository root, or build it with "
            "`make -C cspkv/runtime/csrc lib` and point CSPKV_LIBRARY at build/libcspkv.so")
    lib = ctypes.CDLL(str(found))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.cspkv_abi_version() != ABI_VERSION:
        raise LibraryNotFoundError(
            f"{found} has ABI version {lib.cspkv_abi_version()}, this binding needs {ABI_VERSION}: "
            "rebuild it with `pip install -e .`")
    if path is None:
        _lib = lib
    return lib


def _check(lib: ctypes.CDLL, function: str, status: int, context: str = "", buffer: int | None = None) -> None:
    """Raises for a failed call: the status, then what the library found (``cspkv_last_error`` of
    ``buffer``, naming the argument and value), then the caller's ``context``."""
    if status == 0:
        return
    message = lib.cspkv_status_string(status).decode()
    detail = lib.cspkv_last_error(buffer).decode(errors="replace") if buffer else ""
    if detail:
        message += f": {detail}"
    if context:
        message += f" ({context})"
    cls = {_NO_EVICTABLE: NoEvictableSlotError, _NON_FINITE: NonFiniteError}.get(status, KVBufferError)
    raise cls(function, status, message, detail)


def _int(name: str, value, lo: int, hi: int) -> int:
    """An integer argument in [lo, hi] (ctypes would silently wrap out-of-range values)."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _numbers(name: str, value, dtype, shape: tuple) -> np.ndarray:
    """A C-contiguous array of ``dtype`` and ``shape`` from ``value``: integers (range-checked) for
    integer targets; integers or floats for float targets. Wrong kind or shape names ``name``."""
    arr = np.asarray(value)
    target = np.dtype(dtype)
    allowed = "iu" if target.kind in "iu" else "iuf"
    if arr.dtype.kind not in allowed:
        kind = "an integer" if target.kind in "iu" else "a real"
        raise TypeError(f"{name} must be {kind} array (converted to {target}), got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if target.kind in "iu" and arr.size and arr.dtype != target:
        info = np.iinfo(target)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"{name} values must fit in {target}")
    return np.ascontiguousarray(arr, dtype=target)


class _Handle:
    """Owns the C buffer; the KVBuffer and every ``kv`` view hold it, so the memory outlives them."""

    def __init__(self, lib: ctypes.CDLL, ptr: int):
        self.lib, self.ptr = lib, ptr

    def __del__(self):
        if self.ptr:
            self.lib.cspkv_destroy(self.ptr)
            self.ptr = None


class _KVMemory:
    """numpy array-interface exporter of the K/V memory; keeps the handle alive."""

    def __init__(self, handle: _Handle, address: int, shape: tuple, dtype: np.dtype):
        self._handle = handle
        self.__array_interface__ = {"data": (address, False), "shape": shape,
                                    "typestr": dtype.str, "version": 3}


class KVBuffer:
    """Fixed-budget KV buffer of one sequence (K/V memory in host RAM plus the slot table).

    Same parameters and semantics as SlotTable, plus ``head_dim`` and ``dtype`` (float32 or
    float16) of the K/V memory. The library is stricter than the reference on bad calls: a decode
    position must be >= prompt_len and not already held, prompt positions must lie in
    [0, prompt_len) and be distinct per head, write_token must follow its choose_write_slots, and a
    failing choose_write_slots changes nothing. Not thread-safe (ctypes releases the GIL during
    calls): use one buffer from one thread at a time.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, n_slots: int, head_dim: int,
                 dtype=np.float32, eviction: str = RING, n_recent: int = 0, n_sink: int = 0,
                 null_logit: float | None = None, allocator: Allocator | None = None):
        dims = {name: _int(name, v, 1, _INT32.max) for name, v in
                (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("n_slots", n_slots),
                 ("head_dim", head_dim))}
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPES:
            raise TypeError(f"dtype must be float32 or float16, got {self.dtype}")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        self.eviction = eviction
        self.n_recent = _int("n_recent", n_recent, 0, _INT32.max)
        self.n_sink = _int("n_sink", n_sink, 0, _INT32.max)
        if null_logit is not None:
            if not math.isfinite(null_logit):
                raise ValueError(f"null_logit must be finite or None, got {null_logit}")
            if dims["n_slots"] < 2:
                raise ValueError("a null slot needs n_slots >= 2")
        self.null_logit = null_logit
        L, H, S, D = dims.values()
        self.shape = (L, H, S)  # metadata shape, as SlotTable.shape
        self.kv_shape = (L, 2, H, S, D)
        self.head_dim = D
        self.n_usable = S - (null_logit is not None)

        self._lib = load_library()
        cfg = _Config(ABI_VERSION, L, H, S, D, _DTYPES[self.dtype], _EVICTIONS[eviction], self.n_recent,
                      self.n_sink, int(null_logit is not None),
                      0.0 if null_logit is None else null_logit)
        ptr = _P()
        # allocator: K/V memory from these hooks (device memory: see cspkv.engines.tensorrt); the
        # library copies the struct, the hooks' callables are kept alive by self._allocator.
        self._allocator = allocator
        _check(self._lib, "cspkv_create",
               self._lib.cspkv_create(ctypes.byref(cfg), None if allocator is None else ctypes.byref(allocator),
                                      ctypes.byref(ptr)),
               f"config {self.kv_shape} {self.dtype}")
        self._handle: _Handle | None = _Handle(self._lib, ptr.value)
        self._handle.allocator = allocator  # the free hook runs when the handle goes: keep it alive as long
        kv_bytes, host_bytes = _SZ(), _SZ()
        self._lib.cspkv_bytes_held(ptr, ctypes.byref(kv_bytes), ctypes.byref(host_bytes))
        self.nbytes = kv_bytes.value  # K/V memory
        self.host_nbytes = host_bytes.value  # metadata and scratch

    # ---- lifecycle ----

    def _ptr(self) -> int:
        if self._handle is None:
            raise ValueError("KVBuffer is closed")
        return self._handle.ptr

    def close(self) -> None:
        """Drops this object's hold on the C buffer; it is freed once no ``kv`` view remains."""
        self._handle = None

    def __enter__(self) -> KVBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else f"{self.nbytes} bytes"
        return (f"KVBuffer(kv_shape={self.kv_shape}, dtype={self.dtype}, eviction={self.eviction!r}, "
                f"null_logit={self.null_logit}, {state})")

    # ---- slot table (SlotTable API) ----

    def reset(self) -> None:
        _check(self._lib, "cspkv_reset", self._lib.cspkv_reset(self._ptr()), buffer=self._ptr())

    def load_prefill(self, kv, positions, modality, n_valid, prompt_len: int, scores=None) -> None:
        """Resets, then loads the pruned prompt into slots 0..n_valid[l, h]-1.

        kv: [layers, 2, kv_heads, C, head_dim] of the buffer's dtype; positions (int64), modality
        (int8), scores (float32, optional): [layers, kv_heads, C]; n_valid: [layers, kv_heads].
        """
        L, H, _ = self.shape
        tables = self._prefill_tables(positions, modality, n_valid, scores, prompt_len)
        kv = self._kv_array("kv", kv, (L, 2, H, tables[0], self.head_dim))
        self._load_prefill(kv.ctypes.data, *tables)

    def load_prefill_from(self, kv_address: int, positions, modality, n_valid, prompt_len: int, scores=None) -> None:
        """:meth:`load_prefill` with the K/V [layers, 2, kv_heads, C, head_dim] of the buffer's dtype at
        a raw address (host, or device memory for a buffer whose allocator copies from there)."""
        self._load_prefill(kv_address, *self._prefill_tables(positions, modality, n_valid, scores, prompt_len))

    def _load_prefill(self, kv_address: int, c, positions, modality, n_valid, scores, prompt_len) -> None:
        L, H, _ = self.shape
        nbytes = L * 2 * H * c * self.head_dim * self.dtype.itemsize
        status = self._lib.cspkv_load_prefill(
            self._ptr(), c, kv_address, nbytes, positions.ctypes.data, modality.ctypes.data,
            None if scores is None else scores.ctypes.data, positions.size, n_valid.ctypes.data,
            n_valid.size, prompt_len)
        _check(self._lib, "cspkv_load_prefill", status,
               f"C={c}, usable slots={self.n_usable}, prompt_len={prompt_len}", self._ptr())

    def _prefill_tables(self, positions, modality, n_valid, scores, prompt_len):
        """Checked slot tables of a prefill: (C, positions, modality, n_valid, scores, prompt_len)."""
        L, H, _ = self.shape
        c = np.shape(positions)[-1] if np.ndim(positions) == 3 else -1
        if c < 0:
            raise ValueError(f"positions must have shape ({L}, {H}, C), got {np.shape(positions)}")
        positions = _numbers("positions", positions, np.int64, (L, H, c))
        modality = _numbers("modality", modality, np.int8, (L, H, c))
        n_valid = _numbers("n_valid", n_valid, np.int32, (L, H))
        if scores is not None:
            scores = _numbers("scores", scores, np.float32, (L, H, c))
        return c, positions, modality, n_valid, scores, _int("prompt_len", prompt_len, 0, _INT64.max)

    def choose_write_slots(self, position: int) -> np.ndarray:
        """int32 [layers, kv_heads]: the slot per head for the token at ``position``."""
        position = _int("position", position, 0, _INT64.max)
        slots = np.empty(self.shape[:2], dtype=np.int32)
        status = self._lib.cspkv_choose_write_slots(self._ptr(), position, slots.ctypes.data, slots.size)
        _check(self._lib, "cspkv_choose_write_slots", status, f"position={position}", self._ptr())
        return slots

    def attention_bias(self, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [layers, kv_heads, slots]: 0 valid, -inf free, null_logit at the null slot.

        ``out``: a C-contiguous float32 array of that shape to fill (e.g. a bound graph input), so
        a decode step allocates nothing."""
        if out is not None and (out.dtype != np.float32 or out.shape != self.shape
                                or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous float32 array of shape {self.shape}")
        bias = np.empty(self.shape, dtype=np.float32) if out is None else out
        _check(self._lib, "cspkv_attention_bias",
               self._lib.cspkv_attention_bias(self._ptr(), bias.ctypes.data, bias.size))
        return bias

    def write_token(self, slots, kv_delta, position: int, modality: int = 0) -> None:
        """Copies the new token's K/V ([layers, 2, 1, kv_heads, 1, head_dim], as an ONNX decode graph
        outputs it) into ``slots`` (from choose_write_slots) and marks them valid."""
        L, H, _ = self.shape
        slots = _numbers("slots", slots, np.int32, (L, H))
        kv_delta = self._kv_array("kv_delta", kv_delta, (L, 2, 1, H, 1, self.head_dim))
        self.write_token_from(slots, kv_delta.ctypes.data, position, modality)

    def write_token_from(self, slots, kv_address: int, position: int, modality: int = 0) -> None:
        """:meth:`write_token` with the new token's K/V [layers, 2, 1, kv_heads, 1, head_dim] of the
        buffer's dtype at a raw address (host, or device memory for a buffer whose allocator copies
        from there)."""
        L, H, _ = self.shape
        slots = _numbers("slots", slots, np.int32, (L, H))
        position = _int("position", position, 0, _INT64.max)
        modality = _int("modality", modality, 0, np.iinfo(np.int8).max)
        nbytes = L * 2 * H * self.head_dim * self.dtype.itemsize
        status = self._lib.cspkv_write_token(self._ptr(), slots.ctypes.data, slots.size, kv_address, nbytes,
                                             position, modality)
        _check(self._lib, "cspkv_write_token", status,
               f"slots={slots.tolist()}, position={position}, usable slots={self.n_usable}", self._ptr())

    def accumulate(self, mass) -> None:
        """Adds the attention mass each valid slot received ([layers, kv_heads, slots])."""
        mass = _numbers("mass", mass, np.float32, self.shape)
        _check(self._lib, "cspkv_accumulate",
               self._lib.cspkv_accumulate(self._ptr(), mass.ctypes.data, mass.size), buffer=self._ptr())

    def n_valid(self) -> np.ndarray:
        out = np.empty(self.shape[:2], dtype=np.int32)
        _check(self._lib, "cspkv_get_n_valid",
               self._lib.cspkv_get_n_valid(self._ptr(), out.ctypes.data, out.size))
        return out

    # ---- metadata (copies, as SlotTable's arrays) ----

    def _get(self, name: str, dtype) -> np.ndarray:
        out = np.empty(self.shape, dtype=dtype)
        function = f"cspkv_get_{name}"
        _check(self._lib, function, getattr(self._lib, function)(self._ptr(), out.ctypes.data, out.size))
        return out

    @property
    def valid(self) -> np.ndarray:
        return self._get("valid", np.uint8).astype(bool)

    @property
    def position(self) -> np.ndarray:
        return self._get("positions", np.int64)

    @property
    def modality(self) -> np.ndarray:
        return self._get("modality", np.int8)

    @property
    def score(self) -> np.ndarray:
        return self._get("scores", np.float32)

    @property
    def prompt_len(self) -> int:
        out = _I64()
        _check(self._lib, "cspkv_get_prompt_len", self._lib.cspkv_get_prompt_len(self._ptr(), ctypes.byref(out)))
        return out.value

    # ---- K/V memory ----

    @property
    def kv_ptr(self) -> int:
        """Address of the K/V memory (for onnxruntime IOBinding: bind_output / OrtValue)."""
        out = _P()
        _check(self._lib, "cspkv_kv_pointer", self._lib.cspkv_kv_pointer(self._ptr(), ctypes.byref(out)))
        return out.value

    @property
    def kv(self) -> np.ndarray:
        """Zero-copy view [layers, 2, kv_heads, slots, head_dim] of the K/V memory. It keeps the C
        buffer alive; writing through it bypasses the slot table (never write the null slot)."""
        if self._allocator is not None:
            raise ValueError("this buffer's K/V memory comes from an allocator (e.g. on a GPU): numpy cannot "
                             "view it; use kv_ptr")
        handle = self._handle
        return np.asarray(_KVMemory(handle, self.kv_ptr, self.kv_shape, self.dtype))

    def _kv_array(self, name: str, value, shape: tuple) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype != self.dtype:  # no silent conversion of K/V: it is large and usually a bug
            raise TypeError(f"{name} must have the buffer's dtype {self.dtype}, got {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        return np.ascontiguousarray(arr)
