/* Unit tests of libcspkv: scripted sequences whose expected slots were worked out by hand from
 * slot_reference.py, the layouts of the K/V copies, every error path, and the allocator hooks.
 * Prints failures to stderr and ends with "N passed, M failed"; exit status 1 if M > 0. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cspkv.h"

static int n_pass, n_fail;

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (cond) {                                                              \
            n_pass++;                                                            \
        } else {                                                                 \
            n_fail++;                                                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                        \
    } while (0)

/* Status comparison that prints both codes on failure. */
#define CHECK_ST(expr, want)                                                          \
    do {                                                                              \
        int got_ = (expr);                                                            \
        if (got_ == (want)) {                                                         \
            n_pass++;                                                                 \
        } else {                                                                      \
            n_fail++;                                                                 \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d\n", __FILE__, __LINE__, \
                    #expr, got_, cspkv_status_string(got_), (int)(want));              \
        }                                                                             \
    } while (0)

/* ---- helpers ---- */

static cspkv_config config(int L, int H, int S, int D, int dtype, int eviction, int n_recent,
                           int n_sink, int null_slot, float null_logit) {
    cspkv_config c;
    cspkv_config_init(&c);
    c.n_layers = L;
    c.n_kv_heads = H;
    c.n_slots = S;
    c.head_dim = D;
    c.dtype = dtype;
    c.eviction = eviction;
    c.n_recent = n_recent;
    c.n_sink = n_sink;
    c.has_null_slot = null_slot;
    c.null_logit = null_logit;
    return c;
}

static cspkv_buffer *make(cspkv_config c) {
    cspkv_buffer *b = NULL;
    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_OK);
    return b;
}

#include "kv_pattern.h"

/* The value held at (l, k, h, s, d) of a buffer. */
static uint32_t kv_at(const cspkv_buffer *b, int l, int k, int h, int s, int d) {
    cspkv_config c;
    void *kv;
    cspkv_get_config(b, &c);
    cspkv_kv_pointer(b, &kv);
    size_t elem = c.dtype == CSPKV_DTYPE_F16 ? 2 : 4;
    size_t i = ((((size_t)l * 2 + k) * c.n_kv_heads + h) * c.n_slots + s) * c.head_dim + d;
    return get(kv, i, elem);
}

/* A write_token delta [L, 2, 1, H, 1, D] tagged with `pos`. */
static void make_delta(void *out, int L, int H, int D, int64_t pos, size_t elem) {
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 2; k++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < D; d++) put(out, (((size_t)l * 2 + k) * H + h) * D + d, tag(l, k, h, pos, d), elem);
}

/* Every valid slot of every head holds the tags of its position (mask: tag mod 2^16 for fp16). */
static int kv_matches_positions(const cspkv_buffer *b) {
    cspkv_config c;
    cspkv_get_config(b, &c);
    size_t n = (size_t)c.n_layers * c.n_kv_heads * c.n_slots;
    int64_t *pos = malloc(n * sizeof *pos);
    cspkv_get_positions(b, pos, n);
    uint32_t mask = c.dtype == CSPKV_DTYPE_F16 ? 0xFFFFu : 0xFFFFFFFFu;
    int ok = 1;
    for (int l = 0; l < c.n_layers; l++)
        for (int h = 0; h < c.n_kv_heads; h++)
            for (int s = 0; s < c.n_slots; s++) {
                int64_t p = pos[((size_t)l * c.n_kv_heads + h) * c.n_slots + s];
                if (p < 0) continue;
                for (int k = 0; k < 2; k++)
                    for (int d = 0; d < c.head_dim; d++)
                        if (kv_at(b, l, k, h, s, d) != (tag(l, k, h, p, d) & mask)) ok = 0;
            }
    free(pos);
    return ok;
}

static int null_slot_is_zero(const cspkv_buffer *b) {
    cspkv_config c;
    cspkv_get_config(b, &c);
    for (int l = 0; l < c.n_layers; l++)
        for (int k = 0; k < 2; k++)
            for (int h = 0; h < c.n_kv_heads; h++)
                for (int d = 0; d < c.head_dim; d++)
                    if (kv_at(b, l, k, h, c.n_slots - 1, d) != 0) return 0;
    return 1;
}

/* Prefill of C entries per head from positions pos[lh*C + i], tagged K/V, modality 1. */
static int prefill(cspkv_buffer *b, int C, const int64_t *pos, const int32_t *n_valid,
                   const float *scores, int64_t prompt_len) {
    cspkv_config c;
    cspkv_get_config(b, &c);
    int L = c.n_layers, H = c.n_kv_heads, D = c.head_dim;
    size_t elem = c.dtype == CSPKV_DTYPE_F16 ? 2 : 4, n_entries = (size_t)L * H * C;
    size_t kv_n = (size_t)L * 2 * H * C * D;
    void *kv = calloc(kv_n ? kv_n : 1, elem);
    int8_t *mod = malloc(n_entries ? n_entries : 1);
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 2; k++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < C; i++)
                    for (int d = 0; d < D; d++)
                        put(kv, ((((size_t)l * 2 + k) * H + h) * C + i) * D + d,
                            tag(l, k, h, pos[((size_t)l * H + h) * C + i], d), elem);
    memset(mod, 1, n_entries ? n_entries : 1);
    int st = cspkv_load_prefill(b, C, kv, kv_n * elem, pos, mod, scores, n_entries, n_valid,
                                (size_t)L * H, prompt_len);
    free(kv);
    free(mod);
    return st;
}

