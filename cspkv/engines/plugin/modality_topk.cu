// CUDA kernel of CSP's modality-aware top-k (semantics: modality_topk.h; reference:
// modality_topk_ref.c). One thread block handles one (batch row, KV head):
//
//   1. count the valid keys (__syncthreads_count), check the row, mark recent / candidate keys;
//   2. pass "cross" then pass "self": each builds one 64-bit key per position,
//        high 32 bits = ~orderable(score or -inf when not allowed), low 32 bits = index,
//      so that ascending key order is the policy's order (score descending, NaN first, index
//      ascending); a bitonic sort in shared memory puts it in order, and the allowed positions among
//      the first k places are kept -- the same rank rule as base.top_k_mask;
//   3. an exclusive block scan of the kept flags gives every position its output slot: kept ones
//      first in ascending order, then the others, written only where the slot is < c_max.
//
// Shared memory: 8 * next_pow2(L) + L bytes (36 KiB for L = 4096; the launcher opts in above
// 48 KiB, so L = 16384 fits on sm_87 and sm_90). Work per block: O(L log^2 L) compare-exchanges
// spread over up to 512 threads; a pass whose k is 0 is skipped.
#include "modality_topk.h"

#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

namespace {

constexpr int kMaxThreads = 512;
constexpr unsigned char kPadding = 0, kCandidate = 1, kKept = 2;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kStaticSmemMargin = 1024;  // warp sums and the total, with room to spare

// Monotone map float -> uint32 (a < b  <=>  map(a) < map(b)); -0.0 maps like +0.0, every NaN to the
// top. Bit operations only, so no compiler flag can fold the -0.0 case away.
__device__ __forceinline__ uint32_t orderable(float x)
{
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0u) {
        return 0xFFFFFFFFu;  // NaN ranks above +inf, as in torch.sort
    }
    if ((u & 0x7FFFFFFFu) == 0u) {
        u = 0u;  // -0.0 == +0.0
    }
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t sort_key(float score, uint32_t index)
{
    return (static_cast<uint64_t>(~orderable(score)) << 32) | index;
}

// Ascending bitonic sort of n (a power of two) keys in shared memory, by the whole block.
__device__ void bitonic_sort(uint64_t* keys, int n)
{
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
                const int lo = 2 * t - (t & (stride - 1));
                const int hi = lo + stride;
                const bool ascending = (lo & size) == 0;
                const uint64_t a = keys[lo];
                const uint64_t b = keys[hi];
                if ((a > b) == ascending) {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    }
}

// base.top_k_mask(scores, state == candidate, k): candidates among the first k places become kept.
// k is the same for the whole block, so the early return keeps the barriers uniform.
__device__ void take_top(const float* __restrict__ scores, unsigned char* state, uint64_t* keys,
                         int length, int padded, long long k)
{
    if (k <= 0) {
        return;
    }
    for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const float s = (i < length && state[i] == kCandidate) ? scores[i] : -INFINITY;
        keys[i] = sort_key(s, static_cast<uint32_t>(i));
    }
    __syncthreads();
    bitonic_sort(keys, padded);
    const int places = k < length ? static_cast<int>(k) : length;
    for (int p = threadIdx.x; p < places; p += blockDim.x) {
        const uint32_t j = static_cast<uint32_t>(keys[p] & 0xFFFFFFFFull);
        if (j < static_cast<uint32_t>(length) && state[j] == kCandidate) {
            state[j] = kKept;
        }
    }
    __syncthreads();
}

// Exclusive prefix sum of one int per thread over the block (blockDim.x a multiple of 32).
__device__ void block_exclusive_scan(int value, int* exclusive, int* total)
{
    __shared__ int warp_sums[kMaxThreads / 32];
    __shared__ int block_total;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    int inclusive = value;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
        if (lane >= offset) {
            inclusive += other;
        }
    }
    if (lane == 31) {
        warp_sums[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = blockDim.x >> 5;
        const int mine = lane < n_warps ? warp_sums[lane] : 0;
        int running = mine;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const int other = __shfl_up_sync(0xFFFFFFFFu, running, offset);
            if (lane >= offset) {
                running += other;
            }
        }
        if (lane < n_warps) {
            warp_sums[lane] = running - mine;
        }
        if (lane == n_warps - 1) {
            block_total = running;
        }
    }
    __syncthreads();
    *exclusive = warp_sums[warp] + inclusive - value;
    *total = block_total;
}

