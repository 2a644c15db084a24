"""The CUDA runtime through ctypes (no PyCUDA / cuda-python dependency), and the KV buffer on the GPU.

:class:`CudaRuntime` loads libcudart (``$CSPKV_CUDART``, the system's, a pip ``nvidia-cuda-runtime``
wheel's, or PyTorch's copy) and wraps the few calls the TensorRT backend needs: device memory,
copies, a stream, and the device's name and compute capability.

:class:`DeviceKVBuffer` is :class:`~cspkv.runtime.kv_buffer.KVBuffer` with its K/V memory allocated
by ``cudaMalloc`` through libcspkv's allocator hook (``cspkv_allocator``): the slot table stays on
the host, the K/V memory never leaves the GPU. Copies in go through ``cudaMemcpy(...,
cudaMemcpyDefault)``, so the K/V a caller hands over may live on the host or on the device (unified
addressing). Two device paths avoid copies altogether:

* :meth:`DeviceKVBuffer.load_prefill_in_place`: the prefill engine's ``kv`` output
  [layers, 2, 1, H, S, D] has the buffer's layout [layers, 2, H, S, D] with the pruned prompt in
  slots 0..C-1, so the engine writes it straight into the buffer and only the slot table is loaded;
* :meth:`DeviceKVBuffer.write_token_device`: the decode engine's ``new_kv`` (device memory) is
  copied device-to-device into the chosen slots.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cspkv.runtime.kv_buffer import ALLOC_FN, COPY_FN, FREE_FN, Allocator, KVBuffer

CUDA_MEMCPY_DEFAULT = 4          # cudaMemcpyDefault: direction inferred from the pointers (UVA)
CUDA_DEV_ATTR_CC_MAJOR = 75      # cudaDevAttrComputeCapabilityMajor
CUDA_DEV_ATTR_CC_MINOR = 76      # cudaDevAttrComputeCapabilityMinor
COPY_FROM_CALLER = 0             # cspkv_copy_kind


class CudaUnavailable(RuntimeError):
    """No CUDA runtime library or no GPU; the message says what to install."""


def cudart_candidates() -> list[str]:
    """Where libcudart is looked for, in order."""
    if os.environ.get("CSPKV_CUDART"):
        return [os.environ["CSPKV_CUDART"]]
    found = []
    name = ctypes.util.find_library("cudart")
    if name:
        found.append(name)
    roots = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    for root in roots:
        for pattern in ("nvidia/cuda_runtime/lib/libcudart.so*", "nvidia/cu*/lib/libcudart.so*", "torch/lib/libcudart*.so*"):
            found.extend(sorted(glob.glob(str(root / pattern)), reverse=True))
    for prefix in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"):
        found.extend(sorted(glob.glob(f"{prefix}/libcudart.so*"), reverse=True))
    return found


class CudaRuntime:
    """A few CUDA runtime calls; every failure raises CudaUnavailable/RuntimeError with CUDA's message."""

    def __init__(self, path: str | None = None, device: int = 0):
        candidates = [path] if path else cudart_candidates()
        errors = []
        self.lib = None
        for candidate in candidates:
            try:
                self.lib = ctypes.CDLL(candidate)
                self.path = candidate
                break
            except OSError as exc:
                errors.append(f"{candidate}: {exc}")
        if self.lib is None:
            raise CudaUnavailable("the CUDA runtime library (libcudart) was not found"
                                  + (f" ({'; '.join(errors)})" if errors else "")
                                  + ": install the NVIDIA driver and the CUDA runtime (e.g. `pip install "
                                    "nvidia-cuda-runtime-cu12`, or CUDA 12/13 from developer.nvidia.com), "
                                    "or set CSPKV_CUDART=/path/to/libcudart.so")
        lib = self.lib
        P, SZ, I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        for name, restype, argtypes in (
            ("cudaMalloc", I, [ctypes.POINTER(P), SZ]),
            ("cudaFree", I, [P]),
            ("cudaMemcpy", I, [P, P, SZ, I]),
            ("cudaMemcpy2D", I, [P, SZ, P, SZ, SZ, SZ, I]),
            ("cudaMemset", I, [P, I, SZ]),
            ("cudaGetDeviceCount", I, [ctypes.POINTER(I)]),
            ("cudaSetDevice", I, [I]),
            ("cudaDeviceGetAttribute", I, [ctypes.POINTER(I), I, I]),
            ("cudaDeviceSynchronize", I, []),
            ("cudaStreamCreate", I, [ctypes.POINTER(P)]),
            ("cudaStreamSynchronize", I, [P]),
            ("cudaStreamDestroy", I, [P]),
            ("cudaRuntimeGetVersion", I, [ctypes.POINTER(I)]),
            ("cudaGetErrorString", ctypes.c_char_p, [I]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        # the name lives in cudaDeviceProp (its first field, char[256]); CUDA 12+ exports the _v2 symbol
        self._props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
        self._props.restype, self._props.argtypes = I, [P, I]
        count = ctypes.c_int(0)
        status = lib.cudaGetDeviceCount(ctypes.byref(count))
        if status != 0 or count.value < 1:
            raise CudaUnavailable(f"no CUDA device visible ({self.error(status) if status else 'count 0'}): "
                                  "this needs an NVIDIA GPU and its driver")
        if device >= count.value:
            raise CudaUnavailable(f"CUDA device {device} does not exist ({count.value} visible)")
        self.device = device
        self.check(lib.cudaSetDevice(device), "cudaSetDevice")

    def error(self, status: int) -> str:
        return self.lib.cudaGetErrorString(status).decode()

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: {self.error(status)} (cudaError {status})")

    # ---- memory ----
    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(1, int(nbytes))), f"cudaMalloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFree(ptr)

    def copy(self, dst: int, src: int, nbytes: int) -> int:
        """cudaMemcpy with cudaMemcpyDefault; returns the CUDA status (0 = success)."""
        return self.lib.cudaMemcpy(dst, src, nbytes, CUDA_MEMCPY_DEFAULT)

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> int:
        """cudaMemcpy2D (cudaMemcpyDefault): ``height`` rows of ``width`` bytes; returns the status."""
        return self.lib.cudaMemcpy2D(dst, dst_pitch, src, src_pitch, width, height, CUDA_MEMCPY_DEFAULT)

    def upload(self, dst: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.check(self.copy(dst, array.ctypes.data, array.nbytes), "cudaMemcpy host->device")

    def download(self, src: int, out: np.ndarray) -> np.ndarray:
        if not out.flags.c_contiguous:
            raise ValueError("download needs a C-contiguous array")
        self.check(self.copy(out.ctypes.data, src, out.nbytes), "cudaMemcpy device->host")
        return out

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        self.check(self.lib.cudaMemset(ptr, value, nbytes), "cudaMemset")

    def synchronize(self) -> None:
        self.check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def stream(self) -> int:
        stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return stream.value

    def stream_synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    # ---- device ----
    def device_info(self) -> dict:
        major, minor, version = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_DEV_ATTR_CC_MAJOR, self.device),
                   "cudaDeviceGetAttribute")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_DEV_ATTR_CC_MINOR, self.device),
                   "cudaDeviceGetAttribute")
        self.lib.cudaRuntimeGetVersion(ctypes.byref(version))
        props = ctypes.create_string_buffer(16384)  # cudaDeviceProp is ~1 KB; room to spare
        self.check(self._props(props, self.device), "cudaGetDeviceProperties")
        name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
        return {"name": name, "compute_capability": f"{major.value}.{minor.value}",
                "cuda_runtime": version.value}