/* choose + write of one token tagged with its position; slots_out may be NULL. */
static int step(cspkv_buffer *b, int64_t pos, int32_t *slots_out) {
    cspkv_config c;
    cspkv_get_config(b, &c);
    size_t n_lh = (size_t)c.n_layers * c.n_kv_heads, elem = c.dtype == CSPKV_DTYPE_F16 ? 2 : 4;
    int32_t slots[64];
    int st = cspkv_choose_write_slots(b, pos, slots, n_lh);
    if (st != CSPKV_OK) return st;
    void *delta = malloc(n_lh * 2 * c.head_dim * elem);
    make_delta(delta, c.n_layers, c.n_kv_heads, c.head_dim, pos, elem);
    st = cspkv_write_token(b, slots, n_lh, delta, n_lh * 2 * c.head_dim * elem, pos, 0);
    free(delta);
    if (slots_out) memcpy(slots_out, slots, n_lh * sizeof *slots);
    return st;
}

/* Snapshot of all metadata, to check that a failed call changed nothing. */
typedef struct { uint8_t v[256]; int64_t p[256]; int8_t m[256]; float s[256]; int64_t plen; } snap;

static snap take(const cspkv_buffer *b) {
    snap x;
    memset(&x, 0, sizeof x);
    cspkv_config c;
    cspkv_get_config(b, &c);
    size_t n = (size_t)c.n_layers * c.n_kv_heads * c.n_slots;
    cspkv_get_valid(b, x.v, n);
    cspkv_get_positions(b, x.p, n);
    cspkv_get_modality(b, x.m, n);
    cspkv_get_scores(b, x.s, n);
    cspkv_get_prompt_len(b, &x.plen);
    return x;
}

static int same(snap a, snap b) { return memcmp(&a, &b, sizeof a) == 0; }

/* ---- tests ---- */

static void test_abi_and_strings(void) {
    CHECK(cspkv_abi_version() == CSPKV_ABI_VERSION);
    for (int s = CSPKV_OK; s <= CSPKV_ERR_NON_FINITE; s++)
        CHECK(strcmp(cspkv_status_string(s), "unknown status") != 0);
    CHECK(strcmp(cspkv_status_string(-1), "unknown status") == 0);
    CHECK(strcmp(cspkv_status_string(CSPKV_ERR_NON_FINITE + 1), "unknown status") == 0);
    CHECK_ST(cspkv_config_init(NULL), CSPKV_ERR_NULL_POINTER);
}

static void test_config_errors(void) {
    cspkv_buffer *b = (cspkv_buffer *)&b; /* must be overwritten with NULL on failure */
    cspkv_config ok = config(1, 1, 4, 2, CSPKV_DTYPE_F32, CSPKV_EVICT_RING, 0, 0, 0, 0.f), c;
    CHECK_ST(cspkv_create(NULL, NULL, &b), CSPKV_ERR_NULL_POINTER);
    CHECK_ST(cspkv_create(&ok, NULL, NULL), CSPKV_ERR_NULL_POINTER);
    c = ok; c.abi_version = CSPKV_ABI_VERSION + 1;
    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_ABI_MISMATCH);
    CHECK(b == NULL);
    c = ok; c.n_layers = 0;    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.n_kv_heads = -1; CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.n_slots = 0;     CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.head_dim = 0;    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.dtype = 2;       CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.eviction = 7;      CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.n_recent = -1;   CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.n_sink = -1;     CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.has_null_slot = 2; CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.has_null_slot = 1; c.n_slots = 1;
    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.has_null_slot = 1; c.null_logit = NAN;
    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    c = ok; c.has_null_slot = 1; c.null_logit = -INFINITY;
    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_INVALID_ARGUMENT);
    /* Sizes whose product overflows size_t are refused before any allocation. */
    c = ok; c.n_layers = c.n_kv_heads = c.n_slots = c.head_dim = 0x7fffffff;
    CHECK_ST(cspkv_create(&c, NULL, &b), CSPKV_ERR_OUT_OF_MEMORY);
    CHECK(b == NULL);
    cspkv_destroy(NULL); /* no-op */
}