__global__ void __launch_bounds__(kMaxThreads)
modality_topk_kernel(const float* __restrict__ self_scores, const float* __restrict__ cross_scores,
                     const int32_t* __restrict__ key_modality, const int32_t* __restrict__ n_keep,
                     const int32_t* __restrict__ n_recent, int heads, int length, int padded,
                     int c_max, double cross_ratio, int64_t* __restrict__ out,
                     int32_t* __restrict__ device_status)
{
    extern __shared__ __align__(16) unsigned char smem[];
    uint64_t* keys = reinterpret_cast<uint64_t*>(smem);
    unsigned char* state = smem + static_cast<size_t>(padded) * sizeof(uint64_t);

    const long long row = blockIdx.x;  // b * heads + h
    const long long b = row / heads;
    const int32_t* modality = key_modality + b * length;
    const float* self_row = self_scores + row * length;
    const float* cross_row = cross_scores + row * length;
    int64_t* out_row = out + row * c_max;

    // 1. n_valid, row checks, regions.
    int n_valid = 0;
    for (int base = 0; base < length; base += blockDim.x) {
        const int j = base + threadIdx.x;
        n_valid += __syncthreads_count(j < length && modality[j] >= 0);
    }
    int bad_modality = 0;
    for (int base = 0; base < length; base += blockDim.x) {
        const int j = base + threadIdx.x;
        int bad = 0;
        if (j < length) {
            const int32_t m = modality[j];
            bad = m < -1 || m > 1 || ((m >= 0) != (j < n_valid));
        }
        bad_modality |= __syncthreads_or(bad);
    }
    const int keep_raw = n_keep[b];
    const int recent_raw = n_recent[b];
    const bool bad_budget =
        keep_raw < 0 || keep_raw > n_valid || recent_raw < 0 || recent_raw > keep_raw;
    const int keep = min(max(keep_raw, 0), n_valid);      // C, clamped for bad rows
    const int recent = min(max(recent_raw, 0), keep);     // R
    if (device_status != nullptr && threadIdx.x == 0 && (bad_modality || bad_budget)) {
        atomicCAS(device_status, 0,
                  bad_modality ? CSPKV_TOPK_ERR_MODALITY : CSPKV_TOPK_ERR_BUDGET);
    }
    for (int j = threadIdx.x; j < length; j += blockDim.x) {
        unsigned char s = kPadding;
        if (modality[j] >= 0) {
            s = j >= n_valid - recent ? kKept : kCandidate;
        }
        state[j] = s;
    }
    __syncthreads();

    // 2. K = C - R; K_c = floor(rho * K) in double, as base.floor_ratio; K_s = K - K_c.
    const long long selectable = static_cast<long long>(keep) - recent;
    const long long cross_k = static_cast<long long>(floor(cross_ratio * static_cast<double>(selectable)));
    const long long self_k = selectable - cross_k;
    take_top(cross_row, state, keys, length, padded, cross_k);  // by_cross
    take_top(self_row, state, keys, length, padded, self_k);    // by_self among the rest

    // 3. Output slots: each thread owns a contiguous chunk of positions.
    const int chunk = (length + blockDim.x - 1) / blockDim.x;
    const int lo = min(static_cast<int>(threadIdx.x) * chunk, length);
    const int hi = min(lo + chunk, length);
    int mine = 0;
    for (int j = lo; j < hi; ++j) {
        mine += state[j] == kKept;
    }
    int kept_before = 0;
    int kept_total = 0;
    block_exclusive_scan(mine, &kept_before, &kept_total);
    for (int j = lo; j < hi; ++j) {
        int slot;
        if (state[j] == kKept) {
            slot = kept_before++;
        } else {
            slot = kept_total + (j - kept_before);  // not-kept positions before j, after all kept
        }
        if (slot < c_max) {
            out_row[slot] = j;
        }
    }
}

