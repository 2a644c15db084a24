/* Fuzz-style test of libcspkv: random operation sequences (valid and invalid) on random small
 * buffers, from a fixed seed, checking the slot-table invariants after every operation:
 *   - at most the usable slots are valid; the null slot never is, and its K/V stay zero;
 *   - positions are unique among the valid slots of each (layer, head);
 *   - a choice takes the lowest free slot; else ring evicts the oldest generated token, and
 *     rescore the lowest-score token that is neither recent nor a sink (ties: lowest slot);
 *   - NO_EVICTABLE exactly when some head has no free slot and no candidate, and changes nothing;
 *   - the attention bias matches validity; every valid slot holds the K/V written for its position;
 *   - a rejected call changes no metadata.
 * usage: fuzz_cspkv SEED OPS. Ends with "N passed, M failed" (it stops at the first failure). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cspkv.h"

#define MAXL 3
#define MAXH 3
#define MAXS 10
#define MAXD 4
#define MAXLH (MAXL * MAXH)
#define MAXMETA (MAXLH * MAXS)

static uint64_t rng;
static long op_index, n_ok_calls, n_error_calls, n_evictions[2], n_no_evictable;

static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static int rnd(int n) { return (int)(next_u64() % (uint64_t)n); }
static float rnd_unit(void) { return (float)(next_u64() >> 40) / (float)(1 << 24); }

static void fail(int line, const char *what) {
    fprintf(stderr, "fuzz_cspkv.c:%d: op %ld: %s\n", line, op_index, what);
    printf("%ld passed, 1 failed\n", op_index);
    exit(1);
}
#define REQUIRE(cond) do { if (!(cond)) fail(__LINE__, #cond); } while (0)

#include "kv_pattern.h"

/* NaN, +inf and -inf both as fp32 and in their low 16 bits as fp16. */
static const uint32_t NON_FINITE[3] = {0x7fc07e00u, 0x7f807c00u, 0xff80fc00u};

/* A fake device allocator that refuses copies landing outside its allocation. */
typedef struct { void *ptr; size_t n; } fake_dev;
static void *dev_alloc(void *u, size_t n) { fake_dev *d = u; d->n = n; return d->ptr = malloc(n); }
static void dev_free(void *u, void *p, size_t n) { (void)u; (void)n; free(p); }
static int dev_copy(void *u, void *dst, const void *src, size_t n, int kind) {
    fake_dev *d = u;
    (void)kind;
    if ((char *)dst < (char *)d->ptr || (char *)dst + n > (char *)d->ptr + d->n) return -1;
    memcpy(dst, src, n);
    return 0;
}

/* Metadata of the whole buffer, as read back through the getters. */
typedef struct { uint8_t v[MAXMETA]; int64_t p[MAXMETA]; int8_t m[MAXMETA]; float s[MAXMETA]; int64_t plen; } meta;

typedef struct {
    cspkv_buffer *b;
    cspkv_config c;
    int L, H, S, D, U;
    size_t elem, n_lh, n_meta;
    int64_t next_pos;      /* next fresh decode position */
    int pending;           /* a choice is waiting for its write */
    int host;              /* no allocator: the library checks K/V for NaN and infinity */
    int64_t pending_pos;
    int32_t pending_slots[MAXLH];
    meta before;           /* state before the current operation */
} ctx;

static meta read_meta(const ctx *x) {
    meta m;
    memset(&m, 0, sizeof m);
    REQUIRE(cspkv_get_valid(x->b, m.v, x->n_meta) == CSPKV_OK);
    REQUIRE(cspkv_get_positions(x->b, m.p, x->n_meta) == CSPKV_OK);
    REQUIRE(cspkv_get_modality(x->b, m.m, x->n_meta) == CSPKV_OK);
    REQUIRE(cspkv_get_scores(x->b, m.s, x->n_meta) == CSPKV_OK);
    REQUIRE(cspkv_get_prompt_len(x->b, &m.plen) == CSPKV_OK);
    return m;
}

