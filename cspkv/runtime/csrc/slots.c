/* The slot-table semantics of cspkv/runtime/slot_reference.py (SlotTable), plus the K/V copies.
 *
 * Every mutating function validates all of its input first and only then changes state, so an
 * error leaves the buffer as it was (the reference raises SlotTableError half-way through
 * choose_write_slots; here that case changes nothing). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cspkv_internal.h"

/* ---- load_prefill ---- */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Checks the loaded entries [0, n) of one (layer, head): positions in [0, prompt_len) and
 * distinct, modality >= 0, finite scores. */
static int check_prefill_head(cspkv_buffer *b, const int64_t *pos, const int8_t *mod,
                              const float *scores, int32_t n, int64_t prompt_len) {
    if (n == 0) return CSPKV_OK; /* the arrays may be NULL when C == 0 */
    for (int32_t i = 0; i < n; i++) {
        if (pos[i] < 0 || pos[i] >= prompt_len || mod[i] < 0) return CSPKV_ERR_INVALID_ARGUMENT;
        if (scores && !isfinite(scores[i])) return CSPKV_ERR_INVALID_ARGUMENT;
    }
    /* Sorting a copy finds duplicates in O(n log n); the scratch was sized at create. */
    memcpy(b->sorted, pos, (size_t)n * sizeof *pos);
    qsort(b->sorted, (size_t)n, sizeof *b->sorted, cmp_i64);
    for (int32_t i = 1; i < n; i++)
        if (b->sorted[i] == b->sorted[i - 1]) return CSPKV_ERR_DUPLICATE_POSITION;
    return CSPKV_OK;
}

int cspkv_load_prefill(cspkv_buffer *b, int64_t c, const void *kv, size_t kv_nbytes,
                       const int64_t *positions, const int8_t *modality, const float *scores,
                       size_t n_entries, const int32_t *n_valid, size_t n_valid_len,
                       int64_t prompt_len) {
    if (!b || !n_valid) return CSPKV_ERR_NULL_POINTER;
    if (c < 0 || prompt_len < 0) return CSPKV_ERR_INVALID_ARGUMENT;
    if (c > b->n_usable) return CSPKV_ERR_CAPACITY;
    if (c > 0 && (!kv || !positions || !modality)) return CSPKV_ERR_NULL_POINTER;
    /* c <= n_usable, so these products are bounded by the sizes checked at create. */
    size_t cc = (size_t)c, head_bytes = (size_t)b->cfg.head_dim * b->elem;
    if (n_entries != b->n_lh * cc || n_valid_len != b->n_lh || kv_nbytes != 2 * b->n_lh * cc * head_bytes)
        return CSPKV_ERR_SIZE_MISMATCH;
    for (size_t lh = 0; lh < b->n_lh; lh++) {
        if (n_valid[lh] < 0 || n_valid[lh] > c) return CSPKV_ERR_INVALID_ARGUMENT;
        size_t at = lh * cc;
        int st = check_prefill_head(b, positions + at, modality + at, scores ? scores + at : NULL,
                                    n_valid[lh], prompt_len);
        if (st != CSPKV_OK) return st;
    }

    int st = cspkv_reset(b);
    if (st != CSPKV_OK) return st;
    /* K/V first: if a copy fails the metadata is still the reset (empty) table. One copy per
     * (layer, K|V, head): the first n_valid entries are contiguous in source and buffer alike. */
    size_t n_layers = (size_t)b->cfg.n_layers, n_heads = (size_t)b->cfg.n_kv_heads;
    for (size_t l = 0; l < n_layers; l++)
        for (size_t k = 0; k < 2; k++)
            for (size_t h = 0; h < n_heads; h++) {
                size_t src = ((l * 2 + k) * n_heads + h) * cc * head_bytes;
                size_t n = (size_t)n_valid[l * n_heads + h] * head_bytes;
                if (cspkv_copy_in(b, cspkv_kv_offset(b, l, k, h, 0), (const char *)kv + src, n,
                                  CSPKV_COPY_FROM_CALLER) != 0)
                    return CSPKV_ERR_COPY_FAILED;
            }
    size_t n_slots = (size_t)b->cfg.n_slots;
    for (size_t lh = 0; lh < b->n_lh; lh++)
        for (size_t i = 0; i < (size_t)n_valid[lh]; i++) {
            size_t at = lh * n_slots + i, src = lh * cc + i;
            b->valid[at] = 1;
            b->position[at] = positions[src];
            b->modality[at] = modality[src];
            b->score[at] = scores ? scores[src] : 0.0f;
        }
    b->prompt_len = prompt_len;
    return CSPKV_OK;
}

