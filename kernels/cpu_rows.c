/* The row pass of the chunked CPU path, fused: one block's scores -> probabilities + row statistics.
 *
 * Called through ctypes by kernels/cpu_native.py (which compiles this file once with the system C
 * compiler and caches the library); kernels/chunked.py keeps the plain PyTorch version of the same
 * computation and uses it whenever this library is unavailable. The definitions are those of
 * kernels/spec.py (StatRequest), executed by kernels/reference.py.
 *
 * Layout. `s` holds the scores of `rows = B * H * Qb` query rows, `Kb` keys each, row-major
 * ([batch, head, query, key]); they are overwritten by e = exp(s - max) (0 where a key is not
 * visible) and `inv_z` gets 1 / sum e per row: p = e * inv_z, and the caller scales e @ V by
 * inv_z instead of normalising the row (one pass over memory fewer). Query row r = (bh, qi) sees keys [lo[qi], hi[qi]) (the causal / sliding-window
 * structure, block-local indices) that are also valid in `kvalid[b, :]` (padding; NULL = all).
 * `tq[qi]` is the query's own index in block-local key coordinates (t - k0), so t - s = tq - j.
 *
 * Per row, three passes over the visible keys (the row stays in L1/L2):
 *   1. max m (vectorised) and, if asked, the first key reaching it (argmax);
 *   2. e_j = exp(s_j - m), written in place, with Z = sum e, sum e*s (entropy = lse - sum p*s)
 *      and sum e*j (distance = tq - sum p*j) accumulated on the way;
 *   3. if column sums are asked for, p_j = e_j / Z added to this thread's (received attention).
 * Range statistics (sink, spans, recent mass, windowed distance) sum e over their key ranges
 * only, between passes 2 and 3.
 *
 * NaN / inf (kernels/spec.py): a row with a visible NaN or +inf score is NaN throughout (e, inv_z
 * and every float statistic; argmax 0), as eager attention's softmax gives; -inf scores (an inf in
 * k) are keys with probability 0.
 *
 * Portable C with GCC/Clang vector extensions (8 float lanes: AVX2 ymm, 2x NEON, ...); rows are
 * split over threads with OpenMP (hs_rows_par).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f vsel(v8i m, v8f a, v8f b) {             /* m ? a : b, lane by lane */
    v8i ai, bi, ri;
    memcpy(&ai, &a, sizeof ai); memcpy(&bi, &b, sizeof bi);
    ri = (ai & m) | (bi & ~m);
    v8f r; memcpy(&r, &ri, sizeof r); return r;
}
static inline v8f vmax(v8f a, v8f b) { return vsel(a > b, a, b); }
static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); exactly 0 below -87 (where expf is < 2^-125
 * and the probability it feeds is below 1e-38 anyway), exactly 1 at x = 0. */
static inline v8f vexp(v8f x) {
    const v8f lo = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    v8i dead = x < lo;
    v8f xc = vsel(dead, lo, x);
    v8f fx = xc * 1.44269504088896341f;
    fx = (fx + 12582912.0f) - 12582912.0f;                    /* round to nearest integer */
    v8f r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;     /* x - n ln 2, two-constant split */
    v8f y = r * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    v8i n = __builtin_convertvector(fx, v8i);
    v8i bits = (n + 127) << 23;                               /* 2^n, n in [-126, 0] */
    v8f scale;
    memcpy(&scale, &bits, sizeof scale);
    y = y * scale;
    const v8f zero = {0};
    return vsel(dead, zero, y);
}

static inline float sexp(float x) {                           /* the same function, one lane */
    float a[8] = {x, 0, 0, 0, 0, 0, 0, 0};
    return vexp(load8(a))[0];
}

