/* vggdist._jpegcrop: decode only a window of a JPEG, through the system libjpeg(-turbo) API.
 *
 * The training crop needs on average ~30 % of a stored image's pixels (a 224 window of an image rescaled to
 * S in [256, 512]). A full decode spends its time in three places: entropy (Huffman) decoding of every
 * coefficient, the inverse DCT, and chroma upsampling + colour conversion. libjpeg-turbo (>= 1.5) can skip
 * most of that for a window:
 *
 *   - rows above the window: jpeg_skip_scanlines() entropy-decodes them but runs no IDCT / colour conversion;
 *   - rows below the window: never read at all (the decode is aborted after the last needed row);
 *   - columns outside the window: jpeg_crop_scanline() restricts IDCT, upsampling and colour conversion to
 *     the iMCU columns that cover it (entropy decoding still walks every block of a row).
 *
 * Output is RGBX (Pillow's own in-memory layout of an RGB image), decoded with the accurate integer IDCT and
 * fancy upsampling, i.e. the same settings Pillow uses, at scale 1/denom (denom in 1, 2, 4, 8).
 * The GIL is released while decoding. Any libjpeg error *or warning* (corrupt data, premature end) raises
 * ValueError so that the caller can fall back to Pillow, which applies its own policy to damaged files.
 *
 * This file only calls the public libjpeg API documented in libjpeg-turbo's libjpeg.txt.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#if !defined(JCS_EXTENSIONS) || !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 1005000
#error "vggdist._jpegcrop needs libjpeg-turbo >= 1.5 (jpeg_crop_scanline, jpeg_skip_scanlines, JCS_EXT_RGBX)"
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) { /* a warning: corrupt or truncated data; let the caller decide with Pillow */
        on_error(cinfo);
    }
}

typedef struct {
    /* in */
    const unsigned char *data;
    unsigned long size;
    int denom, x0, y0, x1, y1;
    int channels;        /* 4: RGBX (Pillow's layout), 3: packed RGB (numpy's (H, W, 3)) */
    unsigned char *out;  /* caller's buffer for the rows, or NULL: malloc one */
    size_t out_size;
    /* out */
    unsigned char *pixels; /* rows of width * channels bytes: `out` or malloc'd */
    JDIMENSION width, height, left, top, image_width, image_height;
    int unsupported; /* colour space this path does not handle (CMYK, YCCK) */
    char message[JMSG_LENGTH_MAX];
} CropJob;

static void release_pixels(CropJob *job) {
    if (job->pixels != NULL && job->pixels != job->out) free(job->pixels);
    job->pixels = NULL;
}