/* ---- choose_write_slots ---- */

/* Ring victim: the valid generated token (position >= prompt_len) with the lowest position. */
static int32_t ring_victim(const cspkv_buffer *b, size_t row) {
    int32_t best = -1;
    for (int32_t s = 0; s < b->n_usable; s++) {
        size_t i = row + (size_t)s;
        if (b->valid[i] && b->position[i] >= b->prompt_len &&
            (best < 0 || b->position[i] < b->position[row + (size_t)best]))
            best = s;
    }
    return best;
}

/* Re-score victim: the lowest score outside the recent window and the sinks, ties to the lowest
 * slot. Scores are always finite (accumulate and load_prefill ensure it), so '<' is a total order. */
static int32_t rescore_victim(const cspkv_buffer *b, size_t row, int64_t position) {
    int64_t recent_from = position - b->cfg.n_recent; /* position >= 0: no overflow */
    int32_t best = -1;
    for (int32_t s = 0; s < b->n_usable; s++) {
        size_t i = row + (size_t)s;
        int protected_ = b->position[i] >= recent_from || b->position[i] < b->cfg.n_sink;
        if (b->valid[i] && !protected_ && (best < 0 || b->score[i] < b->score[row + (size_t)best]))
            best = s;
    }
    return best;
}

int cspkv_choose_write_slots(cspkv_buffer *b, int64_t position, int32_t *slots_out, size_t n_out) {
    if (!b || !slots_out) return CSPKV_ERR_NULL_POINTER;
    if (n_out != b->n_lh) return CSPKV_ERR_SIZE_MISMATCH;
    if (position < b->prompt_len) return CSPKV_ERR_INVALID_ARGUMENT; /* prompt_len >= 0 */
    size_t n_slots = (size_t)b->cfg.n_slots;

    /* The argument check comes first, so its status does not depend on which head fails. */
    for (size_t i = 0; i < b->n_meta; i++)
        if (b->valid[i] && b->position[i] == position) return CSPKV_ERR_DUPLICATE_POSITION;

    /* Pass 1: decide every (layer, head) without touching the table. */
    for (size_t lh = 0; lh < b->n_lh; lh++) {
        size_t row = lh * n_slots;
        int32_t free_slot = -1;
        for (int32_t s = 0; s < b->n_usable && free_slot < 0; s++)
            if (!b->valid[row + (size_t)s]) free_slot = s;
        int32_t s = free_slot >= 0 ? free_slot
                    : b->cfg.policy == CSPKV_POLICY_RING ? ring_victim(b, row)
                                                          : rescore_victim(b, row, position);
        if (s < 0) return CSPKV_ERR_NO_EVICTABLE;
        b->chosen[lh] = s;
    }

    /* Pass 2: invalidate the chosen slots so this step does not attend to what it overwrites. */
    for (size_t lh = 0; lh < b->n_lh; lh++) {
        size_t i = lh * n_slots + (size_t)b->chosen[lh];
        b->valid[i] = 0;
        b->position[i] = -1;
        b->modality[i] = -1;
        b->score[i] = 0.0f;
    }
    memcpy(b->pending_slots, b->chosen, b->n_lh * sizeof *b->chosen);
    memcpy(slots_out, b->chosen, b->n_lh * sizeof *b->chosen);
    b->pending_position = position;
    b->has_pending = 1;
    return CSPKV_OK;
}

/* ---- attention_bias ---- */

