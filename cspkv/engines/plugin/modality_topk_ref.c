/*
 * C reference of CSP's modality-aware top-k (see modality_topk.h for the exact semantics).
 *
 * Written to be read next to cspkv/pruning/csp.py, not to be fast: each pass orders all L positions
 * with qsort under the policy's total order (score descending, NaN first, index ascending) and takes
 * the allowed positions among the first k, which is what base.top_k_mask does with a stable sort.
 * Every argument is checked before anything is written, and every index is bounded by `length`.
 */
#include "modality_topk.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Per-position state of one (b, h) row while the passes run. */
enum { STATE_PADDING = 0, STATE_CANDIDATE = 1, STATE_KEPT = 2 };

static const char* const STATUS_MESSAGES[] = {
    "ok",
    "an array argument is NULL",
    "batch, heads, length and c_max must be >= 1, and c_max <= length",
    "cross_ratio must be a number in [0, 1]",
    "key_modality must hold 0 (text), 1 (image) or -1 (padding), with the padding last",
    "each row needs 0 <= n_recent <= n_keep <= n_valid (its number of non-padding keys)",
    "out of memory",
    "length needs more shared memory per block than the CUDA device offers",
    "a CUDA runtime call or kernel launch failed",
};

const char* cspkv_topk_status_string(int status)
{
    if (status < 0 || status >= (int)(sizeof STATUS_MESSAGES / sizeof STATUS_MESSAGES[0])) {
        return "unknown status";
    }
    return STATUS_MESSAGES[status];
}

double cspkv_ratio_from_float32(float ratio)
{
    if (!isfinite(ratio)) {
        return (double)ratio;
    }
    /* The shortest "%.Ng" that reads back as the same float32; 9 digits always do. */
    char text[40];
    for (int digits = 1; digits <= 9; ++digits) {
        snprintf(text, sizeof text, "%.*g", digits, (double)ratio);
        if (strtof(text, NULL) == ratio) {
            return strtod(text, NULL);
        }
    }
    return (double)ratio;
}

/* One entry of a pass: the position's score (-inf when it is not allowed) and its index. */
typedef struct {
    float score;
    int32_t index;
} entry;

/* Whether a comes before b in the policy's order: NaN first, then larger scores, then lower index.
 * -0.0 == +0.0 here, as in a comparison sort. */
static int comes_before(const entry* a, const entry* b)
{
    const int a_nan = isnan(a->score), b_nan = isnan(b->score);
    if (a_nan != b_nan) {
        return a_nan;
    }
    if (!a_nan && a->score != b->score) {
        return a->score > b->score;
    }
    return a->index < b->index;
}

static int compare_entries(const void* pa, const void* pb)
{
    const entry* a = (const entry*)pa;
    const entry* b = (const entry*)pb;
    if (comes_before(a, b)) {
        return -1;
    }
    return comes_before(b, a) ? 1 : 0;
}

/* base.top_k_mask(scores, allowed = (state == CANDIDATE), k): mark the chosen positions KEPT. */
static void take_top(const float* scores, unsigned char* state, int32_t length, int64_t k,
                     entry* order)
{
    if (k <= 0) {
        return;
    }
    for (int32_t j = 0; j < length; ++j) {
        order[j].score = state[j] == STATE_CANDIDATE ? scores[j] : -INFINITY;
        order[j].index = j;
    }
    qsort(order, (size_t)length, sizeof *order, compare_entries);
    const int64_t places = k < length ? k : length;
    for (int64_t p = 0; p < places; ++p) {
        const int32_t j = order[p].index;
        if (state[j] == STATE_CANDIDATE) {
            state[j] = STATE_KEPT;
        }
    }
}

/* Number of valid keys of one row, or -1 when an id is out of range or padding is not a suffix. */
static int32_t count_valid(const int32_t* modality, int32_t length)
{
    int32_t n_valid = 0;
    for (int32_t j = 0; j < length; ++j) {
        const int32_t m = modality[j];
        if (m < -1 || m > 1) {
            return -1;
        }
        if (m >= 0) {
            if (n_valid != j) {
                return -1; /* a valid key after padding */
            }
            ++n_valid;
        }
    }
    return n_valid;
}

