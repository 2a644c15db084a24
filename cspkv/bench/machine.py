"""What the benchmark machine is and what its memory can do: description, copy bandwidth, RSS."""

from __future__ import annotations

import os
import platform
import resource
import time

import numpy as np


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> dict:
    """Best-of-``repeats`` numpy copy of a ``megabytes`` buffer (far above the caches): bytes read
    plus bytes written per second. A decode step must at least stream its weights and its KV once,
    so this is the floor's denominator."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)                                   # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    moved = 2 * src.nbytes
    return {"gb_per_s": moved / best / 1e9, "buffer_mib": megabytes, "repeats": repeats,
            "method": "numpy.copyto, best of repeats, read + write bytes"}


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, which a new program image starts afresh
    (ru_maxrss is carried over from the parent across fork and exec, so it is not used)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set features that change ONNX Runtime's float and int8 kernels on x86.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def cpu_name() -> str:
    """The CPU model and the kernel-relevant flags it has, e.g. 'AMD EPYC [avx2 fma]'."""
    flags = set(_cpu_flags())
    return f"{_cpu_model()} [{' '.join(f for f in KERNEL_FLAGS if f in flags) or 'no AVX2'}]"


def describe() -> dict:
    """The machine in words and numbers, for the report."""
    import onnxruntime
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_name(), "cores": cores, "memory_gib": round(memory / 2**30, 1),
            "machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "load_average": os.getloadavg()}