static void test_create_and_getters(void) {
    cspkv_buffer *b = make(config(2, 3, 5, 4, CSPKV_DTYPE_F32, CSPKV_EVICT_RING, 0, 0, 0, 0.f));
    size_t kv_bytes = 0, host_bytes = 0;
    CHECK_ST(cspkv_bytes_held(b, &kv_bytes, &host_bytes), CSPKV_OK);
    CHECK(kv_bytes == 2 * 2 * 3 * 5 * 4 * 4);
    CHECK(host_bytes >= 2 * 3 * 5 * 14);
    CHECK_ST(cspkv_bytes_held(b, NULL, NULL), CSPKV_OK);
    CHECK_ST(cspkv_bytes_held(NULL, &kv_bytes, NULL), CSPKV_ERR_NULL_POINTER);
    void *kv = NULL;
    CHECK_ST(cspkv_kv_pointer(b, &kv), CSPKV_OK);
    CHECK(kv != NULL && ((uintptr_t)kv % 64) == 0);
    int zero = 1;
    for (size_t i = 0; i < kv_bytes; i++) zero &= ((unsigned char *)kv)[i] == 0;
    CHECK(zero);

    uint8_t v[30]; int64_t p[30]; int8_t m[30]; float s[30]; int32_t nv[6]; int64_t plen = 9;
    CHECK_ST(cspkv_get_valid(b, v, 30), CSPKV_OK);
    CHECK_ST(cspkv_get_positions(b, p, 30), CSPKV_OK);
    CHECK_ST(cspkv_get_modality(b, m, 30), CSPKV_OK);
    CHECK_ST(cspkv_get_scores(b, s, 30), CSPKV_OK);
    CHECK_ST(cspkv_get_n_valid(b, nv, 6), CSPKV_OK);
    CHECK_ST(cspkv_get_prompt_len(b, &plen), CSPKV_OK);
    int fresh = plen == 0;
    for (int i = 0; i < 30; i++) fresh &= v[i] == 0 && p[i] == -1 && m[i] == -1 && s[i] == 0.f;
    for (int i = 0; i < 6; i++) fresh &= nv[i] == 0;
    CHECK(fresh);
    /* Wrong sizes and NULLs. */
    CHECK_ST(cspkv_get_valid(b, v, 29), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_get_positions(b, p, 31), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_get_modality(b, NULL, 30), CSPKV_ERR_NULL_POINTER);
    CHECK_ST(cspkv_get_scores(NULL, s, 30), CSPKV_ERR_NULL_POINTER);
    CHECK_ST(cspkv_get_n_valid(b, nv, 30), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_get_prompt_len(b, NULL), CSPKV_ERR_NULL_POINTER);
    CHECK_ST(cspkv_kv_pointer(b, NULL), CSPKV_ERR_NULL_POINTER);
    cspkv_config c;
    CHECK_ST(cspkv_get_config(b, &c), CSPKV_OK);
    CHECK(c.n_layers == 2 && c.n_kv_heads == 3 && c.n_slots == 5 && c.head_dim == 4);
    CHECK_ST(cspkv_get_config(b, NULL), CSPKV_ERR_NULL_POINTER);
    float bias[30];
    CHECK_ST(cspkv_attention_bias(b, bias, 30), CSPKV_OK);
    int all_inf = 1;
    for (int i = 0; i < 30; i++) all_inf &= isinf(bias[i]) && bias[i] < 0;
    CHECK(all_inf);
    CHECK_ST(cspkv_attention_bias(b, bias, 29), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_attention_bias(NULL, bias, 30), CSPKV_ERR_NULL_POINTER);
    CHECK_ST(cspkv_reset(NULL), CSPKV_ERR_NULL_POINTER);
    cspkv_destroy(b);
}

static void test_ring_scripted(void) {
    /* 1 layer, 2 heads, 4 slots; head 0 keeps prompt positions 3 and 7, head 1 only 5. */
    cspkv_buffer *b = make(config(1, 2, 4, 3, CSPKV_DTYPE_F32, CSPKV_EVICT_RING, 0, 0, 0, 0.f));
    int64_t pos[4] = {3, 7, 5, 99};
    int32_t nv[2] = {2, 1}, slots[2], n_valid[2];
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 10), CSPKV_OK);
    CHECK(kv_matches_positions(b));
    CHECK_ST(step(b, 10, slots), CSPKV_OK); CHECK(slots[0] == 2 && slots[1] == 1);
    CHECK_ST(step(b, 11, slots), CSPKV_OK); CHECK(slots[0] == 3 && slots[1] == 2);
    /* head 0 is full: the oldest generated token (10, slot 2) goes; head 1 still has slot 3. */
    CHECK_ST(step(b, 12, slots), CSPKV_OK); CHECK(slots[0] == 2 && slots[1] == 3);
    CHECK_ST(step(b, 13, slots), CSPKV_OK); CHECK(slots[0] == 3 && slots[1] == 1);
    CHECK_ST(step(b, 14, slots), CSPKV_OK); CHECK(slots[0] == 2 && slots[1] == 2);
    CHECK(kv_matches_positions(b));
    snap x = take(b);
    /* Prompt entries are never overwritten by the ring. */
    CHECK(x.p[0] == 3 && x.p[1] == 7 && x.p[4] == 5);
    CHECK(x.p[2] == 14 && x.p[3] == 13 && x.p[5] == 13 && x.p[6] == 14 && x.p[7] == 12);
    CHECK(x.m[0] == 1 && x.m[2] == 0);
    CHECK_ST(cspkv_get_n_valid(b, n_valid, 2), CSPKV_OK);
    CHECK(n_valid[0] == 4 && n_valid[1] == 4);
    float bias[8];
    cspkv_attention_bias(b, bias, 8);
    int zeros = 1;
    for (int i = 0; i < 8; i++) zeros &= bias[i] == 0.f;
    CHECK(zeros);
    /* Between choose and write the chosen slot is free (bias -inf). */
    CHECK_ST(cspkv_choose_write_slots(b, 15, slots, 2), CSPKV_OK);
    cspkv_attention_bias(b, bias, 8);
    CHECK(isinf(bias[slots[0]]) && isinf(bias[4 + slots[1]]) && bias[0] == 0.f);
    cspkv_destroy(b);

    /* G = 0: a buffer full of prompt has nothing the ring may overwrite; nothing changes. */
    b = make(config(1, 2, 3, 2, CSPKV_DTYPE_F32, CSPKV_EVICT_RING, 0, 0, 0, 0.f));
    int64_t full[6] = {0, 1, 2, 0, 1, 2};
    int32_t nv2[2] = {2, 3};
    CHECK_ST(prefill(b, 3, full, nv2, NULL, 3), CSPKV_OK);
    snap before = take(b);
    CHECK_ST(cspkv_choose_write_slots(b, 3, slots, 2), CSPKV_ERR_NO_EVICTABLE);
    CHECK(same(before, take(b)));
    int32_t want[2] = {2, 0};
    float delta[8] = {0};
    CHECK_ST(cspkv_write_token(b, want, 2, delta, sizeof delta, 3, 0), CSPKV_ERR_BAD_STATE);
    cspkv_destroy(b);
}

