#include "curvature/dense_efim_python.h"

#include "curvature/dense_efim.h"

#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor, at::Device, at::ScalarType <-> Python

#include <memory>
#include <string>

namespace py = pybind11;

namespace nhgd::curvature {
namespace {

// pybind11 would refuse a non-tensor with a TypeError that names no argument.
at::Tensor tensor_argument(const char* name, const py::handle& obj) {
  if (!THPVariable_Check(obj.ptr())) {
    throw py::value_error(std::string("DenseEFIM: argument '") + name + "' must be a tensor, got " +
                          std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  return THPVariable_Unpack(obj.ptr());
}

}  // namespace

void bind_python(py::module_& m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  py::class_<DenseEFIM, std::shared_ptr<DenseEFIM>>(m, "DenseEFIMCore",
                                                    "The state and update rules behind nhgd_ext.curvature.DenseEFIM.")
      .def(py::init<int64_t, std::optional<double>, double, double, at::ScalarType, at::Device,
                    std::optional<at::Tensor>>(),
           py::arg("dim"), py::arg("beta"), py::arg("damping"), py::arg("refresh_below"), py::arg("dtype"),
           py::arg("device"), py::arg("status") = py::none())
      .def(
          "update",
          [](DenseEFIM& self, const py::object& g, int64_t batch_size) {
            const at::Tensor t = tensor_argument("g", g);
            py::gil_scoped_release nogil_;
            self.update(t, batch_size);
          },
          py::arg("g"), py::arg("batch_size") = 1)
      .def(
          "update_many",
          [](DenseEFIM& self, const py::object& G, bool per_step) {
            const at::Tensor t = tensor_argument("G", G);
            py::gil_scoped_release nogil_;
            self.update_many(t, per_step);
          },
          py::arg("G"), py::arg("per_step") = false)
      .def("reset", &DenseEFIM::reset, nogil())
      .def("fold", &DenseEFIM::fold, nogil())
      .def("flush", &DenseEFIM::flush, nogil())
      .def("refresh", &DenseEFIM::refresh, nogil())
      .def("factorize", &DenseEFIM::factorize, nogil())
      .def("set_gram_rows", &DenseEFIM::set_gram_rows, py::arg("rows"))
      .def("set_counters", &DenseEFIM::set_counters, py::arg("num_updates"), py::arg("num_samples"),
           py::arg("num_refreshes"), py::arg("mu"))
      .def_property_readonly("inverse", &DenseEFIM::inverse)
      .def_property_readonly("pending", &DenseEFIM::pending)
      .def_property_readonly("fisher", &DenseEFIM::fisher)
      .def_property_readonly("factor",
                             [](const DenseEFIM& self) -> std::optional<at::Tensor> {
                               if (!self.factor().defined()) return std::nullopt;
                               return self.factor();
                             })
      .def_property_readonly("dim", &DenseEFIM::dim)
      .def_property_readonly("num_updates", &DenseEFIM::num_updates)
      .def_property_readonly("num_samples", &DenseEFIM::num_samples)
      .def_property_readonly("num_refreshes", &DenseEFIM::num_refreshes)
      .def_property_readonly("mu", &DenseEFIM::mu)
      .def_property_readonly("last_rows", &DenseEFIM::last_rows)
      .def_property_readonly("gram_rows", &DenseEFIM::gram_rows);
}

}  // namespace nhgd::curvature
