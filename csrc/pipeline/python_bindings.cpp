// pybind11 binding of the engine. Every call that may wait (push on a full
// ring, flush, close) releases the GIL while it waits: the consumer thread
// needs it to run the curvature's update. The consumer takes the GIL only for
// that call; the kernels it launches release it again while they run.
//
// With a compiled curvature (DenseEFIM's C++ core) the consumer applies the
// update messages itself, without the GIL: then the producer's training loop
// never waits for the interpreter behind an update. Requests, cross-term
// handlers and curvatures with hooks (K-FAC) still go through Python.
#include "pipeline/python_bindings.h"

#include "curvature/dense_efim.h"
#include "pipeline/engine.h"
#include "pipeline/ring_buffer.h"

#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor

#include <memory>
#include <string>
#include <vector>

namespace py = pybind11;

namespace nhgd::pipeline {
namespace {

// Message kinds and layout: nhgd_ext/pipeline/_messages.py's Message (a test
// checks that the kinds agree). meta = [kind, batch size | per_step, has cross, captures].
enum MessageKind : int64_t { kUpdate = 0, kUpdateMany = 1, kCall = 2, kCrossOnly = 3 };

// Whether the compiled curvature can apply this message by itself: an update
// without captured hook inputs (those are K-FAC's, a Python curvature).
bool applies_natively(const std::vector<int64_t>& meta) {
  return meta.size() >= 4 && (meta[0] == kUpdate || meta[0] == kUpdateMany) && meta[3] == 0;
}

// What _messages.apply_update does for the same message.
void apply_natively(curvature::DenseEFIM& curvature, const std::vector<at::Tensor>& tensors,
                    const std::vector<int64_t>& meta) {
  if (meta[0] == kUpdate) {
    curvature.update(tensors[0], meta[1]);
  } else {
    curvature.update_many(tensors[0], meta[1] == 1);  // -1 (not given): the default, per_step=False
  }
}

const char* python_type_of(const std::exception& e) {
  return dynamic_cast<const c10::ValueError*>(&e) ? "ValueError" : "RuntimeError";
}

class PyEngine {
 public:
  PyEngine(py::object apply, int64_t slots, const std::string& producer, const std::string& consumer,
           int64_t consumer_threads, std::shared_ptr<curvature::DenseEFIM> native, py::object on_native_failure)
      : apply_(std::move(apply)), on_native_failure_(std::move(on_native_failure)) {
    if (!PyCallable_Check(apply_.ptr())) throw py::value_error("PipelineEngine: argument 'apply' must be callable");
    if (native && !PyCallable_Check(on_native_failure_.ptr())) {
      throw py::value_error("PipelineEngine: argument 'on_native_failure' must be callable when 'native' is given");
    }
    // The engine outlives no PyEngine, so it may point at apply_ and
    // on_native_failure_; the Python objects are only touched with the GIL held.
    const py::object* fn = &apply_;
    const py::object* failed = &on_native_failure_;
    ApplyFn call = [fn, failed, native](std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta) {
      const std::vector<int64_t>* python_meta = &meta;
      std::vector<int64_t> cross_meta;
      if (native && applies_natively(meta)) {
        try {
          apply_natively(*native, tensors, meta);
        } catch (const std::exception& e) {
          // The Python side keeps an exception of the same type to chain it.
          py::gil_scoped_acquire gil;
          (*failed)(python_type_of(e), describe(e));
          throw;
        }
        if (meta[2] == 0) return;
        // What remains of the message is its cross term, for on_cross.
        cross_meta = {kCrossOnly, meta[0] == kUpdate ? meta[1] : tensors[0].size(0), 1, 0};
        python_meta = &cross_meta;
      }
      py::gil_scoped_acquire gil;
      try {
        (*fn)(py::cast(tensors), py::cast(*python_meta));
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
    // update's Python (bench/bench_pipeline.py shows the difference).
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
    if (!engine_) throw PipelineClosed("pipeline is closed");
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

  py::object apply_, on_native_failure_;
  std::unique_ptr<Engine> engine_;
  uint64_t pushed_at_close_ = 0, applied_at_close_ = 0;
  std::optional<std::string> error_at_close_;
  std::string route_;
};

}  // namespace

void bind_python(py::module_& m) {
  m.attr("PIPELINE_MESSAGE_KINDS") =
      py::dict(py::arg("UPDATE") = int64_t{kUpdate}, py::arg("UPDATE_MANY") = int64_t{kUpdateMany},
               py::arg("CALL") = int64_t{kCall}, py::arg("CROSS_ONLY") = int64_t{kCrossOnly});
  // The engine's two stops reach Python as the package's own exception types,
  // the ones the pure-Python engine raises (looked up when first needed: this
  // module loads before nhgd_ext.pipeline).
  py::register_exception_translator([](std::exception_ptr thrown) {
    const char* type = nullptr;
    std::string text;
    try {
      std::rethrow_exception(thrown);
    } catch (const PipelineError& e) {
      type = "PipelineError";
      text = e.what();
    } catch (const PipelineClosed& e) {
      type = "PipelineClosed";
      text = e.what();
    }
    py::object cls = py::module_::import("nhgd_ext.pipeline._messages").attr(type);
    PyErr_SetString(cls.ptr(), text.c_str());
  });

  py::class_<PyEngine>(m, "PipelineEngine",
                       "Ring buffer + C++ consumer thread behind nhgd_ext.pipeline.Pipeline.")
      .def(py::init<py::object, int64_t, const std::string&, const std::string&, int64_t,
                    std::shared_ptr<curvature::DenseEFIM>, py::object>(),
           py::arg("apply"), py::arg("slots"), py::arg("producer"), py::arg("consumer"),
           py::arg("consumer_threads") = 0, py::arg("native") = py::none(), py::arg("on_native_failure") = py::none())
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

  // The bare coordination of slots, for tests/test_pipeline_ring.py to drive
  // producer and consumer steps one at a time; the waiting calls release the GIL.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<RingBuffer>(m, "_RingBuffer")
      .def(py::init<std::size_t>(), py::arg("slots"))
      .def("begin_push", &RingBuffer::begin_push, nogil)
      .def("try_begin_push", &RingBuffer::try_begin_push)
      .def("end_push", &RingBuffer::end_push, py::arg("published"))
      .def("wait_applied", &RingBuffer::wait_applied, nogil)
      .def("begin_pop", &RingBuffer::begin_pop, nogil)
      .def("release", &RingBuffer::release)
      .def("mark_applied", &RingBuffer::mark_applied)
      .def("consumer_stopped", &RingBuffer::consumer_stopped)
      .def("fail", &RingBuffer::fail, py::arg("message"))
      .def("close", &RingBuffer::close, py::arg("drain"), nogil)
      .def_property_readonly("published", &RingBuffer::published)
      .def_property_readonly("applied", &RingBuffer::applied);
}

}  // namespace nhgd::pipeline
