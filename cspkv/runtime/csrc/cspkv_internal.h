/* Private state of a cspkv_buffer, shared by cspkv.c (lifecycle, memory, getters) and slots.c
 * (the slot-table semantics of slot_reference.py). */
#ifndef CSPKV_INTERNAL_H
#define CSPKV_INTERNAL_H

#include "cspkv.h"

struct cspkv_buffer {
    cspkv_config cfg;
    cspkv_allocator mem; /* the default host hooks when the caller gave none */
    int host_kv;         /* no allocator given: K/V (the caller's and ours) are host memory */

    /* Sizes, computed once at create with overflow checks so that later index arithmetic in
     * size_t cannot overflow. */
    size_t elem;     /* bytes per K/V value: 4 or 2 */
    size_t n_lh;     /* layers * kv_heads */
    size_t n_meta;   /* layers * kv_heads * slots */
    size_t row_bytes; /* slots * head_dim * elem: one (layer, K|V, head) row of the buffer */
    size_t kv_bytes;
    size_t host_bytes;
    int32_t n_usable; /* slots a token may occupy: n_slots minus the null slot */

    void *kv; /* [layers, 2, kv_heads, slots, head_dim] */

    /* Slot metadata, [layers, kv_heads, slots] as in SlotTable. */
    uint8_t *valid;
    int64_t *position;
    int8_t *modality;
    float *score;
    int64_t prompt_len;

    /* The last cspkv_choose_write_slots result, which cspkv_write_token must match. */
    int has_pending;
    int64_t pending_position;
    int32_t *pending_slots; /* [layers, kv_heads] */

    /* Scratch allocated at create, so no call allocates afterwards. */
    int32_t *chosen;     /* [layers, kv_heads]: choose computes here before committing */
    int64_t *sorted;     /* [slots]: prefill sorts one head's positions here to find duplicates */
    void *zero_head;     /* head_dim * elem host zeros, copied over the null slot */

    char error[224];     /* cspkv_last_error: what the last failing mutating call found */
};

/* Byte offset of (layer, kv, head, slot) in the K/V memory. */
static inline size_t cspkv_kv_offset(const cspkv_buffer *b, size_t l, size_t kv, size_t h, size_t s) {
    size_t row = (l * 2 + kv) * (size_t)b->cfg.n_kv_heads + h;
    return row * b->row_bytes + s * (size_t)b->cfg.head_dim * b->elem;
}

/* Records the detail of a failure (printf-style) in b->error and returns status. */
int cspkv_fail(cspkv_buffer *b, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Index of the first non-finite value among n K/V values of `elem` bytes (fp32 or fp16 bit
 * patterns), or n if all are finite. */
size_t cspkv_first_non_finite(const void *values, size_t n, size_t elem);

/* Copies into the K/V memory through the allocator's hook; 0 on success. */
int cspkv_copy_in(cspkv_buffer *b, size_t dst_offset, const void *src, size_t nbytes, int kind);

/* Frees every slot's metadata and the pending choice; writes no K/V. */
void cspkv_clear_metadata(cspkv_buffer *b);

/* Zeroes the null slot's K and V (no-op without a null slot). */
int cspkv_zero_null_slot(cspkv_buffer *b);

#endif /* CSPKV_INTERNAL_H */
