"""keep_freed_heap: a freed 64 MB tensor's pages are reused instead of faulted in again."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")

CYCLES = """
import resource, sys, torch
from cspkv.heap import keep_freed_heap
if sys.argv[1] == "keep" and not keep_freed_heap():
    print("no-mallopt")
    raise SystemExit
def cycle():
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)   # 64 MB, freed at once
for _ in range(10):   # the heap settles first: glibc reuses the freed block once it has grown
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int | None:
    """Minor page faults over 5 cycles in a fresh process (mallopt is process-wide: never in pytest's)."""
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True)
    last = done.stdout.strip().splitlines()[-1]
    return None if last == "no-mallopt" else int(last)


def test_freed_tensor_pages_are_reused_not_faulted_again():
    kept = faults("keep")
    if kept is None:
        pytest.skip("this libc has no glibc mallopt")
    default = faults("default")
    # default glibc unmaps the 64 MB block on free: every cycle faults its pages in again
    assert default >= 5 * 30, default            # >= 30 faults a cycle even with 2 MB huge pages
    assert kept < max(50, default // 20), (kept, default)