static int same_meta(const meta *a, const meta *b) { return memcmp(a, b, sizeof *a) == 0; }

/* Invariants that hold after every operation. */
static void check_invariants(const ctx *x) {
    meta m = read_meta(x);
    float bias[MAXMETA];
    int32_t n_valid[MAXLH];
    void *kv;
    REQUIRE(cspkv_attention_bias(x->b, bias, x->n_meta) == CSPKV_OK);
    REQUIRE(cspkv_get_n_valid(x->b, n_valid, x->n_lh) == CSPKV_OK);
    REQUIRE(cspkv_kv_pointer(x->b, &kv) == CSPKV_OK);
    uint32_t mask = x->elem == 2 ? 0xFFFFu : 0xFFFFFFFFu;
    for (int l = 0; l < x->L; l++)
        for (int h = 0; h < x->H; h++) {
            size_t row = ((size_t)l * x->H + h) * x->S;
            int count = 0;
            for (int s = 0; s < x->S; s++) {
                size_t i = row + s;
                if (s >= x->U) { /* the null slot */
                    REQUIRE(!m.v[i] && bias[i] == x->c.null_logit);
                    for (int k = 0; k < 2; k++)
                        for (int d = 0; d < x->D; d++)
                            REQUIRE(get(kv, ((((size_t)l * 2 + k) * x->H + h) * x->S + s) * x->D + d, x->elem) == 0);
                    continue;
                }
                if (!m.v[i]) {
                    REQUIRE(m.p[i] == -1 && m.m[i] == -1 && m.s[i] == 0.f);
                    REQUIRE(isinf(bias[i]) && bias[i] < 0);
                    continue;
                }
                count++;
                REQUIRE(bias[i] == 0.f && m.p[i] >= 0 && m.m[i] >= 0 && isfinite(m.s[i]));
                for (int t = s + 1; t < x->U; t++) REQUIRE(!m.v[row + t] || m.p[row + t] != m.p[i]);
                for (int k = 0; k < 2; k++)
                    for (int d = 0; d < x->D; d++)
                        REQUIRE(get(kv, ((((size_t)l * 2 + k) * x->H + h) * x->S + s) * x->D + d, x->elem) ==
                                (tag(l, k, h, m.p[i], d) & mask));
            }
            REQUIRE(count <= x->U && n_valid[(size_t)l * x->H + h] == count);
        }
}

/* Is slot i of a full row a legal victim, per the eviction, for a token at `position`? */
static int is_candidate(const ctx *x, const meta *m, size_t i, int64_t position) {
    if (!m->v[i]) return 0;
    if (x->c.eviction == CSPKV_EVICT_RING) return m->p[i] >= m->plen;
    return m->p[i] < position - x->c.n_recent && m->p[i] >= x->c.n_sink;
}

/* Better victim than `best` (ring: older; rescore: lower score). Ties keep the lower slot. */
static int better(const ctx *x, const meta *m, size_t i, size_t best) {
    return x->c.eviction == CSPKV_EVICT_RING ? m->p[i] < m->p[best] : m->s[i] < m->s[best];
}

