/* The Burt-Adelson operators and their adjoints for one element type, included once per type by
 * _pyramid_native.c with REAL (float or double), FMA (fmaf or fma) and NAME(x) (x##_f32 or x##_f64) defined.
 *
 * Every image is an (h, w) row-major plane; a call covers the planes [0, n) of a contiguous stack. The forward
 * operators repeat pyrtok.pyramid's elementwise taps operation for operation, so that both give the same bits:
 *
 *   down:  v = fma(c, 6, (a + e) + 4 (b + d)) down the rows, the same across the columns, then x 1/256;
 *   up:    even = fma(s[i], 6, s[i-1] + s[i+1]), odd = (s[i] + s[i+1]) x 4 across the columns, then down
 *          the rows, then base + alpha x (that).
 *
 * The adjoints (for the backward pass) are exact linear transposes, summed in their own order.
 */

/* One output row of down: rows a..e of the input (reflected indices resolved by the caller). */
static void NAME(down_row)(const REAL *a, const REAL *b, const REAL *c, const REAL *d, const REAL *e,
                           REAL *vp, REAL *out, ptrdiff_t w, ptrdiff_t mw) {
    REAL *v = vp + 2; /* vp[k] = v[refl(k - 2)]: two samples of reflect-101 border on each side */
    for (ptrdiff_t x = 0; x < w; ++x) {
        REAL ae = a[x] + e[x];
        REAL bd = b[x] + d[x];
        v[x] = FMA(c[x], (REAL)6, ae + (REAL)4 * bd);
    }
    for (ptrdiff_t k = -2; k < 0; ++k) v[k] = v[refl(k, w)];
    for (ptrdiff_t k = w; k < 2 * mw + 1; ++k) v[k] = v[refl(k, w)];
    for (ptrdiff_t j = 0; j < mw; ++j) {
        const REAL *p = vp + 2 * j;
        REAL ae = p[0] + p[4];
        REAL bd = p[1] + p[3];
        out[j] = FMA(p[2], (REAL)6, ae + (REAL)4 * bd) * (REAL)(1.0 / 256.0);
    }
}

/* Rows [r0, r1) of down for plane `plane`. */
static void NAME(down_rows)(const struct job *job, ptrdiff_t plane, ptrdiff_t r0, ptrdiff_t r1, void *scratch) {
    ptrdiff_t h = job->h, w = job->w, mh = (h + 1) / 2, mw = (w + 1) / 2;
    const REAL *src = (const REAL *)job->src + plane * h * w;
    REAL *dst = (REAL *)job->dst + plane * mh * mw;
    REAL *vp = (REAL *)scratch;
    for (ptrdiff_t i = r0; i < r1; ++i) {
        ptrdiff_t y = 2 * i;
        NAME(down_row)(src + refl(y - 2, h) * w, src + refl(y - 1, h) * w, src + y * w, src + refl(y + 1, h) * w,
                       src + refl(y + 2, h) * w, vp, dst + i * mw, w, mw);
    }
}

/* Source row i of up, expanded across the columns onto the doubled grid: 2w samples (the first W are used). */
static void NAME(up_expand)(const REAL *s, REAL *out, ptrdiff_t w) {
    if (w == 1) {
        REAL even = FMA(s[0], (REAL)6, s[0] + s[0]);
        out[0] = even;
        out[1] = (s[0] + s[0]) * (REAL)4;
        return;
    }
    out[0] = FMA(s[0], (REAL)6, s[1] + s[1]); /* s[-1] = s[1] on the doubled grid */
    out[1] = (s[0] + s[1]) * (REAL)4;
    for (ptrdiff_t j = 1; j < w - 1; ++j) {
        out[2 * j] = FMA(s[j], (REAL)6, s[j - 1] + s[j + 1]);
        out[2 * j + 1] = (s[j] + s[j + 1]) * (REAL)4;
    }
    ptrdiff_t j = w - 1; /* s[w] = s[w - 1] */
    out[2 * j] = FMA(s[j], (REAL)6, s[j - 1] + s[j]);
    out[2 * j + 1] = (s[j] + s[j]) * (REAL)4;
}