int next_pow2(int n)
{
    int p = 1;
    while (p < n) {
        p <<= 1;
    }
    return p;
}

}  // namespace

extern "C" size_t cspkv_modality_topk_cuda_smem_bytes(int32_t length)
{
    if (length < 1 || length > (1 << 28)) {
        return 0;
    }
    return static_cast<size_t>(next_pow2(length)) * sizeof(uint64_t) + static_cast<size_t>(length);
}

extern "C" int cspkv_modality_topk_cuda(const float* self_scores, const float* cross_scores,
                                        const int32_t* key_modality, const int32_t* n_keep,
                                        const int32_t* n_recent, int32_t batch, int32_t heads,
                                        int32_t length, int32_t c_max, double cross_ratio,
                                        int64_t* out, int32_t* device_status, cudaStream_t stream)
{
    if (!self_scores || !cross_scores || !key_modality || !n_keep || !n_recent || !out) {
        return CSPKV_TOPK_ERR_NULL_POINTER;
    }
    if (batch < 1 || heads < 1 || length < 1 || c_max < 1 || c_max > length) {
        return CSPKV_TOPK_ERR_SHAPE;
    }
    const long long rows = static_cast<long long>(batch) * heads;
    if (rows > 0x7FFFFFFFLL) {
        return CSPKV_TOPK_ERR_SHAPE;  // one block per row: gridDim.x limit
    }
    if (!(cross_ratio >= 0.0 && cross_ratio <= 1.0)) {
        return CSPKV_TOPK_ERR_RATIO;
    }
    const size_t smem = cspkv_modality_topk_cuda_smem_bytes(length);
    int device = 0;
    int optin = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
            cudaSuccess) {
        return CSPKV_TOPK_ERR_CUDA;
    }
    if (smem == 0 || smem + kStaticSmemMargin > static_cast<size_t>(optin)) {
        return CSPKV_TOPK_ERR_TOO_LONG;
    }
    if (smem > kDefaultSmem &&
        cudaFuncSetAttribute(modality_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess) {
        return CSPKV_TOPK_ERR_TOO_LONG;
    }
    const int padded = next_pow2(length);
    int threads = padded / 2;
    threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
    modality_topk_kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(
        self_scores, cross_scores, key_modality, n_keep, n_recent, heads, length, padded, c_max,
        cross_ratio, out, device_status);
    return cudaGetLastError() == cudaSuccess ? CSPKV_TOPK_OK : CSPKV_TOPK_ERR_CUDA;
}

extern "C" int cspkv_modality_topk_cuda_device_count(void)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // reset the (non-sticky) "no device" error
        return 0;
    }
    return count;
}

namespace {

// Frees whatever was allocated, whichever way the host wrapper leaves.
struct DeviceBuffers {
    void* ptr[7] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    cudaStream_t stream = nullptr;
    cudaEvent_t start = nullptr;
    cudaEvent_t stop = nullptr;
    ~DeviceBuffers()
    {
        for (void* p : ptr) {
            if (p) {
                cudaFree(p);
            }
        }
        if (start) {
            cudaEventDestroy(start);
        }
        if (stop) {
            cudaEventDestroy(stop);
        }
        if (stream) {
            cudaStreamDestroy(stream);
        }
    }
};

}  // namespace