/* Runs without the GIL. Returns 0 on success, -1 with job->message set otherwise. */
static int decode_crop(CropJob *job) {
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    JSAMPROW rows[16];

    job->pixels = NULL;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    if (setjmp(err.jump)) {
        strncpy(job->message, err.message, sizeof(job->message) - 1);
        job->message[sizeof(job->message) - 1] = '\0';
        jpeg_destroy_decompress(&cinfo);
        release_pixels(job);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, job->data, job->size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
        cinfo.jpeg_color_space != JCS_RGB) {
        job->unsupported = 1;
        snprintf(job->message, sizeof(job->message), "JPEG colour space %d is not YCbCr, RGB or grayscale",
                 (int)cinfo.jpeg_color_space);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    cinfo.out_color_space = job->channels == 4 ? JCS_EXT_RGBX : JCS_EXT_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)job->denom;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);
    job->image_width = cinfo.output_width;
    job->image_height = cinfo.output_height;

    /* clamp the window to the decoded image */
    JDIMENSION x0 = job->x0 < 0 ? 0 : (JDIMENSION)job->x0;
    JDIMENSION y0 = job->y0 < 0 ? 0 : (JDIMENSION)job->y0;
    JDIMENSION x1 = (job->x1 < 0 || (JDIMENSION)job->x1 > cinfo.output_width) ? cinfo.output_width : (JDIMENSION)job->x1;
    JDIMENSION y1 = (job->y1 < 0 || (JDIMENSION)job->y1 > cinfo.output_height) ? cinfo.output_height : (JDIMENSION)job->y1;
    if (x0 >= x1 || y0 >= y1) {
        snprintf(job->message, sizeof(job->message), "empty window (%d, %d, %d, %d) of a %ux%u image", job->x0,
                 job->y0, job->x1, job->y1, cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    /* One more column on each side: fancy (triangle) chroma upsampling treats the first and last column of a
     * cropped scanline as an image edge, so those two columns can differ from a full decode. The columns of
     * the requested window itself are always exact. */
    JDIMENSION left = x0 > 0 ? x0 - 1 : 0;
    JDIMENSION width = (x1 < cinfo.output_width ? x1 + 1 : x1) - left;
    if (width < cinfo.output_width) {
        /* widens the window to whole iMCU columns; left moves down, width grows */
        jpeg_crop_scanline(&cinfo, &left, &width);
    } else {
        left = 0;
        width = cinfo.output_width;
    }
    JDIMENSION height = y1 - y0;
    size_t stride = (size_t)width * (size_t)job->channels;
    if (job->out != NULL) {
        if (job->out_size < stride * height) {
            snprintf(job->message, sizeof(job->message), "out buffer of %zu bytes < %zu for a %ux%u window",
                     job->out_size, stride * height, width, height);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        job->pixels = job->out;
    } else if ((job->pixels = (unsigned char *)malloc(stride * height)) == NULL) {
        snprintf(job->message, sizeof(job->message), "out of memory for a %ux%u window", width, height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (y0 > 0 && jpeg_skip_scanlines(&cinfo, y0) != y0) {
        snprintf(job->message, sizeof(job->message), "could not skip to row %u", y0);
        jpeg_destroy_decompress(&cinfo);
        release_pixels(job);
        return -1;
    }
    while (cinfo.output_scanline < y1) {
        JDIMENSION r = cinfo.output_scanline - y0;
        JDIMENSION n = y1 - cinfo.output_scanline;
        if (n > 16) n = 16;
        for (JDIMENSION i = 0; i < n; i++) rows[i] = job->pixels + (size_t)(r + i) * stride;
        if (jpeg_read_scanlines(&cinfo, rows, n) == 0) {
            snprintf(job->message, sizeof(job->message), "no scanline returned at row %u", cinfo.output_scanline);
            jpeg_destroy_decompress(&cinfo);
            release_pixels(job);
            return -1;
        }
    }
    jpeg_abort_decompress(&cinfo); /* the rows below the window are never decoded */
    jpeg_destroy_decompress(&cinfo);
    job->left = left;
    job->top = y0;
    job->width = width;
    job->height = height;
    return 0;
}

PyDoc_STRVAR(crop_doc,
"crop(data, denom, x0, y0, x1, y1, out=None, channels=4)\n"
"    -> (pixels, left, top, width, height, image_width, image_height)\n\n"
"Decode the window [x0, x1) x [y0, y1) of the JPEG `data` at scale 1/denom (1, 2, 4 or 8).\n"
"`pixels` holds rows of width * channels bytes (RGBX for 4, RGB for 3) from its start: `out` itself when given (a writable buffer,\n"
"reused from call to call; ValueError when it is too small), else new bytes. The window is widened on the left and right to whole\n"
"iMCU columns: (left, top, width, height) is what was decoded, in coordinates of the scaled image of size\n"
"image_width x image_height. Every pixel of the requested window equals a full decode's; the first and last\n"
"decoded columns may not (chroma upsampling sees them as an edge) unless they are the image's own edges.\n"
"A negative x1 / y1 means the image's right / bottom edge. Raises ValueError\n"
"for anything libjpeg does not decode cleanly (also for warnings such as truncated data) and for CMYK/YCCK.");

static PyObject *crop(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view, out = {0};
    PyObject *out_obj = Py_None, *pixels;
    CropJob job;
    int rc;
    memset(&job, 0, sizeof(job));
    job.channels = 4;
    if (!PyArg_ParseTuple(args, "y*iiiii|Oi", &view, &job.denom, &job.x0, &job.y0, &job.x1, &job.y1, &out_obj,
                          &job.channels))
        return NULL;
    if (job.channels != 3 && job.channels != 4) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "channels must be 3 (RGB) or 4 (RGBX), got %d", job.channels);
        return NULL;
    }
    if (job.denom != 1 && job.denom != 2 && job.denom != 4 && job.denom != 8) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "denom must be 1, 2, 4 or 8, got %d", job.denom);
        return NULL;
    }
    if (out_obj != Py_None) {
        if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        job.out = (unsigned char *)out.buf;
        job.out_size = (size_t)out.len;
    }
    job.data = (const unsigned char *)view.buf;
    job.size = (unsigned long)view.len;
    Py_BEGIN_ALLOW_THREADS
    rc = decode_crop(&job);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (out_obj != Py_None) PyBuffer_Release(&out);
    if (rc != 0) {
        PyErr_Format(PyExc_ValueError, "libjpeg: %s", job.message);
        return NULL;
    }
    if (out_obj != Py_None) {
        Py_INCREF(out_obj);
        pixels = out_obj;
    } else {
        pixels = PyBytes_FromStringAndSize((const char *)job.pixels,
                                           (Py_ssize_t)job.width * job.channels * job.height);
        release_pixels(&job);
        if (pixels == NULL) return NULL;
    }
    return Py_BuildValue("(NIIIIII)", pixels, job.left, job.top, job.width, job.height, job.image_width,
                         job.image_height);
}

PyDoc_STRVAR(header_doc,
"header(data) -> (width, height, components) of a JPEG this module decodes (YCbCr or RGB: 3 components,\n"
"grayscale: 1), else None (CMYK, YCCK, not a JPEG).");

static PyObject *header(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_buffer view;
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    volatile int ok = 0;
    volatile JDIMENSION width = 0, height = 0;
    volatile int components = 0;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0) return NULL;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    if (setjmp(err.jump)) {
        ok = 0;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)view.buf, (unsigned long)view.len);
        jpeg_read_header(&cinfo, TRUE);
        ok = cinfo.jpeg_color_space == JCS_YCbCr || cinfo.jpeg_color_space == JCS_GRAYSCALE ||
             cinfo.jpeg_color_space == JCS_RGB;
        width = cinfo.image_width;
        height = cinfo.image_height;
        components = cinfo.num_components;
    }
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&view);
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("(IIi)", width, height, components);
}

static PyMethodDef methods[] = {
    {"crop", crop, METH_VARARGS, crop_doc},
    {"header", header, METH_O, header_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegcrop",
    "Window decoding of JPEGs through libjpeg-turbo (crop + skip scanlines + DCT scaling).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpegcrop(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER", LIBJPEG_TURBO_VERSION_NUMBER);
    return m;
}