/* Process rows [r0, r1). Outputs may be NULL when not wanted (their flag is off). */
void hs_rows(float *s, int64_t r0, int64_t r1, int64_t H, int64_t Qb, int64_t Kb,
             const int64_t *lo, const int64_t *hi, const int64_t *tq, const uint8_t *kvalid,
             /* per-batch key-local ranges (already clipped to [0, Kb]) */
             const int64_t *sink_hi, int64_t nspans, const int64_t *span_lo, const int64_t *span_hi,
             int64_t W, int64_t R, int64_t recv_mode, int64_t recv_a, int64_t recv_b,
             int64_t want_argmax,
             float *lse, float *ent, float *dist, float *wdist, float *recent, float *sink,
             float *spans, float *max_prob, int64_t *argmax, float *colsum /* [B*H, Kb] */,
             float *inv_z /* [rows] 1 / Z, 0 for a dead row */)
{
    const float NEG_INF = -INFINITY, MASKED = -1e30f;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t bh = r / Qb, qi = r % Qb, b = bh / H;
        float *row = s + r * Kb;
        const uint8_t *kv = kvalid ? kvalid + b * Kb : NULL;
        int64_t l = lo[qi], h = hi[qi];
        if (l < 0) l = 0;
        if (h > Kb) h = Kb;
        const int64_t t = tq[qi];
        if (kv)                        /* padding: masked keys get a finite -1e30 (exp -> 0, 0 * x = 0) */
            for (int64_t j = l; j < h; j++) row[j] = kv[j] ? row[j] : MASKED;

        /* pass 1: max over visible keys, and whether any is NaN (x != x) */
        float m = NEG_INF;
        int nan_row = 0;
        if (l < h) {
            v8f mv = {NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF};
            v8i nv = {0};
            int64_t j = l;
            {                          /* four independent maxima: no loop-carried latency chain */
                v8f m1 = mv, m2 = mv, m3 = mv;
                for (; j + 32 <= h; j += 32) {
                    v8f x0 = load8(row + j), x1 = load8(row + j + 8);
                    v8f x2 = load8(row + j + 16), x3 = load8(row + j + 24);
                    mv = vsel(x0 > mv, x0, mv); m1 = vsel(x1 > m1, x1, m1);
                    m2 = vsel(x2 > m2, x2, m2); m3 = vsel(x3 > m3, x3, m3);
                    nv |= (x0 != x0) | (x1 != x1) | (x2 != x2) | (x3 != x3);
                }
                for (; j + 8 <= h; j += 8) { v8f x = load8(row + j); mv = vsel(x > mv, x, mv); nv |= x != x; }
                mv = vsel(m1 > mv, m1, mv); m2 = vsel(m3 > m2, m3, m2); mv = vsel(m2 > mv, m2, mv);
            }
            for (int k = 0; k < 8; k++) { m = mv[k] > m ? mv[k] : m; nan_row |= nv[k] != 0; }
            for (; j < h; j++) { if (row[j] > m) m = row[j]; nan_row |= row[j] != row[j]; }
        }
        if (nan_row || m == INFINITY) {                        /* NaN or +inf score: a NaN row */
            const float qnan = NAN;
            for (int64_t k = 0; k < Kb; k++) row[k] = qnan;
            if (lse) lse[r] = qnan;
            if (ent) ent[r] = qnan;
            if (dist) dist[r] = qnan;
            if (wdist) wdist[r] = qnan;
            if (recent) recent[r] = qnan;
            if (sink) sink[r] = qnan;
            for (int64_t k = 0; k < nspans; k++) spans[r * nspans + k] = qnan;
            if (max_prob) max_prob[r] = qnan;
            if (argmax) argmax[r] = 0;
            inv_z[r] = qnan;
            float *c = colsum ? colsum + bh * Kb : NULL;       /* NaN reaches the keys it could see */
            if (c) {
                int64_t c0 = l, c1 = h;
                if (recv_mode == 2) {
                    if (t - recv_b > c0) c0 = t - recv_b;
                    if (t - recv_a + 1 < c1) c1 = t - recv_a + 1;
                }
                for (int64_t k = c0; k < c1; k++) if (!kv || kv[k]) c[k] = qnan;
            }
            continue;
        }
        if (m <= MASKED) {                                     /* no visible key: a dead row */
            memset(row, 0, (size_t)Kb * sizeof(float));
            if (lse) lse[r] = NEG_INF;
            if (ent) ent[r] = 0.f;
            if (dist) dist[r] = 0.f;
            if (wdist) wdist[r] = 0.f;
            if (recent) recent[r] = 0.f;
            if (sink) sink[r] = 0.f;
            for (int64_t k = 0; k < nspans; k++) spans[r * nspans + k] = 0.f;
            if (max_prob) max_prob[r] = 0.f;
            if (argmax) argmax[r] = 0;
            inv_z[r] = 0.f;
            continue;
        }
        if (want_argmax) {                                     /* first key reaching the max */
            int64_t a = l;
            for (; a < h; a++) if (row[a] == m) break;
            argmax[r] = a;
        }

        /* pass 2: e = exp(s - m) in place; Z, sum e*s, sum e*j */
        if (l > 0) memset(row, 0, (size_t)l * sizeof(float));
        if (h < Kb) memset(row + h, 0, (size_t)(Kb - h) * sizeof(float));
        /* two sets of accumulators (16 keys a step) halve the add-latency chains */
        v8f zv = {0}, sv = {0}, jv = {0}, zw = {0}, sw = {0}, jw = {0};
        const v8f mv = {m, m, m, m, m, m, m, m};
        const v8f fl = {-88.f, -88.f, -88.f, -88.f, -88.f, -88.f, -88.f, -88.f};   /* exp -> 0, e*x -> 0 */
        v8f jf = {0, 1, 2, 3, 4, 5, 6, 7};                     /* j - l, as floats */
        const v8f eight = {8, 8, 8, 8, 8, 8, 8, 8};
        int64_t j = l;
        {
            for (; j + 16 <= h; j += 16) {
                v8f x0 = vmax(load8(row + j) - mv, fl), x1 = vmax(load8(row + j + 8) - mv, fl);
                v8f e0 = vexp(x0), e1 = vexp(x1);
                store8(row + j, e0);
                store8(row + j + 8, e1);
                zv += e0; zw += e1;
                sv += e0 * x0; sw += e1 * x1;                  /* sum e*(s - m): better conditioned */
                jv += e0 * jf; jw += e1 * (jf + eight);
                jf += eight + eight;
            }
            for (; j + 8 <= h; j += 8) {
                v8f x = vmax(load8(row + j) - mv, fl);
                v8f e = vexp(x);
                store8(row + j, e);
                zv += e; sv += e * x; jv += e * jf;
                jf += eight;
            }
        }
        zv += zw; sv += sw; jv += jw;
        float Z = hsum8(zv), SES = hsum8(sv), SEJ = hsum8(jv) + (float)l * Z;
        for (; j < h; j++) {
            float x = row[j] - m < -88.f ? -88.f : row[j] - m, e = sexp(x);
            row[j] = e; Z += e; SES += e * x; SEJ += e * (float)j;
        }
        const float invZ = 1.0f / Z;
        inv_z[r] = invZ;
        const float L = m + logf(Z);
        if (lse) lse[r] = L;
        if (ent) ent[r] = logf(Z) - SES * invZ;                /* -sum p log p = log Z - sum p (s - m) */
        if (dist) {                    /* sum p max(t - j, 0): keys after t (non-causal) count 0 */
            float after = 0.f;
            for (int64_t k = t + 1 > l ? t + 1 : l; k < h; k++) after += row[k] * (float)(k - t);
            dist[r] = (float)t - (SEJ - after) * invZ;
        }
        if (max_prob) max_prob[r] = invZ;                      /* e = 1 at the max */

        /* range statistics over e (0 outside the visible keys) */
        if (sink) {
            float a = 0.f;
            for (int64_t k = 0; k < sink_hi[b]; k++) a += row[k];
            sink[r] = a * invZ;
        }
        for (int64_t sp = 0; sp < nspans; sp++) {
            float a = 0.f;
            for (int64_t k = span_lo[b * nspans + sp]; k < span_hi[b * nspans + sp]; k++) a += row[k];
            spans[r * nspans + sp] = a * invZ;
        }
        if (wdist) {       /* sum p min(max(t - j, 0), W) = W - sum_{t - j < W} p (W - max(t - j, 0)) */
            float a = 0.f;
            int64_t k0 = t - W + 1 > 0 ? t - W + 1 : 0;
            for (int64_t k = k0; k < Kb; k++) a += row[k] * (float)(W - (t - k > 0 ? t - k : 0));
            wdist[r] = (float)W - a * invZ;
        }
        if (recent) {                  /* sum p over max(t - j, 0) < R */
            float a = 0.f;
            int64_t k0 = t - R + 1 > 0 ? t - R + 1 : 0;
            for (int64_t k = k0; k < Kb; k++) a += row[k];
            recent[r] = a * invZ;
        }

        /* pass 3: column sums of p = e / Z (received attention) */
        float *col = colsum ? colsum + bh * Kb : NULL;
        if (col && recv_mode == 1) {
            const v8f iv = {invZ, invZ, invZ, invZ, invZ, invZ, invZ, invZ};
            j = l;
            for (; j + 8 <= h; j += 8) store8(col + j, load8(col + j) + load8(row + j) * iv);
            for (; j < h; j++) col[j] += row[j] * invZ;
        } else if (col && recv_mode == 2) {                    /* only queries with a <= t - j <= b */
            int64_t c0 = t - recv_b, c1 = t - recv_a + 1;
            if (c0 < l) c0 = l;
            if (c1 > h) c1 = h;
            for (int64_t k = c0; k < c1; k++) col[k] += row[k] * invZ;
        }
    }
}

