/* Lifecycle, K/V memory and getters of a cspkv_buffer. The slot-table semantics are in slots.c. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cspkv_internal.h"

#define KV_ALIGN 64              /* cache line / SIMD width; also what cudaMalloc-like hooks give */
#define ZERO_CHUNK (1u << 20)    /* host zeros copied per hook call when clearing the buffer at create */

int cspkv_abi_version(void) { return CSPKV_ABI_VERSION; }

const char *cspkv_status_string(int status) {
    switch (status) {
    case CSPKV_OK: return "ok";
    case CSPKV_ERR_NULL_POINTER: return "a required pointer argument is NULL";
    case CSPKV_ERR_INVALID_ARGUMENT: return "invalid argument value";
    case CSPKV_ERR_SIZE_MISMATCH: return "array size does not match the buffer shape";
    case CSPKV_ERR_SLOT_OUT_OF_RANGE: return "slot index out of range (or the null slot)";
    case CSPKV_ERR_CAPACITY: return "more prompt entries than usable slots";
    case CSPKV_ERR_BAD_STATE: return "call out of order: write_token must follow choose_write_slots "
                                     "with the same slots and position";
    case CSPKV_ERR_NO_EVICTABLE: return "no free slot and the eviction may evict none "
                                        "(ring: no generated token; rescore: all recent or sink)";
    case CSPKV_ERR_DUPLICATE_POSITION: return "position already held by a valid slot of the same "
                                              "layer and head";
    case CSPKV_ERR_OUT_OF_MEMORY: return "out of memory (or buffer size overflows)";
    case CSPKV_ERR_COPY_FAILED: return "the allocator's copy hook failed";
    case CSPKV_ERR_ABI_MISMATCH: return "config.abi_version does not match the library";
    case CSPKV_ERR_NON_FINITE: return "non-finite value (NaN or infinity)";
    default: return "unknown status";
    }
}

const char *cspkv_last_error(const cspkv_buffer *b) { return b ? b->error : ""; }

int cspkv_fail(cspkv_buffer *b, int status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(b->error, sizeof b->error, fmt, args); /* truncates, always terminated */
    va_end(args);
    return status;
}

size_t cspkv_first_non_finite(const void *values, size_t n, size_t elem) {
    /* Bit tests rather than isfinite: fp16 has no C type, and fp32 is read through memcpy so
     * that any alignment of the caller's array is fine. All exponent bits set = inf or NaN. */
    const unsigned char *p = values;
    if (elem == 4) {
        for (size_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, p + i * 4, 4);
            if ((bits & 0x7f800000u) == 0x7f800000u) return i;
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            uint16_t bits;
            memcpy(&bits, p + i * 2, 2);
            if ((bits & 0x7c00u) == 0x7c00u) return i;
        }
    }
    return n;
}

int cspkv_config_init(cspkv_config *cfg) {
    if (!cfg) return CSPKV_ERR_NULL_POINTER;
    memset(cfg, 0, sizeof *cfg);
    cfg->abi_version = CSPKV_ABI_VERSION;
    cfg->dtype = CSPKV_DTYPE_F32;
    cfg->eviction = CSPKV_EVICT_RING;
    return CSPKV_OK;
}

/* ---- default host memory hooks ---- */

static void *host_alloc(void *user, size_t nbytes) {
    (void)user;
    size_t rounded = (nbytes + KV_ALIGN - 1) / KV_ALIGN * KV_ALIGN; /* aligned_alloc needs a multiple */
    if (rounded < nbytes) return NULL;
    return aligned_alloc(KV_ALIGN, rounded);
}

static void host_free(void *user, void *ptr, size_t nbytes) {
    (void)user;
    (void)nbytes;
    free(ptr);
}

static int host_copy(void *user, void *dst, const void *src, size_t nbytes, int kind) {
    (void)user;
    (void)kind;
    memcpy(dst, src, nbytes);
    return 0;
}

