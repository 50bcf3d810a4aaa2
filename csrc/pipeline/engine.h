// The pipeline's engine: a ring of slots (ring_buffer.h), a route that moves
// messages between the devices (route.h), and the consumer thread that drains
// the slots in order and hands each message to `apply`. No Python in here: the
// Python binding (python_bindings.cpp) supplies an `apply` that calls the
// curvature object (or, for DenseEFIM, its C++ core directly).
#pragma once

#include "pipeline/ring_buffer.h"
#include "pipeline/route.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace nhgd::pipeline {

// Applies one message on the consumer (device and stream current). It gets
// fresh tensors it may keep, and the message's integers. Throwing stops the
// stream: the error reaches the producer's next call.
using ApplyFn = std::function<void(std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta)>;

// An exception's message without c10's C++ backtrace.
std::string describe(const std::exception& e);

class Engine {
 public:
  // consumer_threads > 0 sets the consumer thread's intra-op thread count.
  Engine(ApplyFn apply, int64_t slots, const at::Device& producer, const at::Device& consumer,
         int64_t consumer_threads = 0);
  ~Engine();  // close(drain = false)
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Copies the message into the next free slot (waits only while every slot
  // is full). The caller may reuse its tensors as soon as this returns.
  void push(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta);
  // push if it cannot wait: a slot is free now and the route's copy never
  // waits for the consumer. False (nothing done) otherwise.
  bool try_push(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta);
  // Waits until every message pushed so far has been applied; then orders the
  // producer's next work after the consumer's.
  void flush();
  // No more pushes; drain = true applies what is queued first. Returns when
  // the consumer thread has ended. Safe to call more than once, from any thread.
  void close(bool drain);
  // Fails the stream with `reason` (the producer's error reaching the
  // consumer), discards what is queued and stops the consumer thread.
  void abort(const std::string& reason);

  uint64_t pushed() const { return ring_.published(); }
  uint64_t applied() const { return ring_.applied(); }
  std::optional<std::string> error() const { return ring_.error(); }
  bool closed() const { return ring_.closed(); }
  int64_t slots() const { return static_cast<int64_t>(slots_.size()); }
  std::string route() const { return route_->name(); }
  std::vector<int64_t> consumer_stream() const { return route_->consumer_stream(); }

 private:
  void consume();
  void join();
  void check_message(const std::vector<at::Tensor>& tensors) const;
  void fill_and_publish(std::size_t index, const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta);

  ApplyFn apply_;
  at::Device producer_, consumer_;
  int64_t consumer_threads_;
  RingBuffer ring_;
  std::vector<Slot> slots_;
  std::unique_ptr<Route> route_;
  std::thread thread_;
  std::mutex join_mutex_;
};

}  // namespace nhgd::pipeline
