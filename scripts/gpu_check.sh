#!/usr/bin/env bash
# GPU check of CSP's modality-aware top-k (cspkv/engines/plugin): on a machine with an NVIDIA GPU,
# nvcc and a Python with torch + numpy, this
#   1. builds the C reference and the CUDA kernel as small shared libraries (make ref / cuda-lib),
#   2. runs tests/test_modality_topk.py (kernel == C reference == PyTorch policy on random inputs),
#   3. runs compute-sanitizer memcheck and racecheck on a few small launches (if installed),
#   4. times the kernel for L = 1024, 2048, 4096 (CUDA events, after a correctness check),
#   5. builds the TensorRT plugin with CMake where NvInfer.h is found,
# and prints what ran, what was skipped and why. Usage, from anywhere:
#   bash scripts/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # builds only, no GPU needed
# Exit status: 0 when nothing failed (skips are not failures). Whole run: about 2-4 minutes.
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLUGIN="$ROOT/cspkv/engines/plugin"
BUILD="$PLUGIN/build"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

RAN=()
SKIPPED=()
FAILED=()
step() { printf '\n=== %s\n' "$*"; }
ran() { RAN+=("$1"); echo "--> ran: $1"; }
skipped() { SKIPPED+=("$1"); echo "--> skipped: $1"; }
failed() { FAILED+=("$1"); echo "--> FAILED: $1"; }
# run_step NAME TIMEOUT_S CMD...: runs CMD under a time limit and records the outcome.
run_step() {
    local name="$1" limit="$2"
    shift 2
    if timeout "$limit" "$@"; then ran "$name"; else failed "$name (exit $?)"; fi
}

# ---- environment ---------------------------------------------------------------------------
step "environment"
NVCC="$(command -v nvcc || true)"
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
    # Prefer an interpreter whose torch sees the GPU.
    for candidate in python3 "$ROOT/.venv/bin/python"; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            PYTHON="$candidate"
            break
        fi
    done
fi
echo "repo:    $ROOT"
echo "nvcc:    ${NVCC:-none} $([[ -n "$NVCC" ]] && "$NVCC" --version | tail -1)"
echo "python:  $PYTHON ($("$PYTHON" -c 'import sys, torch, numpy; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "numpy", numpy.__version__)' 2>&1 | tail -1))"
GPU_CC=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
    GPU_CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
else
    echo "no NVIDIA GPU visible (nvidia-smi missing or found no device)"
fi
HAVE_GPU=0
[[ -n "$GPU_CC" && "$DRY_RUN" != 1 ]] && HAVE_GPU=1

# ---- 1. builds -----------------------------------------------------------------------------
step "1. build: C reference and CUDA kernel library"
run_step "make ref (C reference, -Werror)" 120 make -C "$PLUGIN" ref OPT="-O2 -g -Werror"
ARCHS="87 90"
if [[ -n "$GPU_CC" && " $ARCHS " != *" $GPU_CC "* ]]; then ARCHS="$ARCHS $GPU_CC"; fi
if [[ -z "$NVCC" ]]; then
    skipped "CUDA builds: nvcc not found"
else
    run_step "make cuda-check (nvcc -c for sm_87 and sm_90)" 300 make -C "$PLUGIN" cuda-check NVCC="$NVCC"
    rm -f "$BUILD/libcspkv_modality_topk_cuda.so"  # rebuild for this machine's architectures
    run_step "make cuda-lib (CUDA_ARCHS=$ARCHS)" 300 make -C "$PLUGIN" cuda-lib NVCC="$NVCC" CUDA_ARCHS="$ARCHS"
fi
CUDA_LIB="$BUILD/libcspkv_modality_topk_cuda.so"
REF_LIB="$BUILD/libcspkv_modality_topk_ref.so"

# ---- 2. tests ------------------------------------------------------------------------------
step "2. tests/test_modality_topk.py (kernel vs C reference vs PyTorch policy)"
if [[ "$HAVE_GPU" != 1 ]]; then
    skipped "pytest on the GPU: no GPU (or GPU_CHECK_DRY_RUN=1)"
elif ! [[ -f "$CUDA_LIB" ]]; then
    skipped "pytest on the GPU: the CUDA library did not build"
else
    # --noconftest: the project's conftest builds tiny LLaVA exports that these tests don't need.
    # -rs lists skips: the two CUDA tests must not be among them here.
    run_step "pytest tests/test_modality_topk.py" 300 \
        "$PYTHON" -m pytest -q -rs -p no:cacheprovider --noconftest "$ROOT/tests/test_modality_topk.py"
fi

