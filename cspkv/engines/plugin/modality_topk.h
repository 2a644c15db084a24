/*
 * Modality-aware top-k of Cross-Self Pruning (CSP): which key positions of one prefill the KV cache
 * keeps, per batch row and KV head. Three implementations share this header:
 *
 *   cspkv_modality_topk_ref   plain C11 reference (modality_topk_ref.c), readable, O(L log L)
 *   cspkv_modality_topk_cuda  CUDA kernel, one thread block per (b, h)  (modality_topk.cu)
 *   ModalityTopKPlugin        TensorRT IPluginV3 around the kernel      (ModalityTopKPlugin.cpp)
 *
 * Semantics: exactly CrossSelfPruning(variant="distinct").keep_mask (cspkv/pruning/csp.py) followed
 * by base.mask_to_indices, with ONNX TopK's tie rule for the tail. For batch row b and KV head h:
 *
 *   n_valid    = #{j : key_modality[b, j] >= 0}  (valid keys are a prefix of the L positions)
 *   C, R       = n_keep[b], n_recent[b]           (0 <= R <= C <= n_valid)
 *   recent     = {j valid : j >= n_valid - R};  candidates = valid and not recent
 *   K          = C - R;  K_c = floor(cross_ratio * K) in double precision;  K_s = K - K_c
 *   by_cross   = the K_c candidates of largest cross_scores[b, h, :]
 *   by_self    = the K_s candidates not in by_cross of largest self_scores[b, h, :]
 *   keep       = recent | by_cross | by_self
 *   out[b,h,:] = kept positions ascending, then not-kept positions ascending, first c_max of them.
 *
 * "Largest" is the policy's rank rule (base.top_k_mask): every position not allowed in a pass gets
 * the score -inf, all L positions are ordered by (score descending, index ascending) -- a stable
 * descending sort, which is also ONNX TopK's tie rule -- and an allowed position is taken when its
 * place in that order is < k. NaN ranks above +inf (torch.sort's rule) and -0.0 equals +0.0. With
 * finite scores this is simply "the k best candidates, lower index first on ties, all of them if
 * there are fewer than k". A candidate whose score is itself -inf can lose its place to a lower
 * not-allowed position, exactly as in the policy (which then keeps fewer than C keys).
 *
 * Layouts (row-major, contiguous): self_scores, cross_scores float32 [B, H, L]; key_modality int32
 * [B, L] (0 text, 1 image, -1 padding); n_keep, n_recent int32 [B]; out int64 [B, H, c_max].
 *
 * cross_ratio is a double, as in the policy. A TensorRT/ONNX attribute is float32, so float32 0.9f
 * is 0.89999997615814 and floor(0.89999997615814 * 10) = 8 where the policy's floor(0.9 * 10) = 9;
 * cspkv_ratio_from_float32 recovers the decimal the user wrote (0.9) before it is widened.
 */
#ifndef CSPKV_MODALITY_TOPK_H
#define CSPKV_MODALITY_TOPK_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define CSPKV_TOPK_API __declspec(dllexport)
#else
#define CSPKV_TOPK_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes (the ctypes binding mirrors this list in cspkv/engines/modality_topk.py). */
enum cspkv_topk_status {
    CSPKV_TOPK_OK = 0,
    CSPKV_TOPK_ERR_NULL_POINTER = 1,  /* an array argument is NULL                              */
    CSPKV_TOPK_ERR_SHAPE = 2,         /* batch, heads, length or c_max < 1, or c_max > length    */
    CSPKV_TOPK_ERR_RATIO = 3,         /* cross_ratio is NaN or outside [0, 1]                     */
    CSPKV_TOPK_ERR_MODALITY = 4,      /* a key_modality id outside {-1, 0, 1}, or padding first   */
    CSPKV_TOPK_ERR_BUDGET = 5,        /* not 0 <= n_recent <= n_keep <= n_valid for some row      */
    CSPKV_TOPK_ERR_OUT_OF_MEMORY = 6, /* scratch allocation failed                                */
    CSPKV_TOPK_ERR_TOO_LONG = 7,      /* CUDA: length needs more shared memory than the device has */
    CSPKV_TOPK_ERR_CUDA = 8           /* CUDA: a runtime call or the kernel launch failed         */
};

