// The Python module galore_kernels._C only has to exist: importing it loads this shared library,
// whose static initializers (ops.cpp) register torch.ops.galore_kernels.*. Plain CPython API
// rather than pybind11, since nothing is bound and it keeps the build light.
#include <Python.h>

namespace {
PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled operators of galore-kernels; call them through torch.ops.galore_kernels.",
    -1,
    nullptr,
};
}  // namespace

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&module_def);
}
