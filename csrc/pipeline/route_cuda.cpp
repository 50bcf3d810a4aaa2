// The routes with a GPU on either side (route.h), and make_route.
//
// Ordering, with streams of our own so that neither side's queued work is
// waited for unless it must be:
//   producer GPU: its side stream waits for the producer's current stream
//     (the gradient is ready) and for the slot's `released` event (the last
//     copy out of this slot is done), copies into the slot, records `filled`;
//     the producer's current stream waits for `filled`, so the caller may
//     overwrite or free its tensor at once.
//   consumer GPU: its copy stream waits for `filled`, copies into fresh
//     tensors, records `released`; its compute stream waits for `released`
//     and runs the updates. The copy stream carries nothing else, so a slot is
//     released as soon as its bytes have moved, not after the updates queued
//     before it.
// Copies are raw cudaMemcpyAsync calls: torch's cross-device copy_ would add
// its own barrier between both devices' current streams.
#include "pipeline/route.h"

#include <c10/util/Exception.h>

#ifdef NHGD_WITH_CUDA

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/PeerToPeerAccess.h>
#include <cuda_runtime_api.h>

#include <optional>

namespace nhgd::pipeline {
namespace {

using c10::cuda::CUDAEvent;
using c10::cuda::CUDAStream;

struct SlotEvents {
  CUDAEvent ready;     // producer's current stream: the gradient is computed
  CUDAEvent filled;    // producer's side stream: the copy into the slot is done
  CUDAEvent released;  // consumer's copy stream: the copy out of the slot is done
  bool filled_pending = false;    // `filled` guards the slot's current content
  bool released_pending = false;  // `released` guards the slot's next refill
};

SlotEvents& events_of(Slot& slot) { return *static_cast<SlotEvents*>(slot.sync.get()); }

void copy_bytes(void* dst, const void* src, int64_t nbytes, const CUDAStream& stream) {
  if (nbytes > 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(nbytes), cudaMemcpyDefault, stream.stream()));
  }
}

// Whether `src` can write `dst`'s memory directly and the bytes arrive intact:
// peer access enabled, then a pattern written, copied across and read back.
bool peer_copy_works(c10::DeviceIndex src, c10::DeviceIndex dst, const CUDAStream& stream) {
  try {
    if (!at::cuda::get_p2p_access(src, dst)) return false;  // also enables it
    const int64_t n = 4096;
    auto pattern = at::arange(n, at::TensorOptions().dtype(at::kInt).device(at::Device(at::kCUDA, src)));
    auto target = at::full({n}, -1, at::TensorOptions().dtype(at::kInt).device(at::Device(at::kCUDA, dst)));
    c10::cuda::device_synchronize();  // arange/full ran on the current streams
    {
      c10::cuda::CUDAGuard guard(src);
      copy_bytes(target.data_ptr(), pattern.data_ptr(), n * 4, stream);
      stream.synchronize();
    }
    return at::equal(target.cpu(), pattern.cpu());
  } catch (const std::exception&) {
    return false;
  }
}

class CudaRoute final : public Route {
 public:
  CudaRoute(const at::Device& producer, const at::Device& consumer)
      : producer_(producer), consumer_(consumer) {
    if (producer_.is_cuda()) side_ = c10::cuda::getStreamFromPool(false, producer_.index());
    if (consumer_.is_cuda()) {
      copy_ = c10::cuda::getStreamFromPool(false, consumer_.index());
      compute_ = c10::cuda::getStreamFromPool(false, consumer_.index());
    }
    if (producer_.is_cuda() && consumer_.is_cuda()) {
      if (producer_.index() == consumer_.index()) {
        slot_on_consumer_ = true;
        name_ = "cuda-streams";
      } else if (peer_copy_works(producer_.index(), consumer_.index(), *side_)) {
        slot_on_consumer_ = true;
        name_ = "peer";
      } else {
        name_ = "pinned-host";
      }
    } else {
      name_ = "pinned-host";
    }
  }

  ~CudaRoute() override {
    // Slot buffers are freed after this: no copy may still touch them.
    try {
      if (side_) side_->synchronize();
      if (copy_) copy_->synchronize();
      if (compute_) compute_->synchronize();
    } catch (const std::exception&) {
      // A destructor must not throw; a broken device has reported itself already.
    }
  }

  std::string name() const override { return name_; }

  void prepare(Slot& slot) override { slot.sync = std::make_shared<SlotEvents>(); }

  void fill(Slot& slot, const std::vector<at::Tensor>& tensors) override {
    SlotEvents& ev = events_of(slot);
    int64_t total = 0;
    auto layout = pack_layout(tensors, total);
    if (producer_.is_cuda()) {
      c10::cuda::CUDAGuard guard(producer_.index());
      const CUDAStream current = c10::cuda::getCurrentCUDAStream(producer_.index());
      std::vector<at::Tensor> src;
      src.reserve(tensors.size());
      for (const auto& t : tensors) src.push_back(t.contiguous());
      ev.ready.record(current);
      ev.ready.block(*side_);
      if (ev.released_pending) ev.released.block(*side_);
      grow(slot, ev, total);
      auto* base = static_cast<uint8_t*>(slot.bytes.data_ptr());
      for (size_t i = 0; i < src.size(); ++i) copy_bytes(base + layout[i].offset, src[i].data_ptr(), layout[i].nbytes, *side_);
      ev.filled.record(*side_);
      ev.filled_pending = true;
      ev.filled.block(current);
      // A tensor freed by the caller right away must not be handed out again
      // before the side stream has read it.
      for (const auto& s : src) c10::cuda::CUDACachingAllocator::recordStream(s.storage().data_ptr(), *side_);
    } else {
      // A CPU producer writes the pinned slot itself, after the last copy out of it.
      if (ev.released_pending) {
        ev.released.synchronize();
        ev.released_pending = false;
      }
      grow(slot, ev, total);
      copy_into_host_slot(slot, layout, tensors);
      ev.filled_pending = false;
    }
    slot.layout = std::move(layout);
  }