/* A fixed English message for a status code (never NULL). */
CSPKV_TOPK_API const char* cspkv_topk_status_string(int status);

/* The double nearest to the shortest decimal that round-trips to `ratio` as float32: 0.9f -> 0.9.
 * For a ratio the user wrote with at most 7 significant digits this is the double Python's float()
 * of that decimal gives, so floor(ratio * K) matches the policy. NaN and infinities pass through. */
CSPKV_TOPK_API double cspkv_ratio_from_float32(float ratio);

/* C reference. Validates every argument first (nothing is written on error) and returns a status.
 * Reads exactly B*H*L floats of each score array, B*L modality ids, B budgets; writes B*H*c_max
 * int64. c_max may differ from n_keep: fewer kept than c_max pads with not-kept positions, more
 * kept than c_max truncates. */
CSPKV_TOPK_API int cspkv_modality_topk_ref(const float* self_scores, const float* cross_scores,
                                           const int32_t* key_modality, const int32_t* n_keep,
                                           const int32_t* n_recent, int32_t batch, int32_t heads,
                                           int32_t length, int32_t c_max, double cross_ratio,
                                           int64_t* out);

#ifdef __cplusplus
} /* extern "C" */
#endif

/* ---- CUDA (modality_topk.cu); declared only for CUDA / C++ translation units that have the
 * runtime API, so the C reference builds without CUDA. ---------------------------------------- */
#if defined(__CUDACC__) || defined(CSPKV_TOPK_WITH_CUDA)
#include <cuda_runtime_api.h>
#ifdef __cplusplus
extern "C" {
#endif

/* Dynamic shared memory one block needs for `length` keys (the launcher opts in above 48 KiB). */
CSPKV_TOPK_API size_t cspkv_modality_topk_cuda_smem_bytes(int32_t length);

/* Enqueue the kernel on `stream`; all arrays are device pointers with the layouts above. Only the
 * scalar arguments are checked here (status returned). Row data (modality ids, budgets) is read on
 * the device: a bad row is clamped into range (C to [0, n_valid], R to [0, C]) so the kernel never
 * reads or writes out of bounds, and, when `device_status` (one int32, device memory) is not NULL,
 * the first such error code is stored there with atomicCAS (leave it 0 before the launch). */
CSPKV_TOPK_API int cspkv_modality_topk_cuda(const float* self_scores, const float* cross_scores,
                                            const int32_t* key_modality, const int32_t* n_keep,
                                            const int32_t* n_recent, int32_t batch, int32_t heads,
                                            int32_t length, int32_t c_max, double cross_ratio,
                                            int64_t* out, int32_t* device_status,
                                            cudaStream_t stream);

/* Convenience for tests and benchmarks (ctypes): host arrays in, host array out. Copies to the
 * device, runs the kernel `repeats` times (>= 1) on a private stream, copies back, and reports the
 * mean kernel time in milliseconds (CUDA events) in *mean_ms when it is not NULL. Row errors are
 * reported like the reference's (CSPKV_TOPK_ERR_MODALITY / _BUDGET), after the kernel ran. */
CSPKV_TOPK_API int cspkv_modality_topk_cuda_host(const float* self_scores, const float* cross_scores,
                                                 const int32_t* key_modality, const int32_t* n_keep,
                                                 const int32_t* n_recent, int32_t batch,
                                                 int32_t heads, int32_t length, int32_t c_max,
                                                 double cross_ratio, int64_t* out, int32_t repeats,
                                                 float* mean_ms);

/* Number of CUDA devices visible (0 when there is none or no driver). */
CSPKV_TOPK_API int cspkv_modality_topk_cuda_device_count(void);

#ifdef __cplusplus
} /* extern "C" */
#endif
#endif /* __CUDACC__ || CSPKV_TOPK_WITH_CUDA */

#endif /* CSPKV_MODALITY_TOPK_H */
