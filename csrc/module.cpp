// Makes the ahead-of-time build importable as the Python module nhgd_ext._C.
// Importing it runs the static operator registrations of ops.cpp; the module
// itself has no attributes: everything is reached through torch.ops.nhgd_ext.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "nhgd_ext compiled operators (see torch.ops.nhgd_ext)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