/* All rows, split over `nt` OpenMP threads (the same libgomp as PyTorch's, so one thread pool);
 * thread i adds its column sums to colsum + i * B*H*Kb. Without OpenMP it runs on one thread. */
void hs_rows_par(int64_t nt, float *s, int64_t n_rows, int64_t H, int64_t Qb, int64_t Kb,
                 const int64_t *lo, const int64_t *hi, const int64_t *tq, const uint8_t *kvalid,
                 const int64_t *sink_hi, int64_t nspans, const int64_t *span_lo, const int64_t *span_hi,
                 int64_t W, int64_t R, int64_t recv_mode, int64_t recv_a, int64_t recv_b,
                 int64_t want_argmax,
                 float *lse, float *ent, float *dist, float *wdist, float *recent, float *sink,
                 float *spans, float *max_prob, int64_t *argmax, float *colsum, float *inv_z)
{
    const int64_t col_stride = (n_rows / Qb) * Kb;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t i = 0; i < nt; i++) {
        hs_rows(s, n_rows * i / nt, n_rows * (i + 1) / nt, H, Qb, Kb, lo, hi, tq, kvalid,
                sink_hi, nspans, span_lo, span_hi, W, R, recv_mode, recv_a, recv_b, want_argmax,
                lse, ent, dist, wdist, recent, sink, spans, max_prob, argmax,
                colsum ? colsum + i * col_stride : NULL, inv_z);
    }
}
