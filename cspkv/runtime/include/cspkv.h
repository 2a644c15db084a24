/*
 * libcspkv: the fixed-budget KV buffer of one sequence, with its slot table.
 *
 * The buffer owns the K/V memory of every layer, laid out contiguously as
 *     [layers, 2 (K then V), kv_heads, slots, head_dim]
 * in fp32 or fp16 (fp16 values are stored as opaque 2-byte values: the library only copies K/V,
 * it never does arithmetic on them). The number of slots is fixed at creation and the memory never
 * grows afterwards.
 *
 * The slot metadata (valid, position, modality, score per [layer, kv_head, slot]) follows exactly
 * the Python reference cspkv/runtime/slot_reference.py (class SlotTable); the library adds the
 * argument checks listed at each function. One decode step is:
 *     cspkv_choose_write_slots -> cspkv_attention_bias -> (model step) -> cspkv_write_token
 *     -> cspkv_accumulate (re-score eviction only).
 *
 * Every function returns a cspkv_status; on an error nothing observable changes (except where a
 * function says otherwise), so the buffer stays usable. Array arguments come with their length in
 * elements (bytes for K/V) so that a shape mismatch is an error rather than an out-of-bounds access.
 * A buffer is not thread-safe; distinct buffers are independent.
 */
#ifndef CSPKV_H
#define CSPKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change of this header (struct layout, signatures, enum values). */
#define CSPKV_ABI_VERSION 1

#if defined(__GNUC__)
#define CSPKV_API __attribute__((visibility("default")))
#else
#define CSPKV_API
#endif

typedef enum cspkv_status {
    CSPKV_OK = 0,
    CSPKV_ERR_NULL_POINTER = 1,       /* a required pointer argument is NULL */
    CSPKV_ERR_INVALID_ARGUMENT = 2,   /* a value is out of its domain (config, position, score...) */
    CSPKV_ERR_SIZE_MISMATCH = 3,      /* an array length does not match the buffer's shape */
    CSPKV_ERR_SLOT_OUT_OF_RANGE = 4,  /* a slot index is not a usable slot (the null slot isn't) */
    CSPKV_ERR_CAPACITY = 5,           /* more prompt entries than usable slots */
    CSPKV_ERR_BAD_STATE = 6,          /* call out of order (write_token without its choose) */
    CSPKV_ERR_NO_EVICTABLE = 7,       /* no free slot and the eviction may evict nothing */
    CSPKV_ERR_DUPLICATE_POSITION = 8, /* a position would be held twice in one (layer, head) */
    CSPKV_ERR_OUT_OF_MEMORY = 9,      /* allocation failed, or the buffer size overflows size_t */
    CSPKV_ERR_COPY_FAILED = 10,       /* the allocator's copy hook reported an error */
    CSPKV_ERR_ABI_MISMATCH = 11,      /* config.abi_version != the library's ABI version */
    CSPKV_ERR_NON_FINITE = 12         /* a K/V value, score or mass is NaN or infinite */
} cspkv_status;

typedef enum cspkv_dtype { CSPKV_DTYPE_F32 = 0, CSPKV_DTYPE_F16 = 1 } cspkv_dtype;

/* RING: overwrite the oldest generated token (position >= prompt_len).
 * RESCORE: evict the lowest-score valid slot that is neither among the n_recent most recent
 * positions nor a sink (position < n_sink); ties go to the lowest slot index. */
typedef enum cspkv_eviction { CSPKV_EVICT_RING = 0, CSPKV_EVICT_RESCORE = 1 } cspkv_eviction;

typedef struct cspkv_config {
    uint32_t abi_version; /* must be CSPKV_ABI_VERSION: catches a header/library mismatch */
    int32_t n_layers;     /* >= 1 */
    int32_t n_kv_heads;   /* >= 1 */
    int32_t n_slots;      /* >= 1, the null slot included; >= 2 with a null slot */
    int32_t head_dim;     /* >= 1 */
    int32_t dtype;        /* cspkv_dtype */
    int32_t eviction;     /* cspkv_eviction */
    int32_t n_recent;     /* >= 0, RESCORE only */
    int32_t n_sink;       /* >= 0, RESCORE only */
    int32_t has_null_slot; /* 0 or 1: the last slot is the n-softmax null slot (K = V = 0) */
    float null_logit;     /* finite; the null slot's attention bias (log n) */
} cspkv_config;

