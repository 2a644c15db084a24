"""Keep freed memory in the process heap (glibc), for long CPU runs that allocate big tensors.

glibc serves every allocation over 32 MB with a fresh mmap and unmaps it on free, so each prefill's
window logits (e.g. 9 heads x 448 rows x 4,479 keys x 4 bytes = 72 MB a chunk, every layer) come back
as new pages that the kernel must fault in and zero. In the evaluation sweep that was ~19% of the
CPU time as system time. Switching mmap off and trimming off makes freed blocks reusable, as a
caching allocator (jemalloc, tcmalloc) would, without a preloaded library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def keep_freed_heap(top_pad_mb: int = 256) -> bool:
    """Ask glibc to keep freed memory for reuse; returns False (and changes nothing) where there is
    no glibc, e.g. macOS, Windows or musl. The process's peak memory then stays held until it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, top_pad_mb << 20)))