static void op_choose(ctx *x) {
    int64_t position = x->next_pos;
    int32_t slots[MAXLH];
    /* Expected outcome, from the state before the call. */
    int expect_ok = 1;
    for (size_t lh = 0; lh < x->n_lh; lh++) {
        int any = 0;
        for (int s = 0; s < x->U; s++) {
            size_t i = lh * x->S + s;
            any |= !x->before.v[i] || is_candidate(x, &x->before, i, position);
        }
        expect_ok &= any;
    }
    int st = cspkv_choose_write_slots(x->b, position, slots, x->n_lh);
    if (!expect_ok) {
        REQUIRE(st == CSPKV_ERR_NO_EVICTABLE);
        meta now = read_meta(x);
        REQUIRE(same_meta(&now, &x->before));
        n_error_calls++;
        n_no_evictable++;
        return;
    }
    REQUIRE(st == CSPKV_OK);
    n_ok_calls++;
    meta now = read_meta(x);
    for (size_t lh = 0; lh < x->n_lh; lh++) {
        size_t row = lh * x->S;
        int s = slots[lh], first_free = -1;
        REQUIRE(s >= 0 && s < x->U);
        for (int t = 0; t < x->U && first_free < 0; t++)
            if (!x->before.v[row + t]) first_free = t;
        if (first_free >= 0) {
            REQUIRE(s == first_free);
        } else {
            /* The victim is legal (ring: generated; rescore: not recent, not a sink)... */
            REQUIRE(is_candidate(x, &x->before, row + s, position));
            n_evictions[x->c.eviction]++;
            /* ...and no other candidate beats it, nor ties it from a lower slot. */
            for (int t = 0; t < x->U; t++) {
                if (t == s || !is_candidate(x, &x->before, row + t, position)) continue;
                REQUIRE(!better(x, &x->before, row + t, row + s));
                if (t < s) REQUIRE(better(x, &x->before, row + s, row + t));
            }
        }
        /* The chosen slot is now free; nothing else moved. */
        for (int t = 0; t < x->S; t++) {
            size_t i = row + t;
            if (t == s) REQUIRE(!now.v[i] && now.p[i] == -1);
            else REQUIRE(now.v[i] == x->before.v[i] && now.p[i] == x->before.p[i] && now.s[i] == x->before.s[i]);
        }
    }
    x->pending = 1;
    x->pending_pos = position;
    memcpy(x->pending_slots, slots, sizeof slots);
    x->next_pos += 1 + (rnd(8) == 0 ? rnd(5) : 0); /* occasional gaps in positions */
}

static void op_write(ctx *x) {
    if (!x->pending) return;
    unsigned char delta[2 * MAXLH * MAXD * 4];
    for (int l = 0; l < x->L; l++)
        for (int k = 0; k < 2; k++)
            for (int h = 0; h < x->H; h++)
                for (int d = 0; d < x->D; d++)
                    put(delta, (((size_t)l * 2 + k) * x->H + h) * x->D + d, tag(l, k, h, x->pending_pos, d), x->elem);
    int modality = rnd(3);
    if (x->host && rnd(10) == 0) { /* one NaN or infinity: refused, nothing changes, the choice stays pending */
        x->before = read_meta(x); /* a decode step ran its choose since the op began */
        size_t at = (size_t)rnd((int)(2 * x->n_lh * (size_t)x->D));
        put(delta, at, NON_FINITE[rnd(3)], x->elem);
        REQUIRE(cspkv_write_token(x->b, x->pending_slots, x->n_lh, delta, 2 * x->n_lh * x->D * x->elem,
                                  x->pending_pos, modality) == CSPKV_ERR_NON_FINITE);
        meta now = read_meta(x);
        REQUIRE(same_meta(&now, &x->before));
        n_error_calls++;
        return;
    }
    REQUIRE(cspkv_write_token(x->b, x->pending_slots, x->n_lh, delta, 2 * x->n_lh * x->D * x->elem,
                              x->pending_pos, modality) == CSPKV_OK);
    n_ok_calls++;
    meta now = read_meta(x);
    for (size_t lh = 0; lh < x->n_lh; lh++) {
        size_t i = lh * x->S + x->pending_slots[lh];
        REQUIRE(now.v[i] && now.p[i] == x->pending_pos && now.m[i] == modality && now.s[i] == 0.f);
    }
    x->pending = 0;
}

