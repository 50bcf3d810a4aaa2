// DenseEFIM's C++ state as the Python class nhgd_ext._C.DenseEFIMCore (held by
// nhgd_ext.curvature.DenseEFIM; not a public API of its own).
#pragma once

#include <pybind11/pybind11.h>

namespace nhgd::curvature {

void bind_python(pybind11::module_& m);

}  // namespace nhgd::curvature
