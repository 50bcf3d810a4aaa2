// Fixed-width vectors through the GCC/Clang vector extension: the compiler maps
// them onto AVX2/FMA (or pairs of SSE registers) without intrinsics, so the
// same code serves float and double and builds wherever the extension does.
#pragma once

#include <cstddef>
#include <cstring>

namespace nhgd::cpu {

template <typename T>
struct Vec {
  static constexpr int kBytes = 32;
  static constexpr int kLanes = kBytes / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(kBytes)));

  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  static type broadcast(T x) {
    type v;
    for (int i = 0; i < kLanes; ++i) v[i] = x;
    return v;
  }
  static T sum(type v) {
    T s = 0;
    for (int i = 0; i < kLanes; ++i) s += v[i];
    return s;
  }
};

// Side of the square tiles that the triangular kernels work on: 256 bytes of a
// row, so a tile and its mirrored partner stay in L1 together.
template <typename T>
constexpr int kTile = 256 / static_cast<int>(sizeof(T));

// Maps the index of a tile in the lower triangle (row-major over tile rows) to
// its tile coordinates (I, J), J <= I.
inline void lower_tile_coords(int64_t k, int64_t& I, int64_t& J) {
  int64_t i = static_cast<int64_t>((__builtin_sqrt(8.0 * static_cast<double>(k) + 1.0) - 1.0) / 2.0);
  while (i * (i + 1) / 2 > k) --i;
  while ((i + 1) * (i + 2) / 2 <= k) ++i;
  I = i;
  J = k - i * (i + 1) / 2;
}

}  // namespace nhgd::cpu