class DeviceArray:
    """An owned device allocation of a shape and dtype (freed with the object)."""

    def __init__(self, cuda: CudaRuntime, shape, dtype):
        self.cuda, self.shape, self.dtype = cuda, tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = cuda.malloc(self.nbytes)

    def upload(self, array) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape != self.shape:
            raise ValueError(f"expected shape {self.shape}, got {array.shape}")
        self.cuda.upload(self.ptr, array)

    def download(self, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype) if out is None else out
        return self.cuda.download(self.ptr, out)

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            self.cuda.free(ptr)


class DeviceKVBuffer(KVBuffer):
    """KVBuffer whose K/V memory is cudaMalloc'd device memory (slot table on the host)."""

    def __init__(self, n_layers: int, n_kv_heads: int, n_slots: int, head_dim: int, dtype=np.float32,
                 eviction: str = "ring", n_recent: int = 0, n_sink: int = 0, null_logit: float | None = None,
                 cuda: CudaRuntime | None = None):
        self.cuda = cuda or CudaRuntime()
        # hook state in its own object: the hooks must not reference self (the C buffer's handle
        # holds them, and self holds the handle)
        state = self._hook_state = SimpleNamespace(skip_caller_copies=False, copies=0)
        cuda_ = self.cuda

        def alloc(user, nbytes):
            try:
                return cuda_.malloc(nbytes)
            except RuntimeError:
                return None

        def free(user, ptr, nbytes):
            cuda_.free(ptr)

        def copy(user, dst, src, nbytes, kind):
            if kind == COPY_FROM_CALLER and state.skip_caller_copies:
                return 0                     # the engine already wrote this K/V in place
            state.copies += 1
            return 0 if cuda_.copy(dst, src, nbytes) == 0 else 1

        self._hooks = (ALLOC_FN(alloc), FREE_FN(free), COPY_FN(copy))
        allocator = Allocator(*self._hooks, None)
        super().__init__(n_layers, n_kv_heads, n_slots, head_dim, dtype, eviction, n_recent, n_sink, null_logit,
                         allocator=allocator)
        self._handle.hooks = self._hooks     # alive as long as the C buffer (destroy calls free)

    def load_prefill_in_place(self, positions, modality, n_valid, prompt_len: int, scores=None) -> None:
        """The slot table of a prefill whose engine wrote K/V [layers, 2, 1, H, S, D] straight into
        this buffer (``kv_ptr``): entry j of (layer, head) in slot j, as load_prefill places it."""
        self._hook_state.skip_caller_copies = True
        try:
            self.load_prefill_from(self.kv_ptr, positions, modality, n_valid, prompt_len, scores)
        finally:
            self._hook_state.skip_caller_copies = False

    @property
    def copies(self) -> int:
        """How many copies the hook has made (tests and profiling)."""
        return self._hook_state.copies

    def write_token_device(self, slots, kv_delta_ptr: int, position: int, modality: int = 0) -> None:
        """write_token from K/V [layers, 2, 1, H, 1, D] at a device (or host) address.

        When every (layer, head) writes the same slot (the ring eviction's usual case) the 2*L*H rows go
        in one strided cudaMemcpy2D (source pitch D, destination pitch S*D) and the library only
        commits the slot table; otherwise the library copies row by row through the hook."""
        L, H, S = self.shape
        slots = np.asarray(slots)
        row = self.head_dim * self.dtype.itemsize
        pending = getattr(self, "_pending", None)
        uniform = (pending is not None and pending[0] == position and slots.shape == (L, H)
                   and np.array_equal(pending[1], slots) and bool((slots == slots.flat[0]).all())
                   and 0 <= int(slots.flat[0]) < S)
        if uniform and hasattr(self.cuda, "copy2d"):   # only into the slots the library chose (free)
            status = self.cuda.copy2d(self.kv_ptr + int(slots.flat[0]) * row, S * row, kv_delta_ptr, row, row, 2 * L * H)
            if status != 0:
                raise RuntimeError(f"cudaMemcpy2D of the new token's K/V failed (cudaError {status})")
            self._hook_state.skip_caller_copies = True
        try:
            self.write_token_from(slots, kv_delta_ptr, position, modality)
        finally:
            self._hook_state.skip_caller_copies = False
        self._pending = None

    def choose_write_slots(self, position: int) -> np.ndarray:
        slots = super().choose_write_slots(position)
        self._pending = (position, slots.copy())
        return slots

    def download_kv(self) -> np.ndarray:
        """A host copy [layers, 2, H, S, D] of the K/V memory (tests, debugging)."""
        out = np.empty(self.kv_shape, self.dtype)
        return self.cuda.download(self.kv_ptr, out)

    def layer_pointers(self) -> dict[str, int]:
        """Device address of each decode input past_key_<i> / past_value_<i> (blocks [1, H, S, D])."""
        L, H, S = self.shape
        block = H * S * self.head_dim * self.dtype.itemsize
        base = self.kv_ptr
        return {f"{name}_{layer}": base + (2 * layer + part) * block
                for layer in range(L) for part, name in enumerate(("past_key", "past_value"))}