static void op_prefill(ctx *x, int make_duplicate) {
    int c = rnd(x->U + 1);
    int64_t prompt_len = c + rnd(6);
    int64_t pos[MAXLH * MAXS], pool[MAXS + 6];
    int8_t mod[MAXLH * MAXS];
    float scores[MAXLH * MAXS];
    int32_t n_valid[MAXLH];
    unsigned char kv[MAXLH * 2 * MAXS * MAXD * 4];
    int with_scores = rnd(2);
    for (size_t lh = 0; lh < x->n_lh; lh++) {
        /* c distinct positions from [0, prompt_len): a partial Fisher-Yates shuffle. */
        for (int64_t i = 0; i < prompt_len; i++) pool[i] = i;
        for (int i = 0; i < c; i++) {
            int j = i + rnd((int)prompt_len - i);
            int64_t t = pool[i]; pool[i] = pool[j]; pool[j] = t;
            pos[lh * c + i] = pool[i];
            mod[lh * c + i] = (int8_t)rnd(3);
            scores[lh * c + i] = rnd_unit() * 4.f;
        }
        n_valid[lh] = rnd(c + 1);
    }
    for (int l = 0; l < x->L; l++)
        for (int k = 0; k < 2; k++)
            for (int h = 0; h < x->H; h++)
                for (int i = 0; i < c; i++)
                    for (int d = 0; d < x->D; d++) {
                        size_t lh = (size_t)l * x->H + h;
                        /* Entries past n_valid are padding: junk (even NaN) that must not be loaded. */
                        uint32_t v = i < n_valid[lh] ? tag(l, k, h, pos[lh * c + i], d) : NON_FINITE[(i + d) % 3];
                        put(kv, ((((size_t)l * 2 + k) * x->H + h) * c + i) * x->D + d, v, x->elem);
                    }
    int want = CSPKV_OK;
    size_t poison_lh = (size_t)rnd((int)x->n_lh);
    if (x->host && !make_duplicate && n_valid[poison_lh] > 0 && rnd(10) == 0) { /* a NaN/inf in a loaded entry */
        int l = (int)(poison_lh / (size_t)x->H), h = (int)(poison_lh % (size_t)x->H), k = rnd(2);
        int i = rnd(n_valid[poison_lh]), d = rnd(x->D);
        put(kv, ((((size_t)l * 2 + k) * x->H + h) * c + i) * x->D + d, NON_FINITE[rnd(3)], x->elem);
        want = CSPKV_ERR_NON_FINITE;
    }
    if (make_duplicate) {
        size_t lh = (size_t)rnd((int)x->n_lh);
        if (n_valid[lh] < 2) return;
        pos[lh * c + 1] = pos[lh * c];
        want = CSPKV_ERR_DUPLICATE_POSITION;
    }
    int st = cspkv_load_prefill(x->b, c, kv, x->n_lh * 2 * c * x->D * x->elem, pos, mod,
                                with_scores ? scores : NULL, x->n_lh * c, n_valid, x->n_lh, prompt_len);
    REQUIRE(st == want);
    meta now = read_meta(x);
    if (want != CSPKV_OK) {
        REQUIRE(same_meta(&now, &x->before));
        n_error_calls++;
        return;
    }
    n_ok_calls++;
    REQUIRE(now.plen == prompt_len);
    for (size_t lh = 0; lh < x->n_lh; lh++)
        for (int s = 0; s < x->S; s++) {
            size_t i = lh * x->S + s, src = lh * c + s;
            if (s < n_valid[lh])
                REQUIRE(now.v[i] && now.p[i] == pos[src] && now.m[i] == mod[src] &&
                        now.s[i] == (with_scores ? scores[src] : 0.f));
            else
                REQUIRE(!now.v[i]);
        }
    x->pending = 0;
    x->next_pos = prompt_len + rnd(3);
}

