"""Builds libcspkv (the fixed-budget KV buffer, plain C11) as part of the normal install.

All project metadata lives in pyproject.toml; this file only adds the C library. It is declared as a
setuptools Extension so that `pip install .` / `pip install -e .` compile it with the platform's C
compiler and put it next to its Python wrapper (cspkv/runtime/_libcspkv.<abi-suffix>.so), but it
does not use the Python C API: cspkv/runtime/kv_buffer.py loads it with ctypes. Hence no Python
headers are needed, and the same sources build standalone with cspkv/runtime/csrc/Makefile.
"""

import sys
from glob import glob

from setuptools import Extension, setup

CSRC = "cspkv/runtime/csrc"

# -O2 and no -ffast-math: score additions must round exactly like numpy's float32 ones.
# -fvisibility=hidden: only the CSPKV_API functions of cspkv.h are exported.
compile_args = [] if sys.platform == "win32" else ["-std=c11", "-O2", "-fvisibility=hidden"]

libcspkv = Extension(
    "cspkv.runtime._libcspkv",
    sources=sorted(glob(f"{CSRC}/*.c")),
    include_dirs=["cspkv/runtime/include", CSRC],
    depends=["cspkv/runtime/include/cspkv.h", *sorted(glob(f"{CSRC}/*.h"))],
    extra_compile_args=compile_args,
)

setup(ext_modules=[libcspkv])
