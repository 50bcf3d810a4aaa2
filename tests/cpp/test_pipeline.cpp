// Native tests of the pipeline's ring buffer and engine (CPU route), built by
// CMakeLists.txt and run by ctest. No Python: `apply` is a C++ function that
// records what it gets. Waits that could hang are bounded by the ctest timeout.
#include "pipeline/engine.h"
#include "pipeline/ring_buffer.h"

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

int g_failures = 0;

#define EXPECT(cond)                                                                  \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      ++g_failures;                                                                   \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);            \
    }                                                                                 \
  } while (0)

using nhgd::pipeline::Engine;
using nhgd::pipeline::RingBuffer;
using nhgd::pipeline::RingClosed;
using nhgd::pipeline::RingFailed;

void ring_in_order_with_one_slot() {
  RingBuffer ring(1);
  std::vector<int> payload(1), got;
  std::thread consumer([&] {
    while (auto slot = ring.begin_pop()) {
      got.push_back(payload[*slot]);
      ring.release();
      ring.mark_applied();
    }
    ring.consumer_stopped();
  });
  for (int i = 0; i < 10000; ++i) {
    const auto slot = ring.begin_push();
    payload[slot] = i;
    ring.end_push(true);
  }
  ring.wait_applied();
  ring.close(true);
  consumer.join();
  EXPECT(got.size() == 10000);
  for (int i = 0; i < static_cast<int>(got.size()); ++i) EXPECT(got[i] == i);
}

void ring_failure_wakes_a_blocked_producer() {
  RingBuffer ring(2);
  ring.begin_push();
  ring.end_push(true);
  ring.begin_push();
  ring.end_push(true);  // full: nobody consumes
  std::thread failer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.fail("consumer broke");
  });
  bool threw = false;
  try {
    ring.begin_push();
  } catch (const RingFailed& e) {
    threw = std::string(e.what()) == "consumer broke";
  }
  failer.join();
  EXPECT(threw);
  EXPECT(!ring.begin_pop().has_value());
}

void ring_abandoned_push_is_not_delivered() {
  RingBuffer ring(2);
  ring.begin_push();
  ring.end_push(false);
  EXPECT(ring.published() == 0);
  ring.close(true);
  EXPECT(!ring.begin_pop().has_value());
  bool closed = false;
  try {
    ring.begin_push();
  } catch (const RingClosed&) {
    closed = true;
  }
  EXPECT(closed);
}

void ring_try_push_never_waits() {
  RingBuffer ring(2);
  for (int i = 0; i < 2; ++i) {
    const auto slot = ring.try_begin_push();
    EXPECT(slot.has_value() && *slot == static_cast<std::size_t>(i));
    ring.end_push(true);
  }
  EXPECT(!ring.try_begin_push().has_value());  // full: refused at once, nothing changed
  EXPECT(ring.published() == 2);
  EXPECT(ring.begin_pop().has_value());
  ring.release();
  const auto freed = ring.try_begin_push();
  EXPECT(freed.has_value() && *freed == 0);
  EXPECT(!ring.try_begin_push().has_value());  // another push is filling
  ring.end_push(true);
  ring.fail("stopped");
  bool threw = false;
  try {
    ring.try_begin_push();
  } catch (const RingFailed&) {
    threw = true;
  }
  EXPECT(threw);
}

void engine_try_push_and_push_keep_one_order() {
  std::vector<double> got;
  Engine engine([&](std::vector<at::Tensor>& t, const std::vector<int64_t>&) { got.push_back(t[0][0].item<double>()); },
                2, at::Device("cpu"), at::Device("cpu"));
  auto buf = at::zeros({3}, at::kDouble);
  int immediate = 0;
  for (int i = 0; i < 20000; ++i) {
    buf.fill_(i);
    if (engine.try_push({buf}, {0})) {
      ++immediate;
    } else {
      engine.push({buf}, {0});
    }
  }
  engine.flush();
  engine.close(true);
  EXPECT(immediate > 0);
  EXPECT(got.size() == 20000);
  for (int i = 0; i < static_cast<int>(got.size()); ++i) EXPECT(got[i] == i);
}

void engine_delivers_copies_in_order() {
  std::vector<double> got;
  Engine engine([&](std::vector<at::Tensor>& t, const std::vector<int64_t>& meta) {
                  got.push_back(t[0][0].item<double>() + static_cast<double>(meta[0]));
                },
                3, at::Device("cpu"), at::Device("cpu"));
  auto buf = at::zeros({4}, at::kDouble);
  for (int i = 0; i < 20000; ++i) {
    buf.fill_(i);  // reused at once
    engine.push({buf}, {0});
  }
  engine.flush();
  EXPECT(engine.applied() == 20000);
  engine.close(true);
  EXPECT(got.size() == 20000);
  for (int i = 0; i < static_cast<int>(got.size()); ++i) EXPECT(got[i] == i);
}

void engine_consumer_error_reaches_the_producer() {
  Engine engine([](std::vector<at::Tensor>&, const std::vector<int64_t>& meta) {
                  if (meta[0] == 5) throw std::runtime_error("update 5 failed");
                },
                2, at::Device("cpu"), at::Device("cpu"));
  bool threw = false;
  try {
    for (int64_t i = 0; i < 1000; ++i) engine.push({at::ones({2})}, {i});
    engine.flush();
  } catch (const RingFailed& e) {
    threw = std::string(e.what()).find("update 5 failed") != std::string::npos;
  }
  EXPECT(threw);
  EXPECT(engine.applied() == 5);
  engine.close(true);
}

}  // namespace

int main() {
  ring_in_order_with_one_slot();
  ring_failure_wakes_a_blocked_producer();
  ring_abandoned_push_is_not_delivered();
  ring_try_push_never_waits();
  engine_try_push_and_push_keep_one_order();
  engine_delivers_copies_in_order();
  engine_consumer_error_reaches_the_producer();
  if (g_failures) {
    std::fprintf(stderr, "test_pipeline: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_pipeline: all passed\n");
  return 0;
}
