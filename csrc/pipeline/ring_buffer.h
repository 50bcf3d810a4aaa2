// Coordination of a ring of N message slots between producers and one
// consumer thread. Pure C++ (no torch, no Python): the slots' payload is kept
// by the owner, indexed by the slot number this class hands out, so the same
// logic serves host, pinned and device storage. Its waits and failures are
// tested step by step from Python (tests/test_pipeline_ring.py) and through
// the engine that owns it (tests/test_pipeline.py).
//
// Counters only ever grow; slot i of message n is n % N.
//   published: messages the producer finished copying in (visible to the consumer)
//   released:  messages the consumer has copied out (their slots are free again)
//   applied:   messages whose update has completed
// A message is applied exactly once, in push order, or the ring has failed and
// every later call says why: nothing is dropped silently.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

namespace nhgd::pipeline {

// The stream has failed (an error on either side); what() says where and why.
// Python sees nhgd_ext.pipeline.PipelineError (python_bindings.cpp translates).
struct PipelineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A call after close(); Python sees nhgd_ext.pipeline.PipelineClosed.
struct PipelineClosed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class RingBuffer {
 public:
  explicit RingBuffer(std::size_t slots) : slots_(slots) {
    if (slots == 0) throw std::invalid_argument("RingBuffer: argument 'slots' must be >= 1");
  }
  RingBuffer(const RingBuffer&) = delete;
  RingBuffer& operator=(const RingBuffer&) = delete;

  std::size_t slots() const { return slots_; }

  // ---- producer side --------------------------------------------------

  // Waits until the next slot is free and no other producer is filling one;
  // returns its index. The caller fills it, then calls end_push. Throws
  // PipelineError / PipelineClosed instead of waiting forever.
  std::size_t begin_push() {
    std::unique_lock<std::mutex> lock(mutex_);
    space_.wait(lock, [&] { return stopped_locked() || slot_free_locked(); });
    throw_if_stopped_locked();
    return claim_slot_locked();
  }

  // begin_push without the wait: the next slot's index if it is free now.
  std::optional<std::size_t> try_begin_push() {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_stopped_locked();
    if (!slot_free_locked()) return std::nullopt;
    return claim_slot_locked();
  }

  // published = true makes the slot's message visible to the consumer; false
  // abandons it (the copy in failed): the slot stays free, nothing was pushed.
  void end_push(bool published) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      filling_ = false;
      if (published) ++published_;
    }
    // The consumer may be waiting for filling_ to clear (close during a push),
    // another producer for its turn.
    ready_.notify_all();
    space_.notify_all();
  }

  // Waits until every message published before the call has been applied.
  // Throws PipelineError if the stream failed first, PipelineClosed if the consumer
  // stopped (close without drain) before reaching them.
  void wait_applied() {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::uint64_t target = published_;
    done_.wait(lock, [&] { return applied_ >= target || failed_ || consumer_stopped_; });
    if (failed_) throw PipelineError(error_);
    if (applied_ < target) throw PipelineClosed("pipeline closed before every message was applied");
  }

  // ---- consumer side --------------------------------------------------

  // Waits for the next message; returns its slot, or nothing when the consumer
  // must stop (failed, closed without drain, or closed and drained). A push
  // that was under way when close() came is still drained: its caller was told
  // it succeeded.
  std::optional<std::size_t> begin_pop() {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [&] {
      return failed_ || (closed_ && !drain_) || popped_ < published_ || (closed_ && !filling_);
    });
    if (failed_ || (closed_ && !drain_) || popped_ == published_) return std::nullopt;
    return static_cast<std::size_t>(popped_++ % slots_);
  }

  // The message's data has left its slot: the producer may refill it.
  void release() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++released_;
    }
    space_.notify_all();
  }

  // The message's update has completed.
  void mark_applied() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++applied_;
    }
    done_.notify_all();
  }

  // The consumer thread has returned: nobody waits for it any more.
  void consumer_stopped() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      consumer_stopped_ = true;
    }
    notify_everyone();
  }

  // ---- either side ----------------------------------------------------

  // Records the first error; every waiter wakes and later calls throw it.
  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!failed_) {
        failed_ = true;
        error_ = message;
      }
    }
    notify_everyone();
  }

  // No more pushes. drain = true: the consumer still applies every published
  // message; false: it stops after the message it is applying now.
  void close(bool drain) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!closed_) drain_ = drain;
      else drain_ = drain_ && drain;  // a second close may only shorten the drain
      closed_ = true;
    }
    notify_everyone();
  }

  bool failed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return failed_;
  }
  bool closed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return closed_;
  }
  std::optional<std::string> error() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!failed_) return std::nullopt;
    return error_;
  }
  std::uint64_t published() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return published_;
  }
  std::uint64_t applied() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return applied_;
  }
  // Messages pushed but not yet applied.
  std::uint64_t in_flight() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return published_ - applied_;
  }

 private:
  bool stopped_locked() const { return failed_ || closed_; }

  // The next slot is free and no other producer is filling one.
  bool slot_free_locked() const { return !filling_ && published_ - released_ < slots_; }

  std::size_t claim_slot_locked() {
    filling_ = true;
    return static_cast<std::size_t>(published_ % slots_);
  }

  void throw_if_stopped_locked() const {
    if (failed_) throw PipelineError(error_);
    if (closed_) throw PipelineClosed("pipeline is closed");
  }

  void notify_everyone() {
    space_.notify_all();
    ready_.notify_all();
    done_.notify_all();
  }

  const std::size_t slots_;
  mutable std::mutex mutex_;
  std::condition_variable space_;  // producers: a slot became free
  std::condition_variable ready_;  // consumer: a message was published
  std::condition_variable done_;   // flushers: a message was applied
  std::uint64_t published_ = 0, popped_ = 0, released_ = 0, applied_ = 0;
  bool filling_ = false;
  bool closed_ = false, drain_ = true, failed_ = false, consumer_stopped_ = false;
  std::string error_;
};

}  // namespace nhgd::pipeline
