#include "pipeline/engine.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <exception>

#if defined(__linux__)
#include <pthread.h>
#endif

namespace nhgd::pipeline {

std::string describe(const std::exception& e) {
  // c10::Error's what() carries a C++ backtrace; the message is what a user needs.
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) return c10_error->what_without_backtrace();
  return e.what();
}

Engine::Engine(ApplyFn apply, int64_t slots, const at::Device& producer, const at::Device& consumer,
               int64_t consumer_threads)
    : apply_(std::move(apply)),
      producer_(producer),
      consumer_(consumer),
      consumer_threads_(consumer_threads),
      ring_(slots >= 1 ? static_cast<std::size_t>(slots) : 1) {
  TORCH_CHECK_VALUE(slots >= 1, "Pipeline: argument 'slots' must be >= 1, got ", slots);
  TORCH_CHECK_VALUE(consumer_threads >= 0, "Pipeline: argument 'consumer_threads' must be >= 0, got ", consumer_threads);
  TORCH_CHECK_VALUE(!producer.is_cuda() || producer.has_index(), "Pipeline: the producer's CUDA device needs an index");
  TORCH_CHECK_VALUE(!consumer.is_cuda() || consumer.has_index(), "Pipeline: the consumer's CUDA device needs an index");
  TORCH_CHECK_VALUE(static_cast<bool>(apply_), "Pipeline: no apply function");
  route_ = make_route(producer_, consumer_);
  slots_.resize(static_cast<std::size_t>(slots));
  for (auto& slot : slots_) route_->prepare(slot);
  thread_ = std::thread([this] { consume(); });  // last: everything it reads exists
}

Engine::~Engine() {
  try {
    close(false);
  } catch (...) {
    // close(false) only joins; nothing to report from a destructor.
  }
}

void Engine::check_message(const std::vector<at::Tensor>& tensors) const {
  TORCH_CHECK_VALUE(!tensors.empty(), "Pipeline.push: a message needs at least one tensor");
  for (const auto& t : tensors) {
    TORCH_CHECK_VALUE(t.defined(), "Pipeline.push: undefined tensor in the message");
    TORCH_CHECK_VALUE(t.device() == producer_, "Pipeline.push: the message's tensors must be on the producer device ",
                      producer_, ", got one on ", t.device());
  }
}

void Engine::push(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta) {
  check_message(tensors);
  fill_and_publish(ring_.begin_push(), tensors, meta);
}

bool Engine::try_push(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta) {
  if (!route_->fill_never_waits()) return false;
  check_message(tensors);
  const auto index = ring_.try_begin_push();
  if (!index) return false;
  fill_and_publish(*index, tensors, meta);
  return true;
}

void Engine::fill_and_publish(std::size_t index, const std::vector<at::Tensor>& tensors,
                              const std::vector<int64_t>& meta) {
  Slot& slot = slots_[index];
  try {
    route_->fill(slot, tensors);
    slot.meta = meta;
  } catch (...) {
    ring_.end_push(false);  // not published: the slot is free again, the stream unharmed
    throw;
  }
  ring_.end_push(true);
}

void Engine::flush() {
  ring_.wait_applied();
  route_->producer_waits_for_consumer();
}

void Engine::close(bool drain) {
  ring_.close(drain);
  join();
}

void Engine::abort(const std::string& reason) {
  ring_.fail(reason);
  ring_.close(false);
  join();
}

void Engine::join() {
  std::lock_guard<std::mutex> lock(join_mutex_);
  if (thread_.joinable()) {
    TORCH_CHECK(thread_.get_id() != std::this_thread::get_id(),
                "Pipeline: close() or abort() called from inside the consumer's update");
    thread_.join();
  }
}

void Engine::consume() {
#if defined(__linux__)
  pthread_setname_np(pthread_self(), "nhgd-consumer");
#endif
  try {
    if (consumer_threads_ > 0) at::set_num_threads(static_cast<int>(consumer_threads_));
  } catch (const std::exception& e) {
    ring_.fail("Pipeline consumer: could not set its thread count: " + describe(e));
  }
  while (auto index = ring_.begin_pop()) {
    Slot& slot = slots_[*index];
    std::vector<at::Tensor> tensors;
    std::vector<int64_t> meta;
    try {
      tensors = route_->take(slot);
      meta = slot.meta;
    } catch (const std::exception& e) {
      ring_.release();
      ring_.fail("Pipeline consumer: copying a message in failed: " + describe(e));
      break;
    }
    ring_.release();
    try {
      route_->run_on_consumer([&] { apply_(tensors, meta); });
    } catch (const std::exception& e) {
      ring_.fail("Pipeline consumer: the update failed: " + describe(e));
      break;
    } catch (...) {
      ring_.fail("Pipeline consumer: the update failed with an unknown exception");
      break;
    }
    tensors.clear();
    ring_.mark_applied();
  }
  ring_.consumer_stopped();
}

}  // namespace nhgd::pipeline
