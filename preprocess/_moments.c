/* preprocess._moments: exact RGB moments of one uint8 image, the inner loop of stats.RGBMoments.add_image.
 *
 * For N pixels (r, g, b) returns N, the channel sums and the six distinct sums of products
 * (rr, rg, rb, gg, gb, bb) as exact integers. Rows are summed in 32-bit accumulators (a row of up to 66,051
 * pixels cannot overflow them: 255 * 255 * 66051 < 2^32) and carried to 64-bit per row, so the result is exact
 * for any image below ~2.8e14 pixels. The GIL is released while summing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#define ROW 66051 /* pixels per 32-bit block: 65025 * ROW < 2^32 */

/* The loop vectorises ~2.6x better with AVX2 (interleaved 3-byte loads); an AVX2 clone is picked at load time
 * where the CPU has it (GCC/clang function multiversioning, glibc ifunc), the baseline x86-64 code elsewhere. */
#if defined(__x86_64__) && defined(__GLIBC__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 6))
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION static void sums(const uint8_t *p, Py_ssize_t n, uint64_t s[3], uint64_t q[6]) {
    for (int i = 0; i < 3; i++) s[i] = 0;
    for (int i = 0; i < 6; i++) q[i] = 0;
    while (n > 0) {
        Py_ssize_t m = n < ROW ? n : ROW;
        uint32_t r = 0, g = 0, b = 0, rr = 0, rg = 0, rb = 0, gg = 0, gb = 0, bb = 0;
        for (Py_ssize_t k = 0; k < m; k++, p += 3) {
            uint32_t x = p[0], y = p[1], z = p[2];
            r += x; g += y; b += z;
            rr += x * x; rg += x * y; rb += x * z;
            gg += y * y; gb += y * z; bb += z * z;
        }
        s[0] += r; s[1] += g; s[2] += b;
        q[0] += rr; q[1] += rg; q[2] += rb; q[3] += gg; q[4] += gb; q[5] += bb;
        n -= m;
    }
}

PyDoc_STRVAR(rgb_moments_doc,
"rgb_moments(pixels) -> (n, (Σr, Σg, Σb), (Σrr, Σrg, Σrb, Σgg, Σgb, Σbb))\n\n"
"`pixels`: a C-contiguous buffer of interleaved uint8 RGB values (e.g. an (H, W, 3) uint8 numpy array).");

static PyObject *rgb_moments(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_buffer view;
    uint64_t s[3], q[6];
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS) != 0) return NULL;
    if (view.itemsize != 1 || view.len % 3 != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "rgb_moments needs interleaved uint8 RGB values (a multiple of 3 bytes)");
        return NULL;
    }
    Py_ssize_t n = view.len / 3;
    Py_BEGIN_ALLOW_THREADS
    sums((const uint8_t *)view.buf, n, s, q);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("(n(KKK)(KKKKKK))", n, s[0], s[1], s[2], q[0], q[1], q[2], q[3], q[4], q[5]);
}

static PyMethodDef methods[] = {
    {"rgb_moments", rgb_moments, METH_O, rgb_moments_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_moments", "Exact RGB moments of uint8 images (see stats.RGBMoments).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__moments(void) { return PyModule_Create(&module); }