extern "C" int cspkv_modality_topk_cuda_host(const float* self_scores, const float* cross_scores,
                                             const int32_t* key_modality, const int32_t* n_keep,
                                             const int32_t* n_recent, int32_t batch, int32_t heads,
                                             int32_t length, int32_t c_max, double cross_ratio,
                                             int64_t* out, int32_t repeats, float* mean_ms)
{
    if (!self_scores || !cross_scores || !key_modality || !n_keep || !n_recent || !out) {
        return CSPKV_TOPK_ERR_NULL_POINTER;
    }
    if (batch < 1 || heads < 1 || length < 1 || c_max < 1 || c_max > length || repeats < 1) {
        return CSPKV_TOPK_ERR_SHAPE;
    }
    const size_t rows = static_cast<size_t>(batch) * static_cast<size_t>(heads);
    const size_t sizes[7] = {
        rows * length * sizeof(float),                      // self_scores
        rows * length * sizeof(float),                      // cross_scores
        static_cast<size_t>(batch) * length * sizeof(int32_t),  // key_modality
        static_cast<size_t>(batch) * sizeof(int32_t),       // n_keep
        static_cast<size_t>(batch) * sizeof(int32_t),       // n_recent
        rows * c_max * sizeof(int64_t),                     // out
        sizeof(int32_t),                                    // device status
    };
    const void* host_in[5] = {self_scores, cross_scores, key_modality, n_keep, n_recent};
    DeviceBuffers d;
    for (int i = 0; i < 7; ++i) {
        if (cudaMalloc(&d.ptr[i], sizes[i]) != cudaSuccess) {
            return CSPKV_TOPK_ERR_CUDA;
        }
    }
    if (cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaEventCreate(&d.start) != cudaSuccess || cudaEventCreate(&d.stop) != cudaSuccess) {
        return CSPKV_TOPK_ERR_CUDA;
    }
    for (int i = 0; i < 5; ++i) {
        if (cudaMemcpyAsync(d.ptr[i], host_in[i], sizes[i], cudaMemcpyHostToDevice, d.stream) !=
            cudaSuccess) {
            return CSPKV_TOPK_ERR_CUDA;
        }
    }
    if (cudaMemsetAsync(d.ptr[6], 0, sizeof(int32_t), d.stream) != cudaSuccess ||
        cudaMemsetAsync(d.ptr[5], 0xFF, sizes[5], d.stream) != cudaSuccess) {  // -1: unwritten
        return CSPKV_TOPK_ERR_CUDA;
    }
    int status = CSPKV_TOPK_OK;
    for (int r = 0; r < repeats && status == CSPKV_TOPK_OK; ++r) {
        if (r == (repeats > 1 ? 1 : 0)) {  // the first of several runs is a warm-up
            cudaEventRecord(d.start, d.stream);
        }
        status = cspkv_modality_topk_cuda(
            static_cast<const float*>(d.ptr[0]), static_cast<const float*>(d.ptr[1]),
            static_cast<const int32_t*>(d.ptr[2]), static_cast<const int32_t*>(d.ptr[3]),
            static_cast<const int32_t*>(d.ptr[4]), batch, heads, length, c_max, cross_ratio,
            static_cast<int64_t*>(d.ptr[5]), static_cast<int32_t*>(d.ptr[6]), d.stream);
    }
    if (status != CSPKV_TOPK_OK) {
        return status;
    }
    cudaEventRecord(d.stop, d.stream);
    int32_t row_status = 0;
    if (cudaMemcpyAsync(out, d.ptr[5], sizes[5], cudaMemcpyDeviceToHost, d.stream) != cudaSuccess ||
        cudaMemcpyAsync(&row_status, d.ptr[6], sizeof row_status, cudaMemcpyDeviceToHost,
                        d.stream) != cudaSuccess ||
        cudaStreamSynchronize(d.stream) != cudaSuccess) {
        return CSPKV_TOPK_ERR_CUDA;
    }
    if (mean_ms) {
        float total_ms = 0.0f;
        if (cudaEventElapsedTime(&total_ms, d.start, d.stop) != cudaSuccess) {
            return CSPKV_TOPK_ERR_CUDA;
        }
        *mean_ms = total_ms / static_cast<float>(repeats > 1 ? repeats - 1 : 1);
    }
    return row_status;
}