static void test_rescore_scripted(void) {
    /* n_recent 1, n_sink 1: the newest position and position 0 are protected. */
    cspkv_buffer *b = make(config(1, 1, 4, 2, CSPKV_DTYPE_F32, CSPKV_EVICT_RESCORE, 1, 1, 0, 0.f));
    int64_t pos[3] = {0, 1, 2};
    int32_t nv[1] = {3}, slot;
    float scores[3] = {5.f, 1.f, 3.f};
    CHECK_ST(prefill(b, 3, pos, nv, scores, 3), CSPKV_OK);
    CHECK_ST(step(b, 3, &slot), CSPKV_OK); CHECK(slot == 3);
    float mass[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    CHECK_ST(cspkv_accumulate(b, mass, 4), CSPKV_OK);
    snap x = take(b);
    CHECK(x.s[0] == 5.5f && x.s[1] == 1.5f && x.s[2] == 3.5f && x.s[3] == 0.5f);
    /* Candidates: slot 1 (1.5) and 2 (3.5); slot 3 (pos 3 >= 4 - 1) and slot 0 (sink) protected. */
    CHECK_ST(step(b, 4, &slot), CSPKV_OK); CHECK(slot == 1);
    /* Now pos 4 (slot 1) is recent; candidates slot 2 (3.5), slot 3 (0.5). */
    CHECK_ST(step(b, 5, &slot), CSPKV_OK); CHECK(slot == 3);
    CHECK(kv_matches_positions(b));
    /* Ties go to the lowest slot. Scores now: s0 5.5 (sink), s1 0 (pos 4), s2 3.5, s3 0 (pos 5);
     * raising s1 to 3.5 ties it with s2. */
    float m2[4] = {0.f, 3.5f, 0.f, 0.f};
    CHECK_ST(cspkv_accumulate(b, m2, 4), CSPKV_OK);
    CHECK_ST(step(b, 6, &slot), CSPKV_OK); CHECK(slot == 1); /* s1 3.5 == s2 3.5, pos 5 recent */
    cspkv_destroy(b);

    /* All-or-nothing: head 0 has a victim, head 1 holds only sinks -> error, head 0 untouched. */
    b = make(config(1, 2, 2, 1, CSPKV_DTYPE_F32, CSPKV_EVICT_RESCORE, 0, 2, 0, 0.f));
    int64_t p2[4] = {5, 6, 0, 1};
    int32_t nv2[2] = {2, 2}, slots[2];
    CHECK_ST(prefill(b, 2, p2, nv2, NULL, 8), CSPKV_OK);
    snap before = take(b);
    CHECK_ST(cspkv_choose_write_slots(b, 8, slots, 2), CSPKV_ERR_NO_EVICTABLE);
    CHECK(same(before, take(b)));
    cspkv_destroy(b);

    /* Everything recent: nothing to evict. */
    b = make(config(1, 1, 2, 1, CSPKV_DTYPE_F32, CSPKV_EVICT_RESCORE, 10, 0, 0, 0.f));
    CHECK_ST(step(b, 0, &slot), CSPKV_OK);
    CHECK_ST(step(b, 1, &slot), CSPKV_OK);
    CHECK_ST(step(b, 2, &slot), CSPKV_ERR_NO_EVICTABLE);
    cspkv_destroy(b);
}

static void test_null_slot(void) {
    float logit = logf(2.f);
    cspkv_buffer *b = make(config(1, 2, 3, 2, CSPKV_DTYPE_F16, CSPKV_EVICT_RING, 0, 0, 1, logit));
    float bias[6];
    CHECK_ST(cspkv_attention_bias(b, bias, 6), CSPKV_OK);
    CHECK(bias[2] == logit && bias[5] == logit && isinf(bias[0]) && isinf(bias[4]));
    int32_t slots[2];
    for (int64_t p = 0; p < 6; p++) {
        CHECK_ST(step(b, p, slots), CSPKV_OK);
        CHECK(slots[0] < 2 && slots[1] < 2);
    }
    CHECK(null_slot_is_zero(b));
    CHECK(kv_matches_positions(b));
    CHECK_ST(cspkv_attention_bias(b, bias, 6), CSPKV_OK);
    CHECK(bias[0] == 0.f && bias[1] == 0.f && bias[2] == logit);
    /* The null slot can never be written, even after choosing. */
    CHECK_ST(cspkv_choose_write_slots(b, 6, slots, 2), CSPKV_OK);
    int32_t null_slots[2] = {2, 2};
    uint16_t delta[8] = {0};
    CHECK_ST(cspkv_write_token(b, null_slots, 2, delta, sizeof delta, 6, 0),
             CSPKV_ERR_SLOT_OUT_OF_RANGE);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 6, 0), CSPKV_OK);
    /* The prompt may use only the usable slots. */
    int64_t pos[6] = {0, 1, 2, 0, 1, 2};
    int32_t nv[2] = {3, 3};
    CHECK_ST(prefill(b, 3, pos, nv, NULL, 3), CSPKV_ERR_CAPACITY);
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 3), CSPKV_ERR_INVALID_ARGUMENT); /* n_valid 3 > C */
    nv[0] = nv[1] = 2;
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 3), CSPKV_OK);
    /* Reset re-zeroes the null slot even if someone wrote it through the raw pointer. */
    void *kv;
    cspkv_kv_pointer(b, &kv);
    ((uint16_t *)kv)[2 * 2] = 0x3c00; /* (l0, K, h0, slot 2, d0) */
    CHECK(!null_slot_is_zero(b));
    CHECK_ST(cspkv_reset(b), CSPKV_OK);
    CHECK(null_slot_is_zero(b));
    snap x = take(b);
    CHECK(x.v[0] == 0 && x.p[0] == -1 && x.plen == 0);
    cspkv_destroy(b);
}