/* Rows [r0, r1) of up for plane `plane`: a ring of three expanded source rows, keyed by their source index. */
static void NAME(up_rows)(const struct job *job, ptrdiff_t plane, ptrdiff_t r0, ptrdiff_t r1, void *scratch) {
    ptrdiff_t h = job->h, w = job->w, H = job->H, W = job->W;
    const REAL *src = (const REAL *)job->src + plane * h * w;
    REAL *dst = (REAL *)job->dst + plane * H * W;
    const REAL *base = job->base ? (const REAL *)job->base + plane * H * W : NULL;
    REAL alpha = (REAL)job->alpha;
    REAL *ring = (REAL *)scratch;
    ptrdiff_t key[3] = {-2, -2, -2};
    for (ptrdiff_t r = r0; r < r1; ++r) {
        ptrdiff_t i = r / 2;
        const REAL *rows[3]; /* expanded source rows i - 1, i, i + 1 with the doubled grid's borders */
        for (int t = 0; t < 3; ++t) {
            ptrdiff_t k = i - 1 + t;
            k = k < 0 ? (h > 1 ? 1 : 0) : (k >= h ? h - 1 : k);
            int slot = (int)(k % 3);
            if (key[slot] != k) {
                NAME(up_expand)(src + k * w, ring + slot * 2 * w, w);
                key[slot] = k;
            }
            rows[t] = ring + slot * 2 * w;
        }
        REAL *out = dst + r * W;
        const REAL *add = base ? base + r * W : NULL;
        if (r % 2 == 0) {
            const REAL *p = rows[0], *c = rows[1], *n = rows[2];
            for (ptrdiff_t x = 0; x < W; ++x) {
                REAL full = FMA(c[x], (REAL)6, p[x] + n[x]);
                out[x] = add ? add[x] + full * alpha : full * alpha;
            }
        } else {
            const REAL *c = rows[1], *n = rows[2];
            for (ptrdiff_t x = 0; x < W; ++x) {
                REAL full = (c[x] + n[x]) * (REAL)4;
                out[x] = add ? add[x] + full * alpha : full * alpha;
            }
        }
    }
}

/* The transpose of down along a row: m samples of g into n. Padded position k = 2j + t of the input received
 * [1, 4, 6, 4, 1][t] g[j]; positions left of 2 and right of n + 1 were reflect-101 copies and fold back onto the
 * samples they copied. `gp` (m + 4) and `acc` (2m + 3) are scratch. */
static void NAME(down_t_line)(const REAL *g, REAL *out, ptrdiff_t m, ptrdiff_t n, REAL *gp, REAL *acc) {
    gp[0] = gp[1] = gp[m + 2] = gp[m + 3] = 0;
    for (ptrdiff_t j = 0; j < m; ++j) gp[j + 2] = g[j];
    for (ptrdiff_t q = 0; q <= m; ++q) { /* acc[2q] from g[q], g[q-1], g[q-2]; acc[2q+1] from g[q], g[q-1] */
        acc[2 * q] = gp[q + 2] + (REAL)6 * gp[q + 1] + gp[q];
        acc[2 * q + 1] = (REAL)4 * (gp[q + 2] + gp[q + 1]);
    }
    acc[2 * m + 2] = gp[m + 3] + (REAL)6 * gp[m + 2] + gp[m + 1];
    for (ptrdiff_t x = 0; x < n; ++x) out[x] = acc[x + 2];
    for (ptrdiff_t k = 0; k < 2 * m + 3; ++k)
        if (k < 2 || k >= n + 2) out[refl(k - 2, n)] += acc[k];
}

/* Row k of the padded column transpose of down: rows k/2, k/2 - 1, k/2 - 2 of `rows` (m rows of w) with weights
 * 1, 6, 1 for even k, rows k/2, k/2 - 1 with 4, 4 for odd k; rows outside [0, m) are zero. out = or += scale x it. */
static void NAME(down_t_row)(const REAL *rows, ptrdiff_t m, ptrdiff_t w, ptrdiff_t k, REAL scale, int add, REAL *out) {
    ptrdiff_t q = k / 2;
    const REAL *r0 = q < m ? rows + q * w : NULL;
    const REAL *r1 = (q >= 1 && q - 1 < m) ? rows + (q - 1) * w : NULL;
    const REAL *r2 = (k % 2 == 0 && q >= 2 && q - 2 < m) ? rows + (q - 2) * w : NULL;
    REAL c0 = k % 2 ? (REAL)4 : (REAL)1, c1 = k % 2 ? (REAL)4 : (REAL)6;
    for (ptrdiff_t x = 0; x < w; ++x) {
        REAL v = (r0 ? c0 * r0[x] : 0) + (r1 ? c1 * r1[x] : 0) + (r2 ? r2[x] : 0);
        out[x] = add ? out[x] + scale * v : scale * v;
    }
}

