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

static const char *const PART[2] = {"K", "V"};

/* Checks the loaded entries [0, n) of (layer l, head h): positions in [0, prompt_len) and
 * distinct, modality >= 0, finite scores. */
static int check_prefill_head(cspkv_buffer *b, size_t l, size_t h, const int64_t *pos,
                              const int8_t *mod, const float *scores, int32_t n, int64_t prompt_len) {
    if (n == 0) return CSPKV_OK; /* the arrays may be NULL when C == 0 */
    for (int32_t i = 0; i < n; i++) {
        if (pos[i] < 0 || pos[i] >= prompt_len)
            return cspkv_fail(b, CSPKV_ERR_INVALID_ARGUMENT,
                              "positions[%zu, %zu, %d] = %lld is outside [0, prompt_len %lld)", l, h,
                              (int)i, (long long)pos[i], (long long)prompt_len);
        if (mod[i] < 0)
            return cspkv_fail(b, CSPKV_ERR_INVALID_ARGUMENT, "modality[%zu, %zu, %d] = %d is negative",
                              l, h, (int)i, (int)mod[i]);
        if (scores && !isfinite(scores[i]))
            return cspkv_fail(b, CSPKV_ERR_NON_FINITE, "scores[%zu, %zu, %d] is non-finite (%g)", l, h,
                              (int)i, (double)scores[i]);
    }
    /* Sorting a copy finds duplicates in O(n log n); the scratch was sized at create. */
    memcpy(b->sorted, pos, (size_t)n * sizeof *pos);
    qsort(b->sorted, (size_t)n, sizeof *b->sorted, cmp_i64);
    for (int32_t i = 1; i < n; i++)
        if (b->sorted[i] == b->sorted[i - 1])
            return cspkv_fail(b, CSPKV_ERR_DUPLICATE_POSITION,
                              "positions of layer %zu, kv_head %zu hold %lld twice", l, h,
                              (long long)b->sorted[i]);
    return CSPKV_OK;
}

/* Non-finite K/V among the n_valid loaded entries of every (layer, K|V, head), host memory only. */
static int check_prefill_kv(cspkv_buffer *b, const void *kv, size_t cc, const int32_t *n_valid) {
    if (!b->host_kv) return CSPKV_OK;
    size_t n_heads = (size_t)b->cfg.n_kv_heads, d = (size_t)b->cfg.head_dim;
    for (size_t l = 0; l < (size_t)b->cfg.n_layers; l++)
        for (size_t k = 0; k < 2; k++)
            for (size_t h = 0; h < n_heads; h++) {
                size_t n = (size_t)n_valid[l * n_heads + h] * d;
                const char *row = (const char *)kv + ((l * 2 + k) * n_heads + h) * cc * d * b->elem;
                size_t bad = cspkv_first_non_finite(row, n, b->elem);
                if (bad < n)
                    return cspkv_fail(b, CSPKV_ERR_NON_FINITE,
                                      "kv: non-finite value at layer %zu, %s, kv_head %zu, entry %zu, dim %zu",
                                      l, PART[k], h, bad / d, bad % d);
            }
    return CSPKV_OK;
}