static void test_layouts(void) {
    /* fp32 and fp16 both move bit patterns exactly, into [L, 2, H, S, D]. */
    for (int dt = 0; dt < 2; dt++) {
        cspkv_buffer *b = make(config(2, 3, 4, 5, dt, CSPKV_EVICT_RING, 0, 0, 0, 0.f));
        int64_t pos[18];
        int32_t nv[6] = {3, 0, 1, 2, 3, 1};
        for (int i = 0; i < 18; i++) pos[i] = 17 - i; /* distinct and < prompt_len 20 */
        CHECK_ST(prefill(b, 3, pos, nv, NULL, 20), CSPKV_OK);
        CHECK(kv_matches_positions(b));
        for (int64_t p = 20; p < 26; p++) CHECK_ST(step(b, p, NULL), CSPKV_OK);
        CHECK(kv_matches_positions(b));
        int32_t n_valid[6];
        cspkv_get_n_valid(b, n_valid, 6);
        int full = 1;
        for (int i = 0; i < 6; i++) full &= n_valid[i] == 4;
        CHECK(full);
        cspkv_destroy(b);
    }
}

static void test_validation(void) {
    cspkv_buffer *b = make(config(1, 2, 4, 2, CSPKV_DTYPE_F32, CSPKV_EVICT_RING, 0, 0, 0, 0.f));
    int64_t pos[4] = {0, 1, 0, 1};
    int32_t nv[2] = {2, 2}, slots[2];
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 2), CSPKV_OK);
    CHECK_ST(step(b, 2, NULL), CSPKV_OK);
    snap before = take(b);
    float kv[16] = {0}, scores[4] = {0};
    int8_t mod[4] = {0};

    /* load_prefill */
    int64_t bad[4] = {0, 1, 0, 1};
    int32_t bad_nv[2] = {3, 0};
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, NULL, 4, bad_nv, 2, 2),
             CSPKV_ERR_INVALID_ARGUMENT);
    bad_nv[0] = -1;
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, NULL, 4, bad_nv, 2, 2),
             CSPKV_ERR_INVALID_ARGUMENT);
    bad[1] = 2; /* == prompt_len */
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, bad, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_INVALID_ARGUMENT);
    bad[1] = -1;
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, bad, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_INVALID_ARGUMENT);
    bad[1] = 0; /* duplicate of bad[0] in head 0 */
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, bad, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_DUPLICATE_POSITION);
    int32_t nv_one[2] = {1, 2}; /* ...but an ignored entry may be anything */
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, bad, mod, NULL, 4, nv_one, 2, 2), CSPKV_OK);
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 2), CSPKV_OK);
    CHECK_ST(step(b, 2, NULL), CSPKV_OK);
    CHECK(same(before, take(b)));
    mod[3] = -1;
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_INVALID_ARGUMENT);
    mod[3] = 0;
    scores[2] = NAN;
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, scores, 4, nv, 2, 2),
             CSPKV_ERR_NON_FINITE);
    CHECK(strcmp(cspkv_last_error(b), "scores[0, 1, 0] is non-finite (nan)") == 0);
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv - 4, pos, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, NULL, 3, nv, 2, 2),
             CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, NULL, 4, nv, 1, 2),
             CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_load_prefill(b, 5, kv, sizeof kv, pos, mod, NULL, 4, nv, 2, 2), CSPKV_ERR_CAPACITY);
    CHECK_ST(cspkv_load_prefill(b, -1, kv, sizeof kv, pos, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_INVALID_ARGUMENT);
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, NULL, 4, nv, 2, -1),
             CSPKV_ERR_INVALID_ARGUMENT);
    CHECK_ST(cspkv_load_prefill(b, 2, NULL, sizeof kv, pos, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_NULL_POINTER);
    CHECK_ST(cspkv_load_prefill(b, 2, kv, sizeof kv, pos, mod, NULL, 4, NULL, 2, 2),
             CSPKV_ERR_NULL_POINTER);
    CHECK_ST(cspkv_load_prefill(NULL, 2, kv, sizeof kv, pos, mod, NULL, 4, nv, 2, 2),
             CSPKV_ERR_NULL_POINTER);
    CHECK(same(before, take(b)));

    /* choose_write_slots */
    CHECK_ST(cspkv_choose_write_slots(b, 1, slots, 2), CSPKV_ERR_INVALID_ARGUMENT); /* < prompt_len */
    CHECK_ST(cspkv_choose_write_slots(b, 2, slots, 2), CSPKV_ERR_DUPLICATE_POSITION);
    CHECK_ST(cspkv_choose_write_slots(b, 3, slots, 1), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_choose_write_slots(b, 3, NULL, 2), CSPKV_ERR_NULL_POINTER);
    CHECK(same(before, take(b)));

    /* write_token: only right after its choose, with the same slots and position. */
    float delta[8] = {0}; /* [1, 2, 1, 2, 1, 2] */
    int32_t s3[2] = {3, 3};
    CHECK_ST(cspkv_write_token(b, s3, 2, delta, sizeof delta, 3, 0), CSPKV_ERR_BAD_STATE);
    CHECK_ST(cspkv_choose_write_slots(b, 3, slots, 2), CSPKV_OK);
    CHECK(slots[0] == 3 && slots[1] == 3);
    snap chosen = take(b);
    int32_t other[2] = {3, 1}, neg[2] = {-1, 3}, big[2] = {3, 4};
    CHECK_ST(cspkv_write_token(b, other, 2, delta, sizeof delta, 3, 0), CSPKV_ERR_BAD_STATE);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 4, 0), CSPKV_ERR_BAD_STATE);
    CHECK_ST(cspkv_write_token(b, neg, 2, delta, sizeof delta, 3, 0), CSPKV_ERR_SLOT_OUT_OF_RANGE);
    CHECK_ST(cspkv_write_token(b, big, 2, delta, sizeof delta, 3, 0), CSPKV_ERR_SLOT_OUT_OF_RANGE);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 3, 128), CSPKV_ERR_INVALID_ARGUMENT);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 3, -1), CSPKV_ERR_INVALID_ARGUMENT);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta - 1, 3, 0), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_write_token(b, slots, 1, delta, sizeof delta, 3, 0), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_write_token(b, slots, 2, NULL, sizeof delta, 3, 0), CSPKV_ERR_NULL_POINTER);
    CHECK(same(chosen, take(b)));
    /* Choosing again replaces the pending choice (same free slots, new position). */
    CHECK_ST(cspkv_choose_write_slots(b, 4, slots, 2), CSPKV_OK);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 3, 0), CSPKV_ERR_BAD_STATE);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 4, 7), CSPKV_OK);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 4, 7), CSPKV_ERR_BAD_STATE); /* twice */
    /* load_prefill and reset cancel a pending choice. */
    CHECK_ST(cspkv_choose_write_slots(b, 5, slots, 2), CSPKV_OK);
    CHECK_ST(cspkv_reset(b), CSPKV_OK);
    CHECK_ST(cspkv_write_token(b, slots, 2, delta, sizeof delta, 5, 0), CSPKV_ERR_BAD_STATE);

    /* accumulate: mass of free slots is ignored, non-finite mass or score at valid slots refused. */
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 2), CSPKV_OK);
    float mass[8] = {1.f, 2.f, NAN, INFINITY, 3.f, 4.f, NAN, -INFINITY};
    CHECK_ST(cspkv_accumulate(b, mass, 8), CSPKV_OK);
    snap acc = take(b);
    CHECK(acc.s[0] == 1.f && acc.s[1] == 2.f && acc.s[2] == 0.f && acc.s[4] == 3.f && acc.s[5] == 4.f);
    mass[0] = NAN;
    CHECK_ST(cspkv_accumulate(b, mass, 8), CSPKV_ERR_NON_FINITE);
    CHECK(strcmp(cspkv_last_error(b), "mass[0, 0, 0] is non-finite (nan)") == 0);
    mass[0] = 3e38f; /* 1 + 3e38 is finite, but adding it twice overflows to +inf */
    CHECK_ST(cspkv_accumulate(b, mass, 8), CSPKV_OK);
    CHECK(strcmp(cspkv_last_error(b), "") == 0); /* a success clears the detail */
    CHECK_ST(cspkv_accumulate(b, mass, 8), CSPKV_ERR_NON_FINITE);
    CHECK(strstr(cspkv_last_error(b), "mass[0, 0, 0] = 3e+38 would make that slot's score overflow") != NULL);
    CHECK(take(b).s[4] == 6.f); /* the refused call added nothing */
    CHECK_ST(cspkv_accumulate(b, mass, 7), CSPKV_ERR_SIZE_MISMATCH);
    CHECK_ST(cspkv_accumulate(b, NULL, 8), CSPKV_ERR_NULL_POINTER);

    /* An empty prompt needs no arrays. */
    int32_t zero_nv[2] = {0, 0};
    CHECK_ST(cspkv_load_prefill(b, 0, NULL, 0, NULL, NULL, NULL, 0, zero_nv, 2, 0), CSPKV_OK);
    CHECK_ST(step(b, 0, slots), CSPKV_OK);
    CHECK(slots[0] == 0 && slots[1] == 0);
    cspkv_destroy(b);
}