int cspkv_modality_topk_ref(const float* self_scores, const float* cross_scores,
                            const int32_t* key_modality, const int32_t* n_keep,
                            const int32_t* n_recent, int32_t batch, int32_t heads, int32_t length,
                            int32_t c_max, double cross_ratio, int64_t* out)
{
    if (!self_scores || !cross_scores || !key_modality || !n_keep || !n_recent || !out) {
        return CSPKV_TOPK_ERR_NULL_POINTER;
    }
    if (batch < 1 || heads < 1 || length < 1 || c_max < 1 || c_max > length) {
        return CSPKV_TOPK_ERR_SHAPE;
    }
    const size_t rows = (size_t)batch * (size_t)heads;
    if (rows > SIZE_MAX / sizeof(int64_t) / (size_t)length) {
        return CSPKV_TOPK_ERR_SHAPE; /* B * H * L elements would not be addressable */
    }
    if (!(cross_ratio >= 0.0 && cross_ratio <= 1.0)) { /* also rejects NaN */
        return CSPKV_TOPK_ERR_RATIO;
    }
    for (int32_t b = 0; b < batch; ++b) {
        if (count_valid(key_modality + (size_t)b * (size_t)length, length) < 0) {
            return CSPKV_TOPK_ERR_MODALITY;
        }
    }
    for (int32_t b = 0; b < batch; ++b) {
        const int32_t n_valid = count_valid(key_modality + (size_t)b * (size_t)length, length);
        if (n_recent[b] < 0 || n_recent[b] > n_keep[b] || n_keep[b] > n_valid) {
            return CSPKV_TOPK_ERR_BUDGET;
        }
    }

    entry* order = malloc((size_t)length * sizeof *order);
    unsigned char* state = malloc((size_t)length);
    if (!order || !state) {
        free(order);
        free(state);
        return CSPKV_TOPK_ERR_OUT_OF_MEMORY;
    }

    for (int32_t b = 0; b < batch; ++b) {
        const int32_t* modality = key_modality + (size_t)b * (size_t)length;
        const int32_t n_valid = count_valid(modality, length);
        const int32_t keep = n_keep[b];   /* C */
        const int32_t recent = n_recent[b]; /* R */
        /* K = C - R selectable slots; K_c = floor(rho * K) in double (base.floor_ratio). */
        const int64_t selectable = (int64_t)keep - recent;
        const int64_t cross_k = (int64_t)floor(cross_ratio * (double)selectable);
        const int64_t self_k = selectable - cross_k;

        for (int32_t h = 0; h < heads; ++h) {
            const size_t row = (size_t)b * (size_t)heads + (size_t)h;
            const float* self_row = self_scores + row * (size_t)length;
            const float* cross_row = cross_scores + row * (size_t)length;
            int64_t* out_row = out + row * (size_t)c_max;

            /* regions(): recent = valid and j >= n_valid - R; candidates = the other valid keys. */
            for (int32_t j = 0; j < length; ++j) {
                if (modality[j] < 0) {
                    state[j] = STATE_PADDING;
                } else {
                    state[j] = j >= n_valid - recent ? STATE_KEPT : STATE_CANDIDATE;
                }
            }
            take_top(cross_row, state, length, cross_k, order); /* by_cross */
            take_top(self_row, state, length, self_k, order);   /* by_self, among the rest */

            /* Kept positions ascending, then the others ascending, first c_max of them. */
            int32_t written = 0;
            for (int32_t j = 0; j < length && written < c_max; ++j) {
                if (state[j] == STATE_KEPT) {
                    out_row[written++] = j;
                }
            }
            for (int32_t j = 0; j < length && written < c_max; ++j) {
                if (state[j] != STATE_KEPT) {
                    out_row[written++] = j;
                }
            }
        }
    }
    free(order);
    free(state);
    return CSPKV_TOPK_OK;
}
