/* Native kernels for pyrtok.pyramid: the Burt-Adelson pyrDown / pyrUp operators and their transposes on
 * contiguous (n, h, w) stacks of float32 or float64 planes, one pass per output row, split over threads.
 *
 * The module is an optional build (pyproject.toml): pyrtok.pyramid falls back to torch's elementwise ops when
 * it is absent. Its functions take raw data pointers and sizes; pyrtok._pyramid_native_ops checks every tensor
 * (device, dtype, contiguity, shape) before calling them, and the GIL is released while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Index i of a reflect-101 extended axis of n samples (dcb|abcd|cba), for any n >= 1 and any i. */
static inline ptrdiff_t refl(ptrdiff_t i, ptrdiff_t n) {
    if (n == 1) return 0;
    ptrdiff_t period = 2 * n - 2;
    i %= period;
    if (i < 0) i += period;
    return i >= n ? period - i : i;
}

/* One call: planes of (h, w) in, (H, W) out for up and for the transposes' shapes as documented there. */
struct job {
    const void *src;
    void *dst;
    const void *base;
    ptrdiff_t n, h, w, H, W;
    double alpha;
    /* rows of work per plane (1 for whole-plane kernels), and the scratch bytes one worker needs */
    ptrdiff_t rows;
    size_t scratch;
    void (*run)(const struct job *, ptrdiff_t plane, ptrdiff_t r0, ptrdiff_t r1, void *scratch);
};

/* Each kernel is built for the baseline instruction set and, with GCC on x86-64, again for AVX2 + FMA (picked at
 * import when the CPU has them): the loops vectorise, and fma() becomes one instruction instead of a call. */
#define REAL float
#define FMA fmaf
#define NAME(x) x##_f32
#include "_pyramid_kernels.h"
#undef REAL
#undef FMA
#undef NAME

#define REAL double
#define FMA fma
#define NAME(x) x##_f64
#include "_pyramid_kernels.h"
#undef REAL
#undef FMA
#undef NAME

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYRTOK_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define REAL float
#define FMA fmaf
#define NAME(x) x##_f32_avx2
#include "_pyramid_kernels.h"
#undef REAL
#undef FMA
#undef NAME

#define REAL double
#define FMA fma
#define NAME(x) x##_f64_avx2
#include "_pyramid_kernels.h"
#undef REAL
#undef FMA
#undef NAME
#pragma GCC pop_options
#else
#define PYRTOK_AVX2 0
#endif

typedef void (*kernel)(const struct job *, ptrdiff_t plane, ptrdiff_t r0, ptrdiff_t r1, void *scratch);

/* The kernels in use, [float32, float64] each: the AVX2 builds where the CPU has AVX2 and FMA (module init). */
static kernel k_down[2] = {down_rows_f32, down_rows_f64};
static kernel k_up[2] = {up_rows_f32, up_rows_f64};
static kernel k_down_t[2] = {down_t_plane_f32, down_t_plane_f64};
static kernel k_up_t[2] = {up_t_plane_f32, up_t_plane_f64};
static const char *isa = "baseline";

static void pick_isa(void) {
#if PYRTOK_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        k_down[0] = down_rows_f32_avx2, k_down[1] = down_rows_f64_avx2;
        k_up[0] = up_rows_f32_avx2, k_up[1] = up_rows_f64_avx2;
        k_down_t[0] = down_t_plane_f32_avx2, k_down_t[1] = down_t_plane_f64_avx2;
        k_up_t[0] = up_t_plane_f32_avx2, k_up_t[1] = up_t_plane_f64_avx2;
        isa = "avx2+fma";
    }
#endif
}

/* Run the job's units of work [begin, end) (unit = plane * job->rows + row) on one thread; 0, or -1 when out of
 * memory. */
static int run_units(const struct job *job, ptrdiff_t begin, ptrdiff_t end) {
    if (begin >= end) return 0;
    void *scratch = malloc(job->scratch ? job->scratch : 1);
    if (!scratch) return -1;
    ptrdiff_t unit = begin;
    while (unit < end) {
        ptrdiff_t plane = unit / job->rows, r0 = unit % job->rows, r1 = job->rows;
        if (plane * job->rows + r1 > end) r1 = end - plane * job->rows;
        job->run(job, plane, r0, r1, scratch);
        unit = plane * job->rows + r1;
    }
    free(scratch);
    return 0;
}

/* Split the job's n x rows units of work into `threads` contiguous slices. The threads are OpenMP's: the module
 * is imported after torch, whose libgomp it then shares (the same soname), so the kernels run on torch's own
 * intra-op threads instead of competing with them for the cores. Returns 0, or -1 when out of memory. */
static int run_job(const struct job *job, int threads) {
    ptrdiff_t total = job->n * job->rows;
    if (threads > total) threads = (int)total;
    if (threads <= 1) return run_units(job, 0, total);
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        ptrdiff_t t = omp_get_thread_num(), count = omp_get_num_threads();
        failed |= run_units(job, total * t / count, total * (t + 1) / count);
    }
