/* Makes the kernel library a valid (empty) CPython extension module, salomi._kernels,
 * so setuptools builds and installs it like any extension. The kernels themselves are
 * plain C functions called through ctypes (salomi/runtime/kernels.py); no C-API glue. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels", "salomi packed-weight matmul kernels (call via salomi.runtime.kernels)", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
