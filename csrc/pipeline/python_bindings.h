// The pipeline engine as the Python class nhgd_ext._C.PipelineEngine (used by
// nhgd_ext.pipeline; not a public API of its own).
#pragma once

#include <pybind11/pybind11.h>

namespace nhgd::pipeline {

void bind_python(pybind11::module_& m);

}  // namespace nhgd::pipeline
