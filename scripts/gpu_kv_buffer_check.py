"""GPU check of the device-memory KV buffer (cspkv.engines.cuda_runtime.DeviceKVBuffer), no TensorRT needed.

On a machine with an NVIDIA GPU (libcudart found via $CSPKV_CUDART, a pip nvidia wheel, PyTorch or
/usr/local/cuda):
  1. the device buffer equals the host KVBuffer after an in-place prefill load and 24 decode writes
     with evictions (K/V downloaded from the GPU and compared bit for bit);
  2. times, at the default model's shape (30 layers, 3 KV heads, 784 slots, head_dim 64, fp16, ring
     policy), one write_token_device (the new token's K/V copied device-to-device into its slot: one
     strided cudaMemcpy2D when every head writes the same slot, else 2*L*H row copies through the
     allocator hook) and one choose_write_slots + attention_bias (host slot table).
Prints one JSON line. Usage: python scripts/gpu_kv_buffer_check.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cspkv.engines.cuda_runtime import CudaRuntime, DeviceKVBuffer  # noqa: E402
from cspkv.runtime.kv_buffer import KVBuffer  # noqa: E402


def parity(cuda: CudaRuntime) -> bool:
    rng = np.random.default_rng(0)
    L, H, S, D, C = 3, 2, 12, 8, 7
    kv = rng.standard_normal((L, 2, 1, H, S, D)).astype(np.float16)
    kv[..., C:, :] = 0
    n_valid = rng.integers(3, C + 1, (L, H)).astype(np.int32)
    for l in range(L):
        for h in range(H):
            kv[l, :, 0, h, n_valid[l, h]:C] = 0
    positions = np.stack([np.stack([np.sort(rng.choice(30, C, replace=False)) for _ in range(H)]) for _ in range(L)])
    modality = rng.integers(0, 2, (L, H, C))
    host = KVBuffer(L, H, S, D, np.float16, "rescore", n_recent=2, n_sink=1)
    device = DeviceKVBuffer(L, H, S, D, np.float16, "rescore", n_recent=2, n_sink=1, cuda=cuda)
    host.load_prefill(np.ascontiguousarray(kv[:, :, 0, :, :C]), positions, modality, n_valid, 30)
    cuda.upload(device.kv_ptr, kv)
    device.load_prefill_in_place(positions, modality, n_valid, 30)
    delta = cuda.malloc(L * 2 * H * D * 2)
    for position in range(30, 54):
        slots = host.choose_write_slots(position)
        assert np.array_equal(device.choose_write_slots(position), slots)
        new = rng.standard_normal((L, 2, 1, H, 1, D)).astype(np.float16)
        host.write_token(slots, new, position)
        cuda.upload(delta, new)
        device.write_token_device(slots, delta, position)
        mass = rng.random((L, H, S)).astype(np.float32)
        host.accumulate(mass)
        device.accumulate(mass)
    cuda.free(delta)
    return bool(np.array_equal(device.download_kv(), host.kv) and np.array_equal(device.position, host.position))


def timing(cuda: CudaRuntime, repeats: int = 200) -> dict:
    L, H, S, D = 30, 3, 784, 64
    device = DeviceKVBuffer(L, H, S, D, np.float16, "ring", cuda=cuda)
    positions = np.tile(np.arange(700), (L, H, 1))
    device.load_prefill_in_place(positions, np.zeros_like(positions), np.full((L, H), 700, np.int32), 700)
    delta = cuda.malloc(L * 2 * H * D * 2)
    write, table = [], []
    bias = np.empty((L, H, S), np.float32)
    hook_copies = device.copies
    for step in range(repeats):
        t0 = time.perf_counter()
        slots = device.choose_write_slots(700 + step)
        device.attention_bias(out=bias)
        t1 = time.perf_counter()
        device.write_token_device(slots, delta, 700 + step)
        cuda.synchronize()
        t2 = time.perf_counter()
        table.append(t1 - t0)
        write.append(t2 - t1)
    cuda.free(delta)
    return {"shape": [L, H, S, D], "dtype": "float16", "kv_mib": device.nbytes / 2**20,
            "write_token_device_us_median": 1e6 * statistics.median(write),
            "choose_and_bias_us_median": 1e6 * statistics.median(table),
            "rows_per_token": 2 * L * H,
            "hook_copies_per_token": (device.copies - hook_copies) / repeats}  # 0: one strided copy (ring)


def main() -> int:
    cuda = CudaRuntime()
    result = {"cudart": cuda.path, "device": cuda.device_info(), "parity_with_host_buffer": parity(cuda),
              **timing(cuda)}
    print(json.dumps(result))
    return 0 if result["parity_with_host_buffer"] else 1


if __name__ == "__main__":
    sys.exit(main())
