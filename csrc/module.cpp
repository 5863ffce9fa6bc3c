// A bare Python module: importing it loads the shared library, whose static initialisers register
// the kernels with the torch dispatcher (TORCH_LIBRARY / TORCH_LIBRARY_IMPL). No pybind11 needed.
#include <Python.h>

#define LOTUS_CONCAT_(a, b) a##b
#define LOTUS_CONCAT(a, b) LOTUS_CONCAT_(a, b)

static struct PyModuleDef lotus_module = {PyModuleDef_HEAD_INIT, "lotus_kernels_ext", nullptr, -1, nullptr};

PyMODINIT_FUNC LOTUS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&lotus_module);
}