int cspkv_copy_in(cspkv_buffer *b, size_t dst_offset, const void *src, size_t nbytes, int kind) {
    if (nbytes == 0) return 0; /* nothing to do; also keeps a NULL src of an empty prefill away from memcpy */
    return b->mem.copy(b->mem.user, (char *)b->kv + dst_offset, src, nbytes, kind);
}

/* ---- create / destroy ---- */

/* a * b (a + b) into *out, false on size_t overflow. */
static int mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

static int add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

static int check_config(const cspkv_config *c) {
    if (c->abi_version != CSPKV_ABI_VERSION) return CSPKV_ERR_ABI_MISMATCH;
    if (c->n_layers < 1 || c->n_kv_heads < 1 || c->n_slots < 1 || c->head_dim < 1)
        return CSPKV_ERR_INVALID_ARGUMENT;
    if (c->dtype != CSPKV_DTYPE_F32 && c->dtype != CSPKV_DTYPE_F16) return CSPKV_ERR_INVALID_ARGUMENT;
    if (c->eviction != CSPKV_EVICT_RING && c->eviction != CSPKV_EVICT_RESCORE)
        return CSPKV_ERR_INVALID_ARGUMENT;
    if (c->n_recent < 0 || c->n_sink < 0) return CSPKV_ERR_INVALID_ARGUMENT;
    if (c->has_null_slot != 0 && c->has_null_slot != 1) return CSPKV_ERR_INVALID_ARGUMENT;
    if (c->has_null_slot && (c->n_slots < 2 || !isfinite(c->null_logit)))
        return CSPKV_ERR_INVALID_ARGUMENT;
    return CSPKV_OK;
}

/* Fills the size fields; false if any size overflows size_t. */
static int compute_sizes(cspkv_buffer *b) {
    const cspkv_config *c = &b->cfg;
    size_t rows;
    b->elem = c->dtype == CSPKV_DTYPE_F16 ? 2 : 4;
    if (!mul_size((size_t)c->n_layers, (size_t)c->n_kv_heads, &b->n_lh)) return 0;
    if (!mul_size(b->n_lh, (size_t)c->n_slots, &b->n_meta)) return 0;
    if (!mul_size((size_t)c->n_slots, (size_t)c->head_dim, &b->row_bytes)) return 0;
    if (!mul_size(b->row_bytes, b->elem, &b->row_bytes)) return 0;
    if (!mul_size(b->n_lh, 2, &rows) || !mul_size(rows, b->row_bytes, &b->kv_bytes)) return 0;
    /* Per-slot metadata: valid (1) + position (8) + modality (1) + score (4) bytes. */
    size_t meta, lh_arrays, scratch;
    if (!mul_size(b->n_meta, 14, &meta)) return 0;
    if (!mul_size(b->n_lh, 2 * sizeof(int32_t), &lh_arrays)) return 0;
    if (!mul_size((size_t)c->n_slots, sizeof(int64_t), &scratch)) return 0;
    size_t total = sizeof *b + (size_t)c->head_dim * b->elem; /* <= row_bytes: cannot wrap */
    if (!add_size(total, meta, &total) || !add_size(total, lh_arrays, &total) ||
        !add_size(total, scratch, &total))
        return 0;
    b->host_bytes = total;
    return 1;
}

/* Writes zeros over the whole K/V memory, through the copy hook (the memory may be on a device). */
static int zero_all(cspkv_buffer *b) {
    size_t chunk = b->kv_bytes < ZERO_CHUNK ? b->kv_bytes : ZERO_CHUNK;
    void *zeros = calloc(chunk, 1); /* freed before create returns: the held memory does not grow */
    if (!zeros) return CSPKV_ERR_OUT_OF_MEMORY;
    int st = CSPKV_OK;
    for (size_t off = 0; off < b->kv_bytes; off += chunk) {
        size_t n = b->kv_bytes - off < chunk ? b->kv_bytes - off : chunk;
        if (cspkv_copy_in(b, off, zeros, n, CSPKV_COPY_HOST_ZEROS) != 0) {
            st = CSPKV_ERR_COPY_FAILED;
            break;
        }
    }
    free(zeros);
    return st;
}

