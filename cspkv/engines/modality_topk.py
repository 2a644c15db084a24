"""CSP's modality-aware top-k outside PyTorch: ctypes bindings of the C reference and the CUDA kernel
(cspkv/engines/plugin/), and the PyTorch policy's answer for the same inputs.

    idx = modality_topk_ref(self_scores, cross_scores, key_modality, n_keep, n_recent, cross_ratio=0.5)
    same = modality_topk_torch(self_scores, cross_scores, key_modality, n_keep, n_recent, cross_ratio=0.5)

Inputs (numpy arrays or CPU torch tensors): self_scores, cross_scores [B, H, L] (cast to float32, as
the engine sees them); key_modality [B, L] (0 text, 1 image, -1 padding, padding last); n_keep and
n_recent: an int or [B] ints, 0 <= n_recent <= n_keep <= n_valid; cross_ratio in [0, 1]; c_max: the
static output width (default max(n_keep)), 1 <= c_max <= L. Output int64 [B, H, c_max]: the kept
positions ascending, then the not-kept ones ascending (truncated to c_max). The exact rules are in
plugin/modality_topk.h.

Libraries are built on first use with ``make -C cspkv/engines/plugin ref`` (or ``cuda-lib``) into
plugin/build/, and ``make`` rebuilds them when a source changed. ``CSPKV_MODALITY_TOPK_REF_LIB`` /
``CSPKV_MODALITY_TOPK_CUDA_LIB`` point at prebuilt copies instead (no build is attempted then).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from cspkv.pruning.base import mask_to_indices
from cspkv.pruning.csp import CrossSelfPruning

PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
BUILD_DIR = PLUGIN_DIR / "build"
REF_LIBRARY = BUILD_DIR / "libcspkv_modality_topk_ref.so"
CUDA_LIBRARY = BUILD_DIR / "libcspkv_modality_topk_cuda.so"

# enum cspkv_topk_status in plugin/modality_topk.h, in order.
STATUS_NAMES = (
    "CSPKV_TOPK_OK", "CSPKV_TOPK_ERR_NULL_POINTER", "CSPKV_TOPK_ERR_SHAPE", "CSPKV_TOPK_ERR_RATIO",
    "CSPKV_TOPK_ERR_MODALITY", "CSPKV_TOPK_ERR_BUDGET", "CSPKV_TOPK_ERR_OUT_OF_MEMORY",
    "CSPKV_TOPK_ERR_TOO_LONG", "CSPKV_TOPK_ERR_CUDA",
)
_INT32 = np.iinfo(np.int32)

_P, _I32, _DBL = ctypes.c_void_p, ctypes.c_int32, ctypes.c_double
_TOPK_ARGS = [_P, _P, _P, _P, _P, _I32, _I32, _I32, _I32, _DBL, _P]


class ModalityTopKError(RuntimeError):
    """A C/CUDA call returned an error status; ``status_name`` is its enum name."""

    def __init__(self, function: str, status: int, message: str):
        self.function = function
        self.status = status
        self.status_name = STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else str(status)
        super().__init__(f"{function}: {message} [{self.status_name}]")


class LibraryNotFoundError(ImportError):
    """The library could not be built or loaded."""


def _load(target: str, default: Path, env: str) -> ctypes.CDLL:
    override = os.environ.get(env)
    if override:
        path = Path(override)
        if not path.is_file():
            raise LibraryNotFoundError(f"{env}={override} is not a file")
    else:
        path = default
        make = shutil.which("make")
        if make is not None:
            proc = subprocess.run([make, "-s", "-C", str(PLUGIN_DIR), target],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise LibraryNotFoundError(
                    f"`make -C {PLUGIN_DIR} {target}` failed:\n{proc.stdout}{proc.stderr}")
        elif not path.is_file():
            raise LibraryNotFoundError(f"{path} is missing and `make` is not on PATH to build it")
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise LibraryNotFoundError(f"cannot load {path}: {exc}") from exc


@functools.lru_cache(maxsize=None)
def load_reference_library() -> ctypes.CDLL:
    """The C reference (built on first use)."""
    lib = _load("ref", REF_LIBRARY, "CSPKV_MODALITY_TOPK_REF_LIB")
    lib.cspkv_modality_topk_ref.restype = ctypes.c_int
    lib.cspkv_modality_topk_ref.argtypes = _TOPK_ARGS
    lib.cspkv_topk_status_string.restype = ctypes.c_char_p
    lib.cspkv_topk_status_string.argtypes = [ctypes.c_int]
    lib.cspkv_ratio_from_float32.restype = ctypes.c_double
    lib.cspkv_ratio_from_float32.argtypes = [ctypes.c_float]
    return lib


@functools.lru_cache(maxsize=None)
def load_cuda_library() -> ctypes.CDLL:
    """The CUDA kernel and its host wrapper (built with nvcc on first use; needs no GPU to load)."""
    lib = _load("cuda-lib", CUDA_LIBRARY, "CSPKV_MODALITY_TOPK_CUDA_LIB")
    lib.cspkv_modality_topk_cuda_host.restype = ctypes.c_int
    lib.cspkv_modality_topk_cuda_host.argtypes = _TOPK_ARGS + [_I32, ctypes.POINTER(ctypes.c_float)]
    lib.cspkv_modality_topk_cuda_device_count.restype = ctypes.c_int
    lib.cspkv_modality_topk_cuda_device_count.argtypes = []
    return lib


def status_message(status: int) -> str:
    return load_reference_library().cspkv_topk_status_string(status).decode()


def ratio_from_float32(ratio: float) -> float:
    """What the TensorRT plugin makes of a float32 ``cross_ratio`` attribute (0.9f -> 0.9)."""
    return load_reference_library().cspkv_ratio_from_float32(ratio)


def _to_numpy(value, dtype, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if np.issubdtype(dtype, np.integer):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
        if array.size and (array.min() < _INT32.min or array.max() > _INT32.max):
            raise ValueError(f"{name} holds values outside int32")
    array = np.asarray(array, dtype=dtype)  # keeps 0-d scalars 0-d (np.ascontiguousarray would not)
    return array if array.flags.c_contiguous else array.copy(order="C")


def prepare_inputs(self_scores, cross_scores, key_modality, n_keep, n_recent, c_max=None):
    """Contiguous float32 / int32 numpy arrays with checked shapes, and the output width."""
    self_np = _to_numpy(self_scores, np.float32, "self_scores")
    cross_np = _to_numpy(cross_scores, np.float32, "cross_scores")
    if self_np.ndim != 3:
        raise ValueError(f"self_scores must have shape [B, H, L], got {self_np.shape}")
    if cross_np.shape != self_np.shape:
        raise ValueError(f"cross_scores must have shape {self_np.shape}, got {cross_np.shape}")
    batch, _, length = self_np.shape
    modality = _to_numpy(key_modality, np.int32, "key_modality")
    if modality.shape != (batch, length):
        raise ValueError(f"key_modality must have shape [B, L] = [{batch}, {length}], got {modality.shape}")
    budgets = []
    for name, value in (("n_keep", n_keep), ("n_recent", n_recent)):
        array = _to_numpy(value, np.int32, name)
        if array.ndim == 0:
            array = np.full(batch, array, dtype=np.int32)
        if array.shape != (batch,):
            raise ValueError(f"{name} must be an int or have shape [B] = [{batch}], got {array.shape}")
        budgets.append(array)
    if c_max is None:
        c_max = int(budgets[0].max()) if batch else 0
    if isinstance(c_max, bool) or not isinstance(c_max, (int, np.integer)):
        raise ValueError(f"c_max must be an int, got {type(c_max).__name__}")
    return self_np, cross_np, modality, budgets[0], budgets[1], int(c_max)


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


def modality_topk_ref(self_scores, cross_scores, key_modality, n_keep, n_recent,
                      cross_ratio: float, c_max: int | None = None) -> np.ndarray:
    """Kept indices int64 [B, H, c_max] from the C reference; raises ModalityTopKError on bad input."""
    self_np, cross_np, modality, keep, recent, c_max = prepare_inputs(
        self_scores, cross_scores, key_modality, n_keep, n_recent, c_max)
    batch, heads, length = self_np.shape
    out = np.empty((batch, heads, max(c_max, 0)), dtype=np.int64)
    lib = load_reference_library()
    status = lib.cspkv_modality_topk_ref(
        _pointer(self_np), _pointer(cross_np), _pointer(modality), _pointer(keep), _pointer(recent),
        batch, heads, length, c_max, float(cross_ratio), _pointer(out))
    if status != 0:
        raise ModalityTopKError("cspkv_modality_topk_ref", status, status_message(status))
    return out


def cuda_device_count() -> int:
    """CUDA devices the kernel library sees (builds the library; 0 without a GPU)."""
    return int(load_cuda_library().cspkv_modality_topk_cuda_device_count())


def modality_topk_cuda(self_scores, cross_scores, key_modality, n_keep, n_recent,
                       cross_ratio: float, c_max: int | None = None, repeats: int = 1):
    """(indices int64 [B, H, c_max], mean kernel milliseconds) from the CUDA kernel (host arrays)."""
    self_np, cross_np, modality, keep, recent, c_max = prepare_inputs(
        self_scores, cross_scores, key_modality, n_keep, n_recent, c_max)
    batch, heads, length = self_np.shape
    out = np.empty((batch, heads, max(c_max, 0)), dtype=np.int64)
    mean_ms = ctypes.c_float(0.0)
    lib = load_cuda_library()
    status = lib.cspkv_modality_topk_cuda_host(
        _pointer(self_np), _pointer(cross_np), _pointer(modality), _pointer(keep), _pointer(recent),
        batch, heads, length, c_max, float(cross_ratio), _pointer(out), int(repeats),
        ctypes.byref(mean_ms))
    if status != 0:
        raise ModalityTopKError("cspkv_modality_topk_cuda_host", status, status_message(status))
    return out, float(mean_ms.value)


class _GivenRecentWindow(CrossSelfPruning):
    """CSP ("distinct") whose recent window R is given per batch row (as the plugin's n_recent input)
    instead of derived from window_ratio and recent_ratio; everything else is the policy's code."""

    def __init__(self, n_recent: torch.Tensor, cross_ratio: float):
        super().__init__(cross_ratio=cross_ratio, variant="distinct")
        self._n_recent = n_recent

    def recent_window(self, n_valid, n_keep):
        return self._n_recent


def modality_topk_torch(self_scores, cross_scores, key_modality, n_keep, n_recent,
                        cross_ratio: float, c_max: int | None = None) -> torch.Tensor:
    """The PyTorch policy's answer: CrossSelfPruning.keep_mask, then base.mask_to_indices.

    mask_to_indices puts the kept positions first in ascending order; when fewer than c_max are kept
    its tail is padding in torch.topk's (unspecified) tie order, so the tail here is the not-kept
    positions in ascending order instead -- the order ONNX TopK and the kernels give it.
    """
    self_np, cross_np, modality, keep_np, recent_np, c_max = prepare_inputs(
        self_scores, cross_scores, key_modality, n_keep, n_recent, c_max)
    batch, heads, length = self_np.shape
    if not 1 <= c_max <= length:
        raise ValueError(f"c_max must be in [1, L={length}], got {c_max}")
    scores = torch.stack([torch.from_numpy(self_np), torch.from_numpy(cross_np)], dim=2)  # [B,H,2,L]
    policy = _GivenRecentWindow(torch.from_numpy(recent_np).long(), cross_ratio)
    keep = policy.keep_mask(scores, torch.from_numpy(modality).long(), torch.from_numpy(keep_np).long())
    keep = keep.expand(batch, heads, length)
    kept_first = mask_to_indices(keep, c_max)
    ascending = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :c_max]
    n_kept = keep.sum(-1, keepdim=True)
    return torch.where(torch.arange(c_max) < n_kept, kept_first, ascending)