#else
    failed = run_units(job, 0, total);
#endif
    return failed ? -1 : 0;
}

/* Work below this many output samples per extra thread runs on fewer threads (waking a thread costs about what a
 * worker spends on this much output). */
#define SAMPLES_PER_THREAD 16384

static int threads_for(ptrdiff_t samples, int threads) {
    ptrdiff_t useful = samples / SAMPLES_PER_THREAD;
    if (useful < 1) useful = 1;
    return threads < useful ? threads : (int)useful;
}

static PyObject *finish(const struct job *job, int threads, ptrdiff_t samples) {
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_job(job, threads_for(samples, threads));
    Py_END_ALLOW_THREADS
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static int pick(int is64, struct job *job, const kernel *kernels) {
    job->run = kernels[is64 ? 1 : 0];
    return is64 ? 8 : 4;
}

/* down(src, dst, n, h, w, is64, threads): dst (n, ceil(h/2), ceil(w/2)) = pyrDown of src (n, h, w). */
static PyObject *py_down(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long src, dst;
    Py_ssize_t n, h, w;
    int is64, threads;
    if (!PyArg_ParseTuple(args, "KKnnnpi", &src, &dst, &n, &h, &w, &is64, &threads)) return NULL;
    struct job job = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, NULL, n, h, w, 0, 0, 0.0, 0, 0, NULL};
    size_t item = (size_t)pick(is64, &job, k_down);
    job.rows = (h + 1) / 2;
    job.scratch = (size_t)(w + 6) * item;
    return finish(&job, threads, n * job.rows * ((w + 1) / 2));
}

/* up(src, dst, base, n, h, w, H, W, alpha, is64, threads): dst (n, H, W) = base + alpha x 64 pyrUp(src), with
 * base 0 for none; H in {2h - 1, 2h}, W in {2w - 1, 2w}. */
static PyObject *py_up(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long src, dst, base;
    Py_ssize_t n, h, w, H, W;
    double alpha;
    int is64, threads;
    if (!PyArg_ParseTuple(args, "KKKnnnnndpi", &src, &dst, &base, &n, &h, &w, &H, &W, &alpha, &is64, &threads))
        return NULL;
    struct job job = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, (const void *)(uintptr_t)base,
                      n, h, w, H, W, alpha, 0, 0, NULL};
    size_t item = (size_t)pick(is64, &job, k_up);
    job.rows = H;
    job.scratch = (size_t)(3 * 2 * w) * item;
    return finish(&job, threads, n * H * W);
}

/* down_t(g, dst, base, n, h, w, is64, threads): dst (n, h, w) = base + the transpose of down applied to g
 * (n, ceil(h/2), ceil(w/2)), with base 0 for none. */
static PyObject *py_down_t(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long src, dst, base;
    Py_ssize_t n, h, w;
    int is64, threads;
    if (!PyArg_ParseTuple(args, "KKKnnnpi", &src, &dst, &base, &n, &h, &w, &is64, &threads)) return NULL;
    struct job job = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, (const void *)(uintptr_t)base,
                      n, h, w, 0, 0, 0.0, 0, 0, NULL};
    size_t item = (size_t)pick(is64, &job, k_down_t);
    ptrdiff_t mh = (h + 1) / 2, mw = (w + 1) / 2;
    job.rows = 1;
    job.scratch = (size_t)(mh * w + (mw + 4) + (2 * mw + 3)) * item;
    return finish(&job, threads, n * h * w);
}

/* up_t(g, dst, base, n, h, w, H, W, alpha, is64, threads): dst (n, h, w) = base + alpha x the transpose of
 * 64 pyrUp (to (H, W)) applied to g (n, H, W), with base 0 for none. */
static PyObject *py_up_t(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long src, dst, base;
    Py_ssize_t n, h, w, H, W;
    double alpha;
    int is64, threads;
    if (!PyArg_ParseTuple(args, "KKKnnnnndpi", &src, &dst, &base, &n, &h, &w, &H, &W, &alpha, &is64, &threads))
        return NULL;
    struct job job = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, (const void *)(uintptr_t)base,
                      n, h, w, H, W, alpha, 0, 0, NULL};
    size_t item = (size_t)pick(is64, &job, k_up_t);
    job.rows = 1;
    job.scratch = (size_t)(H * w + 2 * w + 4) * item;
    return finish(&job, threads, n * H * W);
}

static PyMethodDef methods[] = {
    {"down", py_down, METH_VARARGS, "pyrDown of a contiguous (n, h, w) stack (raw pointers; see the C source)."},
    {"up", py_up, METH_VARARGS, "base + alpha x 64 pyrUp of a contiguous (n, h, w) stack (raw pointers)."},
    {"down_t", py_down_t, METH_VARARGS, "base + the transpose of down (raw pointers)."},
    {"up_t", py_up_t, METH_VARARGS, "base + alpha x the transpose of 64 pyrUp (raw pointers)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pyramid_native", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__pyramid_native(void) {
    pick_isa();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "isa", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