void cspkv_destroy(cspkv_buffer *b) {
    if (!b) return;
    if (b->kv) b->mem.free(b->mem.user, b->kv, b->kv_bytes);
    free(b->valid);
    free(b->position);
    free(b->modality);
    free(b->score);
    free(b->pending_slots);
    free(b->chosen);
    free(b->sorted);
    free(b->zero_head);
    free(b);
}

int cspkv_create(const cspkv_config *cfg, const cspkv_allocator *allocator, cspkv_buffer **out) {
    if (!cfg || !out) return CSPKV_ERR_NULL_POINTER;
    *out = NULL;
    int st = check_config(cfg);
    if (st != CSPKV_OK) return st;
    if (allocator && (!allocator->alloc || !allocator->free || !allocator->copy))
        return CSPKV_ERR_NULL_POINTER;

    cspkv_buffer *b = calloc(1, sizeof *b);
    if (!b) return CSPKV_ERR_OUT_OF_MEMORY;
    b->cfg = *cfg;
    if (allocator) {
        b->mem = *allocator;
    } else {
        b->host_kv = 1;
        b->mem.alloc = host_alloc;
        b->mem.free = host_free;
        b->mem.copy = host_copy;
    }
    b->n_usable = cfg->n_slots - cfg->has_null_slot;
    if (!compute_sizes(b)) {
        free(b);
        return CSPKV_ERR_OUT_OF_MEMORY;
    }

    b->valid = malloc(b->n_meta * sizeof *b->valid);
    b->position = malloc(b->n_meta * sizeof *b->position);
    b->modality = malloc(b->n_meta * sizeof *b->modality);
    b->score = malloc(b->n_meta * sizeof *b->score);
    b->pending_slots = malloc(b->n_lh * sizeof *b->pending_slots);
    b->chosen = malloc(b->n_lh * sizeof *b->chosen);
    b->sorted = malloc((size_t)cfg->n_slots * sizeof *b->sorted);
    b->zero_head = calloc((size_t)cfg->head_dim, b->elem);
    if (!b->valid || !b->position || !b->modality || !b->score || !b->pending_slots || !b->chosen ||
        !b->sorted || !b->zero_head) {
        cspkv_destroy(b);
        return CSPKV_ERR_OUT_OF_MEMORY;
    }
    b->kv = b->mem.alloc(b->mem.user, b->kv_bytes);
    if (!b->kv) {
        cspkv_destroy(b);
        return CSPKV_ERR_OUT_OF_MEMORY;
    }
    /* Every slot starts zeroed, not just the null slot: a free slot's K/V still enter the attention
     * matmul (masked by a -inf bias afterwards), and uninitialised NaN/inf there would poison it. */
    st = zero_all(b);
    if (st != CSPKV_OK) {
        cspkv_destroy(b);
        return st;
    }
    cspkv_clear_metadata(b);
    *out = b;
    return CSPKV_OK;
}

/* ---- reset ---- */

void cspkv_clear_metadata(cspkv_buffer *b) {
    memset(b->valid, 0, b->n_meta * sizeof *b->valid);
    for (size_t i = 0; i < b->n_meta; i++) b->position[i] = -1;
    memset(b->modality, -1, b->n_meta * sizeof *b->modality);
    for (size_t i = 0; i < b->n_meta; i++) b->score[i] = 0.0f;
    b->prompt_len = 0;
    b->has_pending = 0;
    b->pending_position = -1;
}