/* What a copy hook is asked to copy. */
typedef enum cspkv_copy_kind {
    CSPKV_COPY_FROM_CALLER = 0, /* src is K/V the caller passed to load_prefill / write_token */
    CSPKV_COPY_HOST_ZEROS = 1   /* src is a block of zeros in host memory, owned by the library */
} cspkv_copy_kind;

/*
 * Where the K/V memory lives. NULL means host memory (64-byte aligned). A GPU runtime passes hooks
 * that allocate device memory and copy into it; the library never dereferences the K/V memory
 * itself when hooks are given, it only computes addresses inside it.
 */
typedef struct cspkv_allocator {
    /* Returns nbytes of memory, or NULL. Called once, by cspkv_create. */
    void *(*alloc)(void *user, size_t nbytes);
    /* Releases what alloc returned. Called once, by cspkv_destroy (or by a failing create). */
    void (*free)(void *user, void *ptr, size_t nbytes);
    /* Copies nbytes from src to dst (dst lies inside the K/V memory). Returns 0 on success. */
    int (*copy)(void *user, void *dst, const void *src, size_t nbytes, int kind /* cspkv_copy_kind */);
    void *user; /* passed back to every hook */
} cspkv_allocator;

typedef struct cspkv_buffer cspkv_buffer; /* opaque */

CSPKV_API int cspkv_abi_version(void);
/* Static, never NULL; "unknown status" for a value that is not a cspkv_status. */
CSPKV_API const char *cspkv_status_string(int status);

/* Fills *cfg with ABI version, fp32, ring, no recent/sink, no null slot (sizes left at 0). */
CSPKV_API int cspkv_config_init(cspkv_config *cfg);

/* Allocates the K/V memory (zeroed) and the metadata (all slots free). allocator may be NULL
 * (host memory); when given, its three hooks must be non-NULL and it is copied. */
CSPKV_API int cspkv_create(const cspkv_config *cfg, const cspkv_allocator *allocator,
                           cspkv_buffer **out);
CSPKV_API void cspkv_destroy(cspkv_buffer *buf); /* NULL is a no-op */

/* What the last failing mutating call on `buf` (reset, load_prefill, choose_write_slots,
 * write_token, accumulate) found, naming the argument and the value, e.g.
 * "kv_delta: non-finite value (nan) at layer 2, V, kv_head 1, dim 17"; "" once such a call
 * succeeds, and for NULL. Owned by the buffer, valid until its next mutating call. */
CSPKV_API const char *cspkv_last_error(const cspkv_buffer *buf);

/* Frees every slot, sets prompt_len to 0, cancels a pending choice, re-zeroes the null slot's K/V.
 * CSPKV_ERR_COPY_FAILED leaves the metadata reset. */
CSPKV_API int cspkv_reset(cspkv_buffer *buf);

/*
 * Resets, then fills slots 0..n_valid[l,h]-1 of every (layer, head) with the pruned prompt.
 *   kv:        [layers, 2, kv_heads, c, head_dim] in the buffer's dtype, kv_nbytes bytes
 *   positions: int64 [layers, kv_heads, c]; modality: int8, scores: float (optional, NULL = 0),
 *              all n_entries = layers * kv_heads * c long
 *   n_valid:   int32 [layers, kv_heads], each in [0, c]; entries at or past it are ignored
 * Checks: 0 <= c <= usable slots (else CAPACITY); prompt_len >= 0; each loaded entry has
 * 0 <= position < prompt_len, positions distinct per (layer, head), modality >= 0, a finite score
 * and finite K/V (NON_FINITE; K/V are checked only in host memory, i.e. without an allocator,
 * since the library never reads hook-allocated memory: such callers check their own values).
 * kv/positions/modality may be NULL when c == 0. CSPKV_ERR_COPY_FAILED leaves the buffer reset.
 */