/* ---- allocator hooks: a fake "device" that counts calls and can be told to fail ---- */

typedef struct {
    int allocs, frees, fail_alloc, fail_copy_after;
    size_t alloc_bytes, zero_bytes, caller_bytes;
    void *ptr;
} fake_dev;

static void *dev_alloc(void *u, size_t n) {
    fake_dev *d = u;
    if (d->fail_alloc) return NULL;
    d->allocs++;
    d->alloc_bytes = n;
    d->ptr = malloc(n);
    return d->ptr;
}

static void dev_free(void *u, void *p, size_t n) {
    fake_dev *d = u;
    d->frees += p == d->ptr && n == d->alloc_bytes;
    free(p);
}

static int dev_copy(void *u, void *dst, const void *src, size_t n, int kind) {
    fake_dev *d = u;
    if (d->fail_copy_after == 0) return -1;
    if (d->fail_copy_after > 0) d->fail_copy_after--;
    /* dst must lie inside the allocation: the library computes addresses, the hook copies. */
    if ((char *)dst < (char *)d->ptr || (char *)dst + n > (char *)d->ptr + d->alloc_bytes) return -2;
    if (kind == CSPKV_COPY_HOST_ZEROS) d->zero_bytes += n;
    else d->caller_bytes += n;
    memcpy(dst, src, n);
    return 0;
}