/* base + the transpose of down for plane `plane` (all rows): g is (mh, mw), base and the output (h, w). */
static void NAME(down_t_plane)(const struct job *job, ptrdiff_t plane, ptrdiff_t r0, ptrdiff_t r1, void *scratch) {
    (void)r0;
    (void)r1;
    ptrdiff_t h = job->h, w = job->w, mh = (h + 1) / 2, mw = (w + 1) / 2;
    const REAL *g = (const REAL *)job->src + plane * mh * mw;
    REAL *dst = (REAL *)job->dst + plane * h * w;
    REAL *rows = (REAL *)scratch; /* (mh, w): each row of g through the row transpose */
    REAL *gp = rows + mh * w;     /* mw + 4 */
    REAL *acc = gp + mw + 4;      /* 2 mw + 3 */
    const REAL scale = (REAL)(1.0 / 256.0);
    const REAL *base = job->base ? (const REAL *)job->base + plane * h * w : NULL;
    for (ptrdiff_t j = 0; j < mh; ++j) NAME(down_t_line)(g + j * mw, rows + j * w, mw, w, gp, acc);
    for (ptrdiff_t y = 0; y < h; ++y) {
        if (base)
            for (ptrdiff_t x = 0; x < w; ++x) dst[y * w + x] = base[y * w + x];
        NAME(down_t_row)(rows, mh, w, y + 2, scale, base != NULL, dst + y * w);
    }
    for (ptrdiff_t k = 0; k < 2 * mh + 3; ++k)
        if (k < 2 || k >= h + 2) NAME(down_t_row)(rows, mh, w, k, scale, 1, dst + refl(k - 2, h) * w);
}

/* The transpose of (64 x up, cropped to L samples) along a row: L samples of g into n source samples. Output
 * 2i holds s[i-1] + 6 s[i] + s[i+1] and 2i + 1 holds 4 (s[i] + s[i+1]), with s[-1] = s[1] and s[n] = s[n-1];
 * so source i receives the down stencil of g around 2i, plus the clamped borders. `gp` (2n + 4) is scratch. */
static void NAME(up_t_line)(const REAL *g, REAL *out, ptrdiff_t L, ptrdiff_t n, REAL *gp) {
    gp[0] = gp[1] = 0;
    for (ptrdiff_t k = 0; k < L; ++k) gp[k + 2] = g[k];
    for (ptrdiff_t k = L + 2; k < 2 * n + 4; ++k) gp[k] = 0;
    for (ptrdiff_t i = 0; i < n; ++i) {
        const REAL *p = gp + 2 * i;
        out[i] = (p[0] + p[4]) + (REAL)4 * (p[1] + p[3]) + (REAL)6 * p[2];
    }
    out[n > 1 ? 1 : 0] += g[0];            /* output 0 reads s[-1] */
    out[n - 1] += g[2 * n - 2];             /* output 2n - 2 reads s[n] */
    if (L == 2 * n) out[n - 1] += (REAL)4 * g[2 * n - 1]; /* output 2n - 1 reads s[n] */
}

/* base + alpha x the transpose of (64 x up) for plane `plane`: g is (H, W), base and the output (h, w). */
static void NAME(up_t_plane)(const struct job *job, ptrdiff_t plane, ptrdiff_t r0, ptrdiff_t r1, void *scratch) {
    (void)r0;
    (void)r1;
    ptrdiff_t h = job->h, w = job->w, H = job->H, W = job->W;
    const REAL *g = (const REAL *)job->src + plane * H * W;
    REAL *dst = (REAL *)job->dst + plane * h * w;
    REAL alpha = (REAL)job->alpha;
    REAL *rows = (REAL *)scratch; /* (H, w): each row of g through the row transpose */
    REAL *gp = rows + H * w;      /* 2w + 4 */
    for (ptrdiff_t y = 0; y < H; ++y) NAME(up_t_line)(g + y * W, rows + y * w, W, w, gp);
    static const REAL weights[5] = {1, 4, 6, 4, 1};
    const REAL *base = job->base ? (const REAL *)job->base + plane * h * w : NULL;
    for (ptrdiff_t i = 0; i < h; ++i) {
        REAL *out = dst + i * w;
        for (ptrdiff_t x = 0; x < w; ++x) out[x] = base ? base[i * w + x] : 0;
        for (int t = 0; t < 5; ++t) {
            ptrdiff_t k = 2 * i + t - 2;
            if (k < 0 || k >= H) continue;
            const REAL *row = rows + k * w;
            REAL c = weights[t] * alpha;
            for (ptrdiff_t x = 0; x < w; ++x) out[x] += c * row[x];
        }
    }
    const REAL *first = rows, *even = rows + (2 * h - 2) * w; /* the clamped borders, as along a row */
    REAL *top = dst + (h > 1 ? 1 : 0) * w, *bottom = dst + (h - 1) * w;
    for (ptrdiff_t x = 0; x < w; ++x) top[x] += alpha * first[x];
    for (ptrdiff_t x = 0; x < w; ++x) bottom[x] += alpha * even[x];
    if (H == 2 * h) {
        const REAL *odd = rows + (2 * h - 1) * w;
        for (ptrdiff_t x = 0; x < w; ++x) bottom[x] += (REAL)4 * alpha * odd[x];
    }
}