CSPKV_API int cspkv_load_prefill(cspkv_buffer *buf, int64_t c, const void *kv, size_t kv_nbytes,
                                 const int64_t *positions, const int8_t *modality,
                                 const float *scores, size_t n_entries, const int32_t *n_valid,
                                 size_t n_valid_len, int64_t prompt_len);

/*
 * Picks, per (layer, head), the slot the token at `position` will occupy: the lowest free usable
 * slot, else the eviction's victim, which is invalidated at once. slots_out: int32 [layers, kv_heads].
 * Checks: position >= prompt_len (decode tokens are generated tokens) and not already held by a
 * valid slot (DUPLICATE_POSITION). All-or-nothing: on NO_EVICTABLE no slot is invalidated.
 * The choice stays pending until cspkv_write_token; choosing again replaces it.
 */
CSPKV_API int cspkv_choose_write_slots(cspkv_buffer *buf, int64_t position, int32_t *slots_out,
                                       size_t n_out);

/* bias_out: float [layers, kv_heads, slots]: 0 valid, -INFINITY free, null_logit at the null slot. */
CSPKV_API int cspkv_attention_bias(const cspkv_buffer *buf, float *bias_out, size_t n_out);

/*
 * Copies the new token's K/V into `slots` and marks them valid (position, modality, score 0).
 *   slots:    int32 [layers, kv_heads], must equal the pending cspkv_choose_write_slots result,
 *             and position must equal its position (else BAD_STATE)
 *   kv_delta: [layers, 2, 1, kv_heads, 1, head_dim] in the buffer's dtype (an ONNX decode graph's
 *             present-K/V delta), kv_nbytes bytes; every value finite (NON_FINITE; checked in
 *             host memory only, as load_prefill)
 * On COPY_FAILED nothing is committed and the choice stays pending, so the call can be retried.
 */
CSPKV_API int cspkv_write_token(cspkv_buffer *buf, const int32_t *slots, size_t n_slots,
                                const void *kv_delta, size_t kv_nbytes, int64_t position,
                                int32_t modality);

/* Adds mass[l,h,s] to the score of every valid slot (entries of free slots are ignored).
 * mass: float [layers, kv_heads, slots]. Rejects a non-finite mass, or one that would make a
 * score non-finite, for a valid slot (NON_FINITE, nothing added). */
CSPKV_API int cspkv_accumulate(cspkv_buffer *buf, const float *mass, size_t n_mass);

/* Copy-out getters; arrays are [layers, kv_heads, slots] unless noted. Free slots read
 * valid 0, position -1, modality -1, score 0. */
CSPKV_API int cspkv_get_valid(const cspkv_buffer *buf, uint8_t *out, size_t n_out);
CSPKV_API int cspkv_get_positions(const cspkv_buffer *buf, int64_t *out, size_t n_out);
CSPKV_API int cspkv_get_modality(const cspkv_buffer *buf, int8_t *out, size_t n_out);
CSPKV_API int cspkv_get_scores(const cspkv_buffer *buf, float *out, size_t n_out);
CSPKV_API int cspkv_get_n_valid(const cspkv_buffer *buf, int32_t *out /* [layers, kv_heads] */,
                                size_t n_out);
CSPKV_API int cspkv_get_prompt_len(const cspkv_buffer *buf, int64_t *out);
CSPKV_API int cspkv_get_config(const cspkv_buffer *buf, cspkv_config *out);

/* The K/V memory (host or hook-allocated), valid until cspkv_destroy. */
CSPKV_API int cspkv_kv_pointer(const cspkv_buffer *buf, void **out);
/* Bytes held: K/V memory, and host memory for metadata and scratch. Either out may be NULL. */
CSPKV_API int cspkv_bytes_held(const cspkv_buffer *buf, size_t *kv_bytes, size_t *host_bytes);

#ifdef __cplusplus
}
#endif

#endif /* CSPKV_H */