int cspkv_zero_null_slot(cspkv_buffer *b) {
    if (!b->cfg.has_null_slot) return CSPKV_OK;
    size_t s = (size_t)b->cfg.n_slots - 1, head_bytes = (size_t)b->cfg.head_dim * b->elem;
    for (size_t l = 0; l < (size_t)b->cfg.n_layers; l++)
        for (size_t kv = 0; kv < 2; kv++)
            for (size_t h = 0; h < (size_t)b->cfg.n_kv_heads; h++)
                if (cspkv_copy_in(b, cspkv_kv_offset(b, l, kv, h, s), b->zero_head, head_bytes,
                                  CSPKV_COPY_HOST_ZEROS) != 0)
                    return CSPKV_ERR_COPY_FAILED;
    return CSPKV_OK;
}

int cspkv_reset(cspkv_buffer *b) {
    if (!b) return CSPKV_ERR_NULL_POINTER;
    b->error[0] = '\0';
    cspkv_clear_metadata(b);
    /* Other slots keep stale (finite) K/V: they are free, so masked, and rewritten before use. */
    int st = cspkv_zero_null_slot(b);
    if (st != CSPKV_OK) return cspkv_fail(b, st, "the copy hook failed zeroing the null slot");
    return CSPKV_OK;
}

/* ---- getters ---- */

#define CHECK_OUT(b, out, n_out, expected)                     \
    do {                                                       \
        if (!(b) || !(out)) return CSPKV_ERR_NULL_POINTER;     \
        if ((n_out) != (expected)) return CSPKV_ERR_SIZE_MISMATCH; \
    } while (0)

int cspkv_get_valid(const cspkv_buffer *b, uint8_t *out, size_t n_out) {
    CHECK_OUT(b, out, n_out, b->n_meta);
    memcpy(out, b->valid, b->n_meta * sizeof *out);
    return CSPKV_OK;
}

int cspkv_get_positions(const cspkv_buffer *b, int64_t *out, size_t n_out) {
    CHECK_OUT(b, out, n_out, b->n_meta);
    memcpy(out, b->position, b->n_meta * sizeof *out);
    return CSPKV_OK;
}

int cspkv_get_modality(const cspkv_buffer *b, int8_t *out, size_t n_out) {
    CHECK_OUT(b, out, n_out, b->n_meta);
    memcpy(out, b->modality, b->n_meta * sizeof *out);
    return CSPKV_OK;
}

int cspkv_get_scores(const cspkv_buffer *b, float *out, size_t n_out) {
    CHECK_OUT(b, out, n_out, b->n_meta);
    memcpy(out, b->score, b->n_meta * sizeof *out);
    return CSPKV_OK;
}

int cspkv_get_n_valid(const cspkv_buffer *b, int32_t *out, size_t n_out) {
    CHECK_OUT(b, out, n_out, b->n_lh);
    size_t n_slots = (size_t)b->cfg.n_slots;
    for (size_t lh = 0; lh < b->n_lh; lh++) {
        int32_t n = 0;
        for (size_t s = 0; s < n_slots; s++) n += b->valid[lh * n_slots + s];
        out[lh] = n;
    }
    return CSPKV_OK;
}

int cspkv_get_prompt_len(const cspkv_buffer *b, int64_t *out) {
    if (!b || !out) return CSPKV_ERR_NULL_POINTER;
    *out = b->prompt_len;
    return CSPKV_OK;
}

int cspkv_get_config(const cspkv_buffer *b, cspkv_config *out) {
    if (!b || !out) return CSPKV_ERR_NULL_POINTER;
    *out = b->cfg;
    return CSPKV_OK;
}

int cspkv_kv_pointer(const cspkv_buffer *b, void **out) {
    if (!b || !out) return CSPKV_ERR_NULL_POINTER;
    *out = b->kv;
    return CSPKV_OK;
}

int cspkv_bytes_held(const cspkv_buffer *b, size_t *kv_bytes, size_t *host_bytes) {
    if (!b) return CSPKV_ERR_NULL_POINTER;
    if (kv_bytes) *kv_bytes = b->kv_bytes;
    if (host_bytes) *host_bytes = b->host_bytes;
    return CSPKV_OK;
}