static void op_accumulate(ctx *x) {
    float mass[MAXMETA];
    for (size_t i = 0; i < x->n_meta; i++) mass[i] = rnd(4) == 0 ? 0.f : rnd_unit();
    size_t poisoned = x->n_meta;
    if (rnd(10) == 0) {
        poisoned = (size_t)rnd((int)x->n_meta);
        mass[poisoned] = rnd(2) ? NAN : INFINITY;
    }
    int st = cspkv_accumulate(x->b, mass, x->n_meta);
    meta now = read_meta(x);
    if (poisoned < x->n_meta && x->before.v[poisoned]) { /* only valid slots' mass is looked at */
        REQUIRE(st == CSPKV_ERR_NON_FINITE && same_meta(&now, &x->before));
        n_error_calls++;
        return;
    }
    REQUIRE(st == CSPKV_OK);
    n_ok_calls++;
    for (size_t i = 0; i < x->n_meta; i++)
        REQUIRE(now.s[i] == (x->before.v[i] ? x->before.s[i] + mass[i] : 0.f));
}

/* One rejected call; afterwards the metadata must be exactly as before. */
static void op_bad_call(ctx *x) {
    int32_t slots[MAXLH];
    float buf[MAXMETA];
    unsigned char delta[2 * MAXLH * MAXD * 4] = {0};
    size_t delta_bytes = 2 * x->n_lh * x->D * x->elem;
    int st = CSPKV_OK, want = CSPKV_OK;
    memcpy(slots, x->pending_slots, sizeof slots);
    switch (rnd(8)) {
    case 0: /* a slot that is not usable (the null slot, past the end, negative) */
        slots[rnd((int)x->n_lh)] = rnd(2) ? x->U + rnd(3) : -1 - rnd(3);
        st = cspkv_write_token(x->b, slots, x->n_lh, delta, delta_bytes, x->pending_pos, 0);
        want = CSPKV_ERR_SLOT_OUT_OF_RANGE;
        break;
    case 1: /* write without a choice, or at another position than the chosen one */
        if (!x->pending) memset(slots, 0, sizeof slots);
        st = cspkv_write_token(x->b, slots, x->n_lh, delta, delta_bytes,
                               x->pending ? x->pending_pos + 1 : x->next_pos, 0);
        want = CSPKV_ERR_BAD_STATE;
        break;
    case 2: { /* a position already held, or a prompt position */
        int64_t held = -1;
        for (size_t i = 0; i < x->n_meta; i++)
            if (x->before.v[i] && x->before.p[i] >= x->before.plen) held = x->before.p[i];
        if (held >= 0) {
            st = cspkv_choose_write_slots(x->b, held, slots, x->n_lh);
            want = CSPKV_ERR_DUPLICATE_POSITION;
        } else if (x->before.plen > 0) {
            st = cspkv_choose_write_slots(x->b, rnd((int)x->before.plen), slots, x->n_lh);
            want = CSPKV_ERR_INVALID_ARGUMENT;
        }
        break;
    }
    case 3: { /* more prompt entries than usable slots */
        int32_t n_valid[MAXLH] = {0};
        st = cspkv_load_prefill(x->b, x->U + 1, delta, 0, NULL, NULL, NULL, 0, n_valid, x->n_lh, 0);
        want = CSPKV_ERR_CAPACITY;
        break;
    }
    case 4: /* wrong sizes */
        st = cspkv_attention_bias(x->b, buf, x->n_meta - 1);
        want = CSPKV_ERR_SIZE_MISMATCH;
        if (st == want) st = cspkv_accumulate(x->b, buf, x->n_meta + 1);
        if (st == want) st = cspkv_choose_write_slots(x->b, x->next_pos, slots, x->n_lh + 1);
        if (st == want) st = cspkv_write_token(x->b, slots, x->n_lh, delta, delta_bytes + 1, 0, 0);
        break;
    case 5: /* NULL pointers */
        st = cspkv_choose_write_slots(x->b, x->next_pos, NULL, x->n_lh);
        want = CSPKV_ERR_NULL_POINTER;
        if (st == want) st = cspkv_write_token(x->b, slots, x->n_lh, NULL, delta_bytes, 0, 0);
        if (st == want) st = cspkv_accumulate(x->b, NULL, x->n_meta);
        if (st == want) st = cspkv_get_valid(x->b, NULL, x->n_meta);
        break;
    case 6: /* a duplicated prompt position */
        op_prefill(x, 1);
        return;
    default: /* modality that does not fit int8 */
        if (!x->pending) return; /* in-range slots needed, or the slot check fires first */
        st = cspkv_write_token(x->b, slots, x->n_lh, delta, delta_bytes, x->pending_pos, rnd(2) ? -1 : 128);
        want = CSPKV_ERR_INVALID_ARGUMENT;
        break;
    }
    if (want == CSPKV_OK) return; /* nothing applicable in this state */
    if (st != want) fprintf(stderr, "got %d (%s), want %d\n", st, cspkv_status_string(st), want);
    REQUIRE(st == want);
    n_error_calls++;
    meta now = read_meta(x);
    REQUIRE(same_meta(&now, &x->before));
}

