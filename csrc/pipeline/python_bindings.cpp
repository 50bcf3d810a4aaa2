// pybind11 binding of the engine. Every call that may wait (push on a full
// ring, flush, close) releases the GIL while it waits: the consumer thread
// needs it to run the curvature's update. The consumer takes the GIL only for
// that call; the kernels it launches release it again while they run.
#include "pipeline/python_bindings.h"

#include "pipeline/engine.h"

#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor

#include <memory>
#include <string>
#include <vector>

namespace py = pybind11;

namespace nhgd::pipeline {
namespace {

class PyEngine {
 public:
  PyEngine(py::object apply, int64_t slots, const std::string& producer, const std::string& consumer,
           int64_t consumer_threads)
      : apply_(std::move(apply)) {
    if (!PyCallable_Check(apply_.ptr())) throw py::value_error("PipelineEngine: argument 'apply' must be callable");
    // The engine outlives no PyEngine, so it may point at apply_; the Python
    // object itself is only touched with the GIL held.
    const py::object* fn = &apply_;
    ApplyFn call = [fn](std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta) {
      py::gil_scoped_acquire gil;
      try {
        (*fn)(py::cast(tensors), py::cast(meta));
      } catch (py::error_already_set& e) {
        // Carried to the producer as text; the Python side keeps the exception
        // object itself to chain it.
        throw std::runtime_error(e.what());
      }
    };
    engine_ = std::make_unique<Engine>(std::move(call), slots, at::Device(producer), at::Device(consumer),
                                       consumer_threads);
  }

  ~PyEngine() { shutdown(false); }

  void push(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta) {
    // With a free slot and a plain copy nothing here can wait for the
    // consumer, so the GIL is kept: releasing it would hand it to the consumer
    // just woken by this message and leave the producer queued behind that
    // update's Python (measured: about half of a push's cost on two cores).
    if (engine().try_push(tensors, meta)) return;
    py::gil_scoped_release nogil;
    engine().push(tensors, meta);
  }
  void flush() {
    py::gil_scoped_release nogil;
    engine().flush();
  }
  void close(bool drain) { shutdown(drain); }
  void abort(const std::string& reason) {
    if (!engine_) return;
    py::gil_scoped_release nogil;
    engine_->abort(reason);
  }

  uint64_t pushed() const { return engine_ ? engine_->pushed() : pushed_at_close_; }
  uint64_t applied() const { return engine_ ? engine_->applied() : applied_at_close_; }
  std::optional<std::string> error() const { return engine_ ? engine_->error() : error_at_close_; }
  bool closed() const { return !engine_ || engine_->closed(); }
  std::string route() const { return engine_ ? engine_->route() : route_; }
  std::vector<int64_t> consumer_stream() const { return engine().consumer_stream(); }

 private:
  Engine& engine() const {
    if (!engine_) throw RingClosed("pipeline is closed");
    return *engine_;
  }

  // Joins the consumer without the GIL (it may be waiting for it), then frees
  // the engine, so the last reference to `apply` goes with the GIL held.
  void shutdown(bool drain) {
    if (!engine_) return;
    {
      py::gil_scoped_release nogil;
      engine_->close(drain);
    }
    pushed_at_close_ = engine_->pushed();
    applied_at_close_ = engine_->applied();
    error_at_close_ = engine_->error();
    route_ = engine_->route();
    engine_.reset();
  }

  py::object apply_;
  std::unique_ptr<Engine> engine_;
  uint64_t pushed_at_close_ = 0, applied_at_close_ = 0;
  std::optional<std::string> error_at_close_;
  std::string route_;
};

}  // namespace

void bind_python(py::module_& m) {
  // Subclasses of RuntimeError, so nothing that catches RuntimeError misses them.
  py::register_exception<RingFailed>(m, "PipelineFailed", PyExc_RuntimeError);
  py::register_exception<RingClosed>(m, "PipelineClosedError", PyExc_RuntimeError);

  py::class_<PyEngine>(m, "PipelineEngine",
                       "Ring buffer + C++ consumer thread behind nhgd_ext.pipeline.Pipeline.")
      .def(py::init<py::object, int64_t, const std::string&, const std::string&, int64_t>(), py::arg("apply"),
           py::arg("slots"), py::arg("producer"), py::arg("consumer"), py::arg("consumer_threads") = 0)
      .def("push", &PyEngine::push, py::arg("tensors"), py::arg("meta"))
      .def("flush", &PyEngine::flush)
      .def("close", &PyEngine::close, py::arg("drain") = true)
      .def("abort", &PyEngine::abort, py::arg("reason"))
      .def_property_readonly("pushed", &PyEngine::pushed)
      .def_property_readonly("applied", &PyEngine::applied)
      .def_property_readonly("error", &PyEngine::error)
      .def_property_readonly("closed", &PyEngine::closed)
      .def_property_readonly("route", &PyEngine::route)
      .def_property_readonly("consumer_stream", &PyEngine::consumer_stream);
}

}  // namespace nhgd::pipeline
