// Transposed copy of one small square block (8 x 8 floats or 4 x 4 doubles):
// dst[c][r] = src[r][c]. With AVX the block goes through registers, so both
// the reads and the writes are whole rows; element-by-element transposes are
// about four times slower on the machines we measured (bench/RESULTS.md).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace nhgd::cpu {

template <typename T>
constexpr int kBlockSide = 32 / static_cast<int>(sizeof(T));

template <typename T>
inline void transpose_block_scalar(const T* src, int64_t ls, T* dst, int64_t ld) {
  constexpr int B = kBlockSide<T>;
  for (int r = 0; r < B; ++r)
    for (int c = 0; c < B; ++c) dst[c * ld + r] = src[r * ls + c];
}

#if defined(__AVX__)
inline void transpose_block(const float* s, int64_t ls, float* d, int64_t ld) {
  const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ls), r2 = _mm256_loadu_ps(s + 2 * ls),
               r3 = _mm256_loadu_ps(s + 3 * ls), r4 = _mm256_loadu_ps(s + 4 * ls), r5 = _mm256_loadu_ps(s + 5 * ls),
               r6 = _mm256_loadu_ps(s + 6 * ls), r7 = _mm256_loadu_ps(s + 7 * ls);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + ld, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}

inline void transpose_block(const double* s, int64_t ls, double* d, int64_t ld) {
  const __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + ls), r2 = _mm256_loadu_pd(s + 2 * ls),
                r3 = _mm256_loadu_pd(s + 3 * ls);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1), t2 = _mm256_unpacklo_pd(r2, r3),
                t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(d + ld, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(d + 2 * ld, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(d + 3 * ld, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#else
template <typename T>
inline void transpose_block(const T* src, int64_t ls, T* dst, int64_t ld) {
  transpose_block_scalar(src, ls, dst, ld);
}
#endif

// Copies the lower-triangle part of tile (I, J), J <= I, of the d x d matrix M
// (tiles of side TB) onto its mirror image above the diagonal: column j of the
// lower triangle becomes row j of the upper one. Whole blocks below the
// diagonal go through transpose_block; diagonal tiles and ragged edges go
// entry by entry.
template <typename T>
inline void mirror_tile(T* M, int64_t d, int64_t TB, int64_t I, int64_t J) {
  const int64_t i0 = I * TB, i1 = std::min(d, i0 + TB);
  const int64_t j0 = J * TB, j1 = std::min(d, j0 + TB);
  auto copy_entries = [&](int64_t ia, int64_t ib, int64_t ja, int64_t jb) {
    for (int64_t j = ja; j < jb; ++j) {
      for (int64_t i = std::max(ia, j + 1); i < ib; ++i) M[j * d + i] = M[i * d + j];
    }
  };
  if (I == J) {
    copy_entries(i0, i1, j0, j1);
    return;
  }
  constexpr int64_t B = kBlockSide<T>;
  const int64_t full_i = i0 + (i1 - i0) / B * B, full_j = j0 + (j1 - j0) / B * B;
  for (int64_t i = i0; i < full_i; i += B) {
    for (int64_t j = j0; j < full_j; j += B) transpose_block(M + i * d + j, d, M + j * d + i, d);
  }
  copy_entries(full_i, i1, j0, j1);
  copy_entries(i0, full_i, full_j, j1);
}

}  // namespace nhgd::cpu
