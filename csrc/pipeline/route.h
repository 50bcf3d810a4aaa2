// How a message travels from the producer's device into a slot and out of it
// onto the consumer's device. The engine (engine.h) owns the slots and the
// ordering; a Route only moves bytes and orders the devices' work:
//
//   host           CPU -> CPU: plain copies, the consumer is a thread
//   pinned-host    one side on a GPU, or two GPUs without a working peer path:
//                  the slot is pinned host memory, copies run asynchronously on
//                  side streams, events order them on both devices
//   cuda-streams   one GPU: the slot lives on the GPU; the producer's copy and
//                  the consumer's updates run on streams of their own
//   peer           two GPUs with peer access (checked by a write-and-read test):
//                  the slot lives on the consumer's GPU, the producer writes it
//                  directly
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace nhgd::pipeline {

// Where one tensor of a message sits inside its slot's byte buffer.
struct TensorLayout {
  at::ScalarType dtype;
  std::vector<int64_t> sizes;
  int64_t offset;  // bytes, a multiple of kSlotAlignment
  int64_t nbytes;
};

// One slot: a message's tensors packed into one byte buffer, its integers, and
// whatever the route needs to order the devices' work on it.
struct Slot {
  at::Tensor bytes;  // uint8 on the route's slot device; grown by the producer while it owns the slot
  std::vector<TensorLayout> layout;
  std::vector<int64_t> meta;
  std::shared_ptr<void> sync;  // the route's per-slot state (CUDA events), made by Route::prepare
};

constexpr int64_t kSlotAlignment = 64;  // bytes: every dtype's view of the buffer is aligned

// Offsets of `tensors` packed one after another; the total size in `total`.
std::vector<TensorLayout> pack_layout(const std::vector<at::Tensor>& tensors, int64_t& total);

// The CPU side's copies into a slot in host memory (pageable or pinned) and
// out of it into fresh host tensors; the caller orders them after any device
// work on the slot.
void copy_into_host_slot(Slot& slot, const std::vector<TensorLayout>& layout, const std::vector<at::Tensor>& tensors);
std::vector<at::Tensor> copy_out_of_host_slot(const Slot& slot);

class Route {
 public:
  virtual ~Route() = default;
  virtual std::string name() const = 0;
  // Sets up a slot's per-slot state (called once per slot, before any traffic).
  virtual void prepare(Slot& slot) = 0;
  // Producer thread, which owns the slot: copies `tensors` into it. When it
  // returns the caller may overwrite or free its tensors (on a GPU: any work
  // its current stream does from now on is ordered after the copy).
  virtual void fill(Slot& slot, const std::vector<at::Tensor>& tensors) = 0;
  // Whether fill returns without waiting for the consumer (a plain copy): the
  // producer may then push without giving up the GIL.
  virtual bool fill_never_waits() const { return false; }
  // Consumer thread: fresh tensors on the consumer's device with the slot's
  // data, ready for work on the consumer's stream. When it returns the slot may
  // be refilled (the route orders the refill after the copy out).
  virtual std::vector<at::Tensor> take(Slot& slot) = 0;
  // Consumer thread: runs fn with the consumer's device and stream current.
  virtual void run_on_consumer(const std::function<void()>& fn) = 0;
  // Producer thread, after every message was applied: orders what the
  // producer does next after the consumer's work (its current streams on both
  // GPUs wait, or a CPU producer of a GPU consumer waits on the host).
  virtual void producer_waits_for_consumer() = 0;
  // (stream id, device index, device type) of the consumer's stream, for
  // torch.cuda.Stream(stream_id=..., ...); all zero on the CPU.
  virtual std::vector<int64_t> consumer_stream() const { return {0, 0, 0}; }
};

// The route for this pair of devices (throws for CUDA devices in a build
// without the CUDA sources).
std::unique_ptr<Route> make_route(const at::Device& producer, const at::Device& consumer);

// CPU -> CPU.
std::unique_ptr<Route> make_host_route();

}  // namespace nhgd::pipeline