int cspkv_load_prefill(cspkv_buffer *b, int64_t c, const void *kv, size_t kv_nbytes,
                       const int64_t *positions, const int8_t *modality, const float *scores,
                       size_t n_entries, const int32_t *n_valid, size_t n_valid_len,
                       int64_t prompt_len) {
    if (!b) return CSPKV_ERR_NULL_POINTER;
    b->error[0] = '\0';
    if (!n_valid) return cspkv_fail(b, CSPKV_ERR_NULL_POINTER, "n_valid is NULL");
    if (c < 0) return cspkv_fail(b, CSPKV_ERR_INVALID_ARGUMENT, "c = %lld is negative", (long long)c);
    if (prompt_len < 0)
        return cspkv_fail(b, CSPKV_ERR_INVALID_ARGUMENT, "prompt_len = %lld is negative", (long long)prompt_len);
    if (c > b->n_usable)
        return cspkv_fail(b, CSPKV_ERR_CAPACITY, "c = %lld entries per head, but only %d usable slots",
                          (long long)c, (int)b->n_usable);
    if (c > 0 && (!kv || !positions || !modality))
        return cspkv_fail(b, CSPKV_ERR_NULL_POINTER, "%s is NULL with c = %lld",
                          !kv ? "kv" : !positions ? "positions" : "modality", (long long)c);
    /* c <= n_usable, so these products are bounded by the sizes checked at create. */
    size_t cc = (size_t)c, head_bytes = (size_t)b->cfg.head_dim * b->elem;
    if (n_entries != b->n_lh * cc)
        return cspkv_fail(b, CSPKV_ERR_SIZE_MISMATCH, "n_entries = %zu, expected layers * kv_heads * c = %zu",
                          n_entries, b->n_lh * cc);
    if (n_valid_len != b->n_lh)
        return cspkv_fail(b, CSPKV_ERR_SIZE_MISMATCH, "n_valid has %zu entries, expected layers * kv_heads = %zu",
                          n_valid_len, b->n_lh);
    if (kv_nbytes != 2 * b->n_lh * cc * head_bytes)
        return cspkv_fail(b, CSPKV_ERR_SIZE_MISMATCH, "kv_nbytes = %zu, expected %zu", kv_nbytes,
                          2 * b->n_lh * cc * head_bytes);
    size_t n_heads = (size_t)b->cfg.n_kv_heads;
    for (size_t lh = 0; lh < b->n_lh; lh++) {
        if (n_valid[lh] < 0 || n_valid[lh] > c)
            return cspkv_fail(b, CSPKV_ERR_INVALID_ARGUMENT, "n_valid[%zu, %zu] = %d is outside [0, c = %lld]",
                              lh / n_heads, lh % n_heads, (int)n_valid[lh], (long long)c);
        size_t at = lh * cc;
        int st = check_prefill_head(b, lh / n_heads, lh % n_heads, positions + at, modality + at,
                                    scores ? scores + at : NULL, n_valid[lh], prompt_len);
        if (st != CSPKV_OK) return st;
    }
    if (c > 0) {
        int st = check_prefill_kv(b, kv, cc, n_valid);
        if (st != CSPKV_OK) return st;
    }

    int st = cspkv_reset(b);
    if (st != CSPKV_OK) return st;
    /* K/V first: if a copy fails the metadata is still the reset (empty) table. One copy per
     * (layer, K|V, head): the first n_valid entries are contiguous in source and buffer alike. */
    size_t n_layers = (size_t)b->cfg.n_layers;
    for (size_t l = 0; l < n_layers; l++)
        for (size_t k = 0; k < 2; k++)
            for (size_t h = 0; h < n_heads; h++) {
                size_t src = ((l * 2 + k) * n_heads + h) * cc * head_bytes;
                size_t n = (size_t)n_valid[l * n_heads + h] * head_bytes;
                if (cspkv_copy_in(b, cspkv_kv_offset(b, l, k, h, 0), (const char *)kv + src, n,
                                  CSPKV_COPY_FROM_CALLER) != 0)
                    return cspkv_fail(b, CSPKV_ERR_COPY_FAILED, "the copy hook failed on kv of layer %zu, %s, "
                                      "kv_head %zu", l, PART[k], h);
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
    if (!b) return CSPKV_ERR_NULL_POINTER;
    b->error[0] = '\0';
    if (!slots_out) return cspkv_fail(b, CSPKV_ERR_NULL_POINTER, "slots_out is NULL");
    if (n_out != b->n_lh)
        return cspkv_fail(b, CSPKV_ERR_SIZE_MISMATCH, "slots_out has %zu entries, expected layers * kv_heads = %zu",
                          n_out, b->n_lh);
    if (position < b->prompt_len) /* prompt_len >= 0 */
        return cspkv_fail(b, CSPKV_ERR_INVALID_ARGUMENT, "position %lld is inside the prompt (prompt_len %lld)",
                          (long long)position, (long long)b->prompt_len);
    size_t n_slots = (size_t)b->cfg.n_slots;

    /* The argument check comes first, so its status does not depend on which head fails. */
    for (size_t i = 0; i < b->n_meta; i++)
        if (b->valid[i] && b->position[i] == position)
            return cspkv_fail(b, CSPKV_ERR_DUPLICATE_POSITION, "position %lld is already held (layer %zu, "
                              "kv_head %zu, slot %zu)", (long long)position, i / n_slots / (size_t)b->cfg.n_kv_heads,
                              i / n_slots % (size_t)b->cfg.n_kv_heads, i % n_slots);

    /* Pass 1: decide every (layer, head) without touching the table. */
    for (size_t lh = 0; lh < b->n_lh; lh++) {
        size_t row = lh * n_slots;
        int32_t free_slot = -1;
        for (int32_t s = 0; s < b->n_usable && free_slot < 0; s++)
            if (!b->valid[row + (size_t)s]) free_slot = s;
        int32_t s = free_slot >= 0 ? free_slot
                    : b->cfg.eviction == CSPKV_EVICT_RING ? ring_victim(b, row)
                                                          : rescore_victim(b, row, position);
        if (s < 0)
            return cspkv_fail(b, CSPKV_ERR_NO_EVICTABLE, "no slot to evict at layer %zu, kv_head %zu for "
                              "position %lld", lh / (size_t)b->cfg.n_kv_heads, lh % (size_t)b->cfg.n_kv_heads,
                              (long long)position);
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
    if (!b) return CSPKV_ERR_NULL_POINTER;
    b->error[0] = '\0';
    if (!slots || !kv_delta) return cspkv_fail(b, CSPKV_ERR_NULL_POINTER, "%s is NULL", !slots ? "slots" : "kv_delta");
    size_t head_bytes = (size_t)b->cfg.head_dim * b->elem;
    if (n_slots_in != b->n_lh)
        return cspkv_fail(b, CSPKV_ERR_SIZE_MISMATCH, "slots has %zu entries, expected layers * kv_heads = %zu",
                          n_slots_in, b->n_lh);
    if (kv_nbytes != 2 * b->n_lh * head_bytes)
        return cspkv_fail(b, CSPKV_ERR_SIZE_MISMATCH, "kv_nbytes = %zu, expected %zu", kv_nbytes,
                          2 * b->n_lh * head_bytes);
    for (size_t lh = 0; lh < b->n_lh; lh++)
        if (slots[lh] < 0 || slots[lh] >= b->n_usable)
            return cspkv_fail(b, CSPKV_ERR_SLOT_OUT_OF_RANGE, "slots[%zu] = %d is not in [0, %d)", lh,
                              (int)slots[lh], (int)b->n_usable);
    if (modality < 0 || modality > INT8_MAX)
        return cspkv_fail(b, CSPKV_ERR_INVALID_ARGUMENT, "modality %d is outside [0, 127]", (int)modality);
    /* Only the slots just chosen for this position may be written: anything else would overwrite a
     * valid token's K/V or skip the invalidation the choice did. */
    if (!b->has_pending || position != b->pending_position ||
        memcmp(slots, b->pending_slots, b->n_lh * sizeof *slots) != 0)
        return cspkv_fail(b, CSPKV_ERR_BAD_STATE, !b->has_pending ? "no choose_write_slots is pending"
                          : position != b->pending_position ? "position differs from the pending choice's"
                                                            : "slots differ from the pending choice's");
    if (b->host_kv) {
        size_t n = 2 * b->n_lh * (size_t)b->cfg.head_dim, bad = cspkv_first_non_finite(kv_delta, n, b->elem);
        if (bad < n) {
            size_t d = (size_t)b->cfg.head_dim, row = bad / d, n_heads = (size_t)b->cfg.n_kv_heads;
            return cspkv_fail(b, CSPKV_ERR_NON_FINITE, "kv_delta: non-finite value at layer %zu, %s, kv_head %zu, "
                              "dim %zu", row / (2 * n_heads), PART[row / n_heads % 2], row % n_heads, bad % d);
        }
    }

    /* The delta is [layers, 2, 1, kv_heads, 1, head_dim]: the singleton axes add no stride. */
    size_t n_layers = (size_t)b->cfg.n_layers, n_heads = (size_t)b->cfg.n_kv_heads;
    for (size_t l = 0; l < n_layers; l++)
        for (size_t k = 0; k < 2; k++)
            for (size_t h = 0; h < n_heads; h++) {
                size_t src = ((l * 2 + k) * n_heads + h) * head_bytes;
                size_t dst = cspkv_kv_offset(b, l, k, h, (size_t)slots[l * n_heads + h]);
                if (cspkv_copy_in(b, dst, (const char *)kv_delta + src, head_bytes,
                                  CSPKV_COPY_FROM_CALLER) != 0)
                    return cspkv_fail(b, CSPKV_ERR_COPY_FAILED, /* nothing committed; the choice stays pending */
                                      "the copy hook failed on kv_delta of layer %zu, %s, kv_head %zu", l, PART[k], h);
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
    if (!b) return CSPKV_ERR_NULL_POINTER;
    b->error[0] = '\0';
    if (!mass) return cspkv_fail(b, CSPKV_ERR_NULL_POINTER, "mass is NULL");
    if (n_mass != b->n_meta)
        return cspkv_fail(b, CSPKV_ERR_SIZE_MISMATCH, "mass has %zu entries, expected layers * kv_heads * slots = %zu",
                          n_mass, b->n_meta);
    /* Keeping every score finite keeps the re-score argmin well defined (see rescore_victim). */
    size_t n_slots = (size_t)b->cfg.n_slots, n_heads = (size_t)b->cfg.n_kv_heads;
    for (size_t i = 0; i < b->n_meta; i++)
        if (b->valid[i] && (!isfinite(mass[i]) || !isfinite(b->score[i] + mass[i])))
            return cspkv_fail(b, CSPKV_ERR_NON_FINITE, isfinite(mass[i])
                              ? "mass[%zu, %zu, %zu] = %g would make that slot's score overflow"
                              : "mass[%zu, %zu, %zu] is non-finite (%g)",
                              i / n_slots / n_heads, i / n_slots % n_heads, i % n_slots, (double)mass[i]);
    /* float32 additions, as numpy's `score += where(valid, mass, 0)` on float32 arrays. */
    for (size_t i = 0; i < b->n_meta; i++)
        if (b->valid[i]) b->score[i] += mass[i];
    return CSPKV_OK;
}