static void test_allocator_hooks(void) {
    cspkv_config c = config(2, 2, 3, 4, CSPKV_DTYPE_F16, CSPKV_EVICT_RING, 0, 0, 1, 0.f);
    fake_dev d = {.fail_copy_after = -1};
    cspkv_allocator a = {dev_alloc, dev_free, dev_copy, &d};
    cspkv_buffer *b = NULL;
    CHECK_ST(cspkv_create(&c, &a, &b), CSPKV_OK);
    size_t kv_bytes = 0;
    cspkv_bytes_held(b, &kv_bytes, NULL);
    CHECK(d.allocs == 1 && d.alloc_bytes == kv_bytes && kv_bytes == 2 * 2 * 2 * 3 * 4 * 2);
    CHECK(d.zero_bytes == kv_bytes); /* create clears the whole buffer through the hook */
    void *kv;
    cspkv_kv_pointer(b, &kv);
    CHECK(kv == d.ptr);
    int32_t slots[4];
    CHECK_ST(step(b, 0, slots), CSPKV_OK);
    CHECK(d.caller_bytes == 2 * 2 * 2 * 4 * 2);
    /* A failing copy commits nothing and keeps the choice pending, so the write can be retried. */
    CHECK_ST(cspkv_choose_write_slots(b, 1, slots, 4), CSPKV_OK);
    snap chosen = take(b);
    uint16_t delta[32] = {0};
    make_delta(delta, 2, 2, 4, 1, 2);
    d.fail_copy_after = 3;
    CHECK_ST(cspkv_write_token(b, slots, 4, delta, sizeof delta, 1, 0), CSPKV_ERR_COPY_FAILED);
    CHECK(same(chosen, take(b)));
    d.fail_copy_after = -1;
    CHECK_ST(cspkv_write_token(b, slots, 4, delta, sizeof delta, 1, 0), CSPKV_OK);
    CHECK(kv_matches_positions(b) && null_slot_is_zero(b));
    /* Hook-allocated K/V may live on a device: the library never reads them, so a NaN passes. */
    CHECK_ST(cspkv_choose_write_slots(b, 2, slots, 4), CSPKV_OK);
    make_delta(delta, 2, 2, 4, 2, 2);
    delta[5] = 0x7e00u;
    CHECK_ST(cspkv_write_token(b, slots, 4, delta, sizeof delta, 2, 0), CSPKV_OK);
    /* A failing prefill copy leaves the buffer reset. */
    int64_t pos[8] = {0, 1, 0, 1, 0, 1, 0, 1};
    int32_t nv[4] = {2, 2, 2, 2};
    d.fail_copy_after = 10; /* the null-slot zeroing (8 copies) succeeds, the K/V copies fail */
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 2), CSPKV_ERR_COPY_FAILED);
    snap x = take(b);
    CHECK(x.v[0] == 0 && x.plen == 0);
    d.fail_copy_after = 0;
    CHECK_ST(cspkv_reset(b), CSPKV_ERR_COPY_FAILED);
    d.fail_copy_after = -1;
    CHECK_ST(prefill(b, 2, pos, nv, NULL, 2), CSPKV_OK);
    CHECK(kv_matches_positions(b));
    cspkv_destroy(b);
    CHECK(d.frees == 1);

    /* Failures inside create release everything (ASan / valgrind check for leaks). */
    fake_dev d2 = {.fail_alloc = 1, .fail_copy_after = -1};
    cspkv_allocator a2 = {dev_alloc, dev_free, dev_copy, &d2};
    CHECK_ST(cspkv_create(&c, &a2, &b), CSPKV_ERR_OUT_OF_MEMORY);
    CHECK(b == NULL && d2.frees == 0);
    fake_dev d3 = {.fail_copy_after = 0};
    cspkv_allocator a3 = {dev_alloc, dev_free, dev_copy, &d3};
    CHECK_ST(cspkv_create(&c, &a3, &b), CSPKV_ERR_COPY_FAILED);
    CHECK(b == NULL && d3.allocs == 1 && d3.frees == 1);
    cspkv_allocator missing = {dev_alloc, NULL, dev_copy, &d};
    CHECK_ST(cspkv_create(&c, &missing, &b), CSPKV_ERR_NULL_POINTER);
}