int cspkv_attention_bias(const cspkv_buffer *b, float *bias_out, size_t n_out) {
    if (!b || !bias_out) return CSPKV_ERR_NULL_POINTER;
    if (n_out != b->n_meta) return CSPKV_ERR_SIZE_MISMATCH;
    for (size_t i = 0; i < b->n_meta; i++) bias_out[i] = b->valid[i] ? 0.0f : -INFINITY;
    if (b->cfg.has_null_slot) {
        size_t n_slots = (size_t)b->cfg.n_slots;
        for (size_t lh = 0; lh < b->n_lh; lh++) bias_out[lh * n_slots + n_slots - 1] = b->cfg.null_logit;
    }
    return CSPKV_OK;
}

/* ---- write_token ---- */

int cspkv_write_token(cspkv_buffer *b, const int32_t *slots, size_t n_slots_in, const void *kv_delta,
                      size_t kv_nbytes, int64_t position, int32_t modality) {
    if (!b || !slots || !kv_delta) return CSPKV_ERR_NULL_POINTER;
    size_t head_bytes = (size_t)b->cfg.head_dim * b->elem;
    if (n_slots_in != b->n_lh || kv_nbytes != 2 * b->n_lh * head_bytes) return CSPKV_ERR_SIZE_MISMATCH;
    for (size_t lh = 0; lh < b->n_lh; lh++)
        if (slots[lh] < 0 || slots[lh] >= b->n_usable) return CSPKV_ERR_SLOT_OUT_OF_RANGE;
    if (modality < 0 || modality > INT8_MAX) return CSPKV_ERR_INVALID_ARGUMENT;
    /* Only the slots just chosen for this position may be written: anything else would overwrite a
     * valid token's K/V or skip the invalidation the choice did. */
    if (!b->has_pending || position != b->pending_position ||
        memcmp(slots, b->pending_slots, b->n_lh * sizeof *slots) != 0)
        return CSPKV_ERR_BAD_STATE;

    /* The delta is [layers, 2, 1, kv_heads, 1, head_dim]: the singleton axes add no stride. */
    size_t n_layers = (size_t)b->cfg.n_layers, n_heads = (size_t)b->cfg.n_kv_heads;
    for (size_t l = 0; l < n_layers; l++)
        for (size_t k = 0; k < 2; k++)
            for (size_t h = 0; h < n_heads; h++) {
                size_t src = ((l * 2 + k) * n_heads + h) * head_bytes;
                size_t dst = cspkv_kv_offset(b, l, k, h, (size_t)slots[l * n_heads + h]);
                if (cspkv_copy_in(b, dst, (const char *)kv_delta + src, head_bytes,
                                  CSPKV_COPY_FROM_CALLER) != 0)
                    return CSPKV_ERR_COPY_FAILED; /* nothing committed; the choice stays pending */
            }

    size_t n_slots = (size_t)b->cfg.n_slots;
    for (size_t lh = 0; lh < b->n_lh; lh++) {
        size_t i = lh * n_slots + (size_t)slots[lh];
        b->valid[i] = 1;
        b->position[i] = position;
        b->modality[i] = (int8_t)modality;
        b->score[i] = 0.0f;
    }
    b->has_pending = 0;
    return CSPKV_OK;
}

/* ---- accumulate ---- */

int cspkv_accumulate(cspkv_buffer *b, const float *mass, size_t n_mass) {
    if (!b || !mass) return CSPKV_ERR_NULL_POINTER;
    if (n_mass != b->n_meta) return CSPKV_ERR_SIZE_MISMATCH;
    /* Keeping every score finite keeps the re-score argmin well defined (see rescore_victim). */
    for (size_t i = 0; i < b->n_meta; i++)
        if (b->valid[i] && (!isfinite(mass[i]) || !isfinite(b->score[i] + mass[i])))
            return CSPKV_ERR_INVALID_ARGUMENT;
    /* float32 additions, as numpy's `score += where(valid, mass, 0)` on float32 arrays. */
    for (size_t i = 0; i < b->n_meta; i++)
        if (b->valid[i]) b->score[i] += mass[i];
    return CSPKV_OK;
}