static void run_episode(long n_ops) {
    ctx x;
    memset(&x, 0, sizeof x);
    cspkv_config_init(&x.c);
    x.L = x.c.n_layers = 1 + rnd(MAXL);
    x.H = x.c.n_kv_heads = 1 + rnd(MAXH);
    x.c.has_null_slot = rnd(3) == 0;
    x.S = x.c.n_slots = 1 + x.c.has_null_slot + rnd(MAXS - x.c.has_null_slot);
    x.D = x.c.head_dim = 1 + rnd(MAXD);
    x.c.dtype = rnd(2) ? CSPKV_DTYPE_F16 : CSPKV_DTYPE_F32;
    x.c.eviction = rnd(2) ? CSPKV_EVICT_RESCORE : CSPKV_EVICT_RING;
    x.c.n_recent = rnd(4);
    x.c.n_sink = rnd(4);
    x.c.null_logit = rnd_unit() * 4.f - 2.f;
    x.U = x.S - x.c.has_null_slot;
    x.elem = x.c.dtype == CSPKV_DTYPE_F16 ? 2 : 4;
    x.n_lh = (size_t)x.L * x.H;
    x.n_meta = x.n_lh * x.S;
    fake_dev dev = {0};
    cspkv_allocator hooks = {dev_alloc, dev_free, dev_copy, &dev};
    x.host = rnd(4) != 0;
    REQUIRE(cspkv_create(&x.c, x.host ? NULL : &hooks, &x.b) == CSPKV_OK);
    check_invariants(&x);
    for (long i = 0; i < n_ops; i++, op_index++) {
        x.before = read_meta(&x);
        int r = rnd(100);
        if (r < 10) op_prefill(&x, 0);
        else if (r < 50) { op_choose(&x); if (rnd(8)) op_write(&x); } /* a decode step */
        else if (r < 55) op_write(&x);
        else if (r < 58) op_choose(&x); /* left pending for a later write or bad call */
        else if (r < 75) op_accumulate(&x);
        else if (r < 77) { REQUIRE(cspkv_reset(x.b) == CSPKV_OK); x.pending = 0; n_ok_calls++; }
        else op_bad_call(&x);
        check_invariants(&x);
    }
    cspkv_destroy(x.b);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SEED OPS\n", argv[0]);
        return 2;
    }
    uint64_t seed = strtoull(argv[1], NULL, 10);
    long total = strtol(argv[2], NULL, 10), episodes = 0;
    rng = seed;
    while (op_index < total) {
        long n = 20 + rnd(400);
        run_episode(n < total - op_index ? n : total - op_index);
        episodes++;
    }
    printf("fuzz: seed %llu, %ld ops in %ld buffers: %ld calls ok, %ld rejected as expected "
           "(%ld no-evictable); evictions: %ld ring, %ld rescore\n",
           (unsigned long long)seed, op_index, episodes, n_ok_calls, n_error_calls, n_no_evictable,
           n_evictions[CSPKV_EVICT_RING], n_evictions[CSPKV_EVICT_RESCORE]);
    printf("%ld passed, 0 failed\n", op_index);
    return 0;
}