# ---- 3. compute-sanitizer ------------------------------------------------------------------
# A torch-free ctypes driver: three small launches (ties, padding, a 2-pass split, L not a power of 2).
SANITIZER_DRIVER='
import ctypes, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
lib.cspkv_modality_topk_cuda_host.argtypes = [P, P, P, P, P] + [ctypes.c_int32] * 4 + [ctypes.c_double, P, ctypes.c_int32, P]
rng = np.random.default_rng(0)
for B, H, L in ((1, 2, 300), (2, 3, 64), (1, 1, 5000)):
    s = np.round(rng.random((B, H, L)) * 4).astype(np.float32)
    c = np.round(rng.random((B, H, L)) * 4).astype(np.float32)
    m = np.ones((B, L), np.int32); m[0, L - L // 5:] = -1
    nv = (m >= 0).sum(-1)
    keep = (nv // 2).astype(np.int32); recent = (keep // 4).astype(np.int32)
    out = np.empty((B, H, int(keep.max())), np.int64)
    st = lib.cspkv_modality_topk_cuda_host(s.ctypes.data, c.ctypes.data, m.ctypes.data, keep.ctypes.data, recent.ctypes.data, B, H, L, out.shape[2], 0.5, out.ctypes.data, 1, None)
    assert st == 0, st
print("sanitizer driver: 3 launches ok")
'
step "3. compute-sanitizer (memcheck, racecheck)"
if [[ "$HAVE_GPU" != 1 || ! -f "$CUDA_LIB" ]]; then
    skipped "compute-sanitizer: no GPU or no CUDA library"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    skipped "compute-sanitizer: not installed"
else
    for tool in memcheck racecheck; do
        run_step "compute-sanitizer --tool $tool" 180 \
            compute-sanitizer --tool "$tool" --error-exitcode 9 "$PYTHON" -c "$SANITIZER_DRIVER" "$CUDA_LIB"
    done
fi

# ---- 4. timing -----------------------------------------------------------------------------
TIMING='
import sys, time
import numpy as np
from cspkv.engines import modality_topk as mt
rng = np.random.default_rng(1)
print("{:>3} {:>3} {:>5} {:>5} {:>10} {:>9}  equal".format("B", "H", "L", "C", "kernel ms", "C ref ms"))
ok = True
for length in (1024, 2048, 4096):
    for batch, heads in ((1, 32), (4, 8)):
        s = rng.random((batch, heads, length), dtype=np.float32)
        c = rng.random((batch, heads, length), dtype=np.float32)
        m = np.where(rng.random((batch, length)) < 0.7, 1, 0).astype(np.int32)
        m[:, length - length // 8:] = -1                      # 1/8 padding
        n_valid = (m >= 0).sum(-1)
        keep = np.ceil(0.2 * n_valid).astype(np.int32)        # budget 20%
        recent = np.minimum(keep, n_valid // 10).astype(np.int32)   # R = 10% of the valid keys
        t0 = time.perf_counter()
        ref = mt.modality_topk_ref(s, c, m, keep, recent, cross_ratio=0.5)
        ref_ms = (time.perf_counter() - t0) * 1e3
        gpu, ms = mt.modality_topk_cuda(s, c, m, keep, recent, cross_ratio=0.5, repeats=51)
        same = bool(np.array_equal(gpu, ref))
        ok &= same
        print(f"{batch:>3} {heads:>3} {length:>5} {int(keep.max()):>5} {ms:>10.4f} {ref_ms:>9.2f}  {same}")
sys.exit(0 if ok else 1)
'
step "4. timing (mean of 50 launches after a warm-up; CUDA events; B*H blocks)"
if [[ "$HAVE_GPU" != 1 || ! -f "$CUDA_LIB" ]]; then
    skipped "timing: no GPU or no CUDA library"
else
    run_step "timing L = 1024, 2048, 4096" 180 "$PYTHON" -c "$TIMING"
fi

# ---- 5. TensorRT plugin --------------------------------------------------------------------
step "5. TensorRT plugin (CMake, CSPKV_WITH_TENSORRT)"
TRT_HEADER=""
for dir in "${TENSORRT_ROOT:-}/include" /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu \
    /usr/include /usr/local/tensorrt/include /opt/tensorrt/include /usr/src/tensorrt/include; do
    if [[ -f "$dir/NvInfer.h" ]]; then TRT_HEADER="$dir/NvInfer.h"; break; fi
done
if [[ -z "$TRT_HEADER" ]]; then
    skipped "TensorRT plugin: NvInfer.h not found (set TENSORRT_ROOT to a TensorRT >= 10 prefix)"
elif ! command -v cmake >/dev/null 2>&1; then
    skipped "TensorRT plugin: cmake not found"
else
    echo "NvInfer.h: $TRT_HEADER"
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$(echo "$ARCHS" | tr ' ' ';')"
    [[ -n "${TENSORRT_ROOT:-}" ]] && CMAKE_ARGS="$CMAKE_ARGS -DTENSORRT_ROOT=$TENSORRT_ROOT"
    if timeout 400 make -C "$PLUGIN" plugin CMAKE_ARGS="$CMAKE_ARGS" 2>&1 | tee "$BUILD/plugin_build.log"; then
        if grep -q "TensorRT plugin ON" "$BUILD/plugin_build.log" && [[ -f "$BUILD/cmake/libcspkv_modality_topk_plugin.so" ]]; then
            ran "TensorRT plugin build ($BUILD/cmake/libcspkv_modality_topk_plugin.so)"
            nm -D --defined-only "$BUILD/cmake/libcspkv_modality_topk_plugin.so" | grep -E ' (getCreators|setLoggerFinder)$' || failed "plugin exports getCreators/setLoggerFinder"
        else
            failed "TensorRT plugin build: CMake turned the plugin off (see the warning above)"
        fi
    else
        failed "TensorRT plugin build"
    fi
fi

# ---- summary -------------------------------------------------------------------------------
step "summary"
for item in "${RAN[@]}"; do echo "RAN      $item"; done
for item in "${SKIPPED[@]}"; do echo "SKIPPED  $item"; done
for item in "${FAILED[@]}"; do echo "FAILED   $item"; done
[[ ${#FAILED[@]} -eq 0 ]]