/* Non-finite K/V are refused by load_prefill and write_token (fp32 and fp16 alike), naming where;
 * nothing changes. With an allocator the library never reads K/V, so it cannot check them. */
static void test_non_finite_kv(void) {
    const uint32_t bad32[3] = {0x7fc00000u /* nan */, 0x7f800000u /* +inf */, 0xff800000u /* -inf */};
    const uint16_t bad16[3] = {0x7e00u, 0x7c00u, 0xfc00u};
    for (int dtype = CSPKV_DTYPE_F32; dtype <= CSPKV_DTYPE_F16; dtype++) {
        size_t elem = dtype == CSPKV_DTYPE_F16 ? 2 : 4;
        cspkv_buffer *b = make(config(2, 2, 4, 3, dtype, CSPKV_EVICT_RING, 0, 0, 0, 0.f));
        int32_t nv[4] = {2, 2, 2, 1}, slots[4];
        int8_t mod[8] = {0};
        int64_t pos8[8] = {0, 1, 1, 0, 0, 1, 1, 0};
        unsigned char kv[2 * 2 * 2 * 2 * 3 * 4] = {0}; /* [L 2, 2, H 2, C 2, D 3] zeros: finite */
        size_t kv_nbytes = 2 * 2 * 2 * 2 * 3 * elem;
        CHECK_ST(cspkv_load_prefill(b, 2, kv, kv_nbytes, pos8, mod, NULL, 8, nv, 4, 2), CSPKV_OK);
        snap before = take(b);
        for (int v = 0; v < 3; v++) {
            /* layer 1, V, head 0, entry 1, dim 2: element ((1*2+1)*2+0)*2*3 + 1*3 + 2 */
            size_t at = ((1 * 2 + 1) * 2 + 0) * 2 * 3 + 1 * 3 + 2;
            if (elem == 4) memcpy(kv + at * 4, &bad32[v], 4); else memcpy(kv + at * 2, &bad16[v], 2);
            CHECK_ST(cspkv_load_prefill(b, 2, kv, kv_nbytes, pos8, mod, NULL, 8, nv, 4, 2),
                     CSPKV_ERR_NON_FINITE);
            CHECK(strcmp(cspkv_last_error(b), "kv: non-finite value at layer 1, V, kv_head 0, entry 1, dim 2") == 0);
            CHECK(same(before, take(b)));
            memset(kv + at * elem, 0, elem);
        }
        /* an entry past n_valid (layer 1, head 1 keeps one entry) is ignored, whatever it holds */
        size_t ignored = ((1 * 2 + 0) * 2 + 1) * 2 * 3 + 1 * 3 + 0;
        memcpy(kv + ignored * elem, elem == 4 ? (const void *)&bad32[0] : (const void *)&bad16[0], elem);
        CHECK_ST(cspkv_load_prefill(b, 2, kv, kv_nbytes, pos8, mod, NULL, 8, nv, 4, 2), CSPKV_OK);

        unsigned char delta[2 * 2 * 2 * 3 * 4] = {0}; /* [L 2, 2, 1, H 2, 1, D 3] */
        size_t delta_nbytes = 2 * 2 * 2 * 3 * elem;
        CHECK_ST(cspkv_choose_write_slots(b, 2, slots, 4), CSPKV_OK);
        snap chosen = take(b);
        size_t at = ((0 * 2 + 1) * 2 + 1) * 3 + 1; /* layer 0, V, head 1, dim 1 */
        memcpy(delta + at * elem, elem == 4 ? (const void *)&bad32[1] : (const void *)&bad16[1], elem);
        CHECK_ST(cspkv_write_token(b, slots, 4, delta, delta_nbytes, 2, 0), CSPKV_ERR_NON_FINITE);
        CHECK(strcmp(cspkv_last_error(b), "kv_delta: non-finite value at layer 0, V, kv_head 1, dim 1") == 0);
        CHECK(same(chosen, take(b))); /* the choice stays pending: a finite retry succeeds */
        memset(delta + at * elem, 0, elem);
        CHECK_ST(cspkv_write_token(b, slots, 4, delta, delta_nbytes, 2, 0), CSPKV_OK);
        CHECK(strcmp(cspkv_last_error(b), "") == 0);
        cspkv_destroy(b);
    }
    CHECK(strcmp(cspkv_last_error(NULL), "") == 0);
    CHECK(strcmp(cspkv_status_string(CSPKV_ERR_NON_FINITE), "non-finite value (NaN or infinity)") == 0);
}

int main(void) {
    test_abi_and_strings();
    test_config_errors();
    test_create_and_getters();
    test_ring_scripted();
    test_rescore_scripted();
    test_null_slot();
    test_layouts();
    test_validation();
    test_allocator_hooks();
    test_non_finite_kv();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