  std::vector<at::Tensor> take(Slot& slot) override {
    SlotEvents& ev = events_of(slot);
    if (!consumer_.is_cuda()) {
      if (ev.filled_pending) ev.filled.synchronize();
      return copy_out_of_host_slot(slot);
    }
    std::vector<at::Tensor> out;
    out.reserve(slot.layout.size());
    c10::cuda::CUDAGuard guard(consumer_.index());
    // Allocated while the copy stream is current: the caching allocator
    // then knows which stream writes them (recordStream below adds the reader).
    c10::cuda::CUDAStreamGuard on_copy(*copy_);
    if (ev.filled_pending) ev.filled.block(*copy_);
    const auto* base = static_cast<const uint8_t*>(slot.bytes.data_ptr());
    for (const auto& l : slot.layout) {
      auto t = at::empty(l.sizes, at::TensorOptions().dtype(l.dtype).device(consumer_));
      copy_bytes(t.data_ptr(), base + l.offset, l.nbytes, *copy_);
      out.push_back(std::move(t));
    }
    ev.released.record(*copy_);
    ev.released_pending = true;
    ev.released.block(*compute_);
    for (const auto& t : out) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *compute_);
    return out;
  }

  void run_on_consumer(const std::function<void()>& fn) override {
    if (!consumer_.is_cuda()) {
      fn();
      return;
    }
    c10::cuda::CUDAGuard guard(consumer_.index());
    c10::cuda::CUDAStreamGuard on_compute(*compute_);
    fn();
  }

  void producer_waits_for_consumer() override {
    if (!consumer_.is_cuda()) return;
    CUDAEvent done;
    done.record(*compute_);
    if (producer_.is_cuda()) {
      done.block(c10::cuda::getCurrentCUDAStream(producer_.index()));
      // What a request returns stays on the consumer's GPU (inverse,
      // state_dict), and the caller may read the curvature there directly:
      // this thread's stream on that GPU must wait as well.
      if (consumer_.index() != producer_.index()) done.block(c10::cuda::getCurrentCUDAStream(consumer_.index()));
    } else {
      done.synchronize();
    }
  }

  std::vector<int64_t> consumer_stream() const override {
    if (!compute_) return {0, 0, 0};
    return {compute_->id(), compute_->device_index(), static_cast<int64_t>(compute_->device_type())};
  }

 private:
  void grow(Slot& slot, SlotEvents& ev, int64_t total) {
    if (slot.bytes.defined() && slot.bytes.numel() >= total) return;
    if (slot.bytes.defined() && ev.released_pending) {
      // The old buffer is freed below: the consumer's copy out of it must be over.
      ev.released.synchronize();
    }
    const int64_t size = std::max<int64_t>(total, kSlotAlignment);
    if (slot_on_consumer_) {
      c10::cuda::CUDAGuard on_consumer(consumer_.index());
      slot.bytes = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(consumer_));
      // The allocator may hand out memory that work queued on this thread's
      // current stream still uses; our streams are not ordered after it.
      c10::cuda::getCurrentCUDAStream(consumer_.index()).synchronize();
    } else {
      slot.bytes = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    }
  }

  at::Device producer_, consumer_;
  std::optional<CUDAStream> side_, copy_, compute_;
  bool slot_on_consumer_ = false;
  std::string name_;
};

}  // namespace

std::unique_ptr<Route> make_route(const at::Device& producer, const at::Device& consumer) {
  if (producer.is_cpu() && consumer.is_cpu()) return make_host_route();
  TORCH_CHECK_VALUE(producer.is_cpu() || producer.is_cuda(), "Pipeline: argument 'producer' must be a CPU or CUDA device, got ", producer);
  TORCH_CHECK_VALUE(consumer.is_cpu() || consumer.is_cuda(), "Pipeline: argument 'consumer' must be a CPU or CUDA device, got ", consumer);
  return std::make_unique<CudaRoute>(producer, consumer);
}

}  // namespace nhgd::pipeline

#else  // no CUDA sources in this build

namespace nhgd::pipeline {

std::unique_ptr<Route> make_route(const at::Device& producer, const at::Device& consumer) {
  TORCH_CHECK_VALUE(producer.is_cpu() && consumer.is_cpu(),
                    "Pipeline: this build of nhgd_ext has no CUDA sources, so the compiled pipeline "
                    "runs between CPU devices only (got producer=", producer, ", consumer=", consumer, ")");
  return make_host_route();
}

}  // namespace nhgd::pipeline

#endif
