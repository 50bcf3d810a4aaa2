// The Python module of the compiled extension: nhgd_ext._C for the
// ahead-of-time build, nhgd_ext_ops[_cuda] when compiled on first import
// (TORCH_EXTENSION_NAME is set by torch's builders to the right one).
// Importing it runs the static operator registrations of ops.cpp (reached
// through torch.ops.nhgd_ext); its attributes of its own are the pipeline
// engine and DenseEFIM's C++ state.
#include "curvature/dense_efim_python.h"
#include "pipeline/python_bindings.h"

#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nhgd_ext compiled operators (see torch.ops.nhgd_ext), the pipeline engine and DenseEFIM's state";
  nhgd::curvature::bind_python(m);
  nhgd::pipeline::bind_python(m);
}
