// The Python module `pangu_ops._C`: importing it loads this library, whose TORCH_LIBRARY blocks
// (one per op file) register the CPU kernels as torch.ops.pangu_cpu.*.
#include <Python.h>

static struct PyModuleDef pangu_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pangu_c_module); }
