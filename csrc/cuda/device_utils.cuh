// Small device helpers shared by the kernels of csrc/cuda/*.cu (no torch).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace nhgd::cuda::dev {

// Explicitly rounded arithmetic. The Sherman-Morrison result must be bitwise
// the same whether the fused (cooperative) kernel or the three fallback
// kernels run; spelling every operation out keeps the compiler from
// contracting a multiply and an add into an FMA in one kernel and not the other.
__device__ __forceinline__ float add_rn(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double add_rn(double x, double y) { return __dadd_rn(x, y); }
__device__ __forceinline__ float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double mul_rn(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ float fma_rn(float x, float y, float z) { return __fmaf_rn(x, y, z); }
__device__ __forceinline__ double fma_rn(double x, double y, double z) { return __fma_rn(x, y, z); }

__device__ __forceinline__ bool finite(float x) { return isfinite(x); }
__device__ __forceinline__ bool finite(double x) { return isfinite(x); }

// Loads that bypass L1: data written by other blocks of the same launch
// (before a grid-wide barrier) is read through L2.
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double load_cg(const double* p) { return __ldcg(p); }

// A coefficient: on the device when `dev` is not null, else the host value.
template <typename T>
__device__ __forceinline__ double coeff(const T* dev, double host) {
  return dev != nullptr ? static_cast<double>(*dev) : host;
}
__device__ __forceinline__ bool valid_a(double a) { return isfinite(a) && a > 0.0; }
__device__ __forceinline__ bool valid_b(double b) { return isfinite(b) && b >= 0.0; }

// 16-byte vectors: 4 floats or 2 doubles.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int kLanes = 4;
  __device__ __forceinline__ static void load(const float* p, float* v) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
  }
  __device__ __forceinline__ static void store(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <>
struct Vec<double> {
  static constexpr int kLanes = 2;
  __device__ __forceinline__ static void load(const double* p, double* v) {
    const double2 x = *reinterpret_cast<const double2*>(p);
    v[0] = x.x;
    v[1] = x.y;
  }
  __device__ __forceinline__ static void store(double* p, const double* v) {
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  }
};

// Lower-triangle tiles (I, J), J <= I, numbered row by row:
// k = I (I + 1) / 2 + J.
__host__ __device__ inline void tri_coords(int64_t k, int& I, int& J) {
  int64_t i = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(k) + 1.0) - 1.0) * 0.5);
  while (i * (i + 1) / 2 > k) --i;
  while ((i + 1) * (i + 2) / 2 <= k) ++i;
  I = static_cast<int>(i);
  J = static_cast<int>(k - i * (i + 1) / 2);
}

__host__ __device__ constexpr int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace nhgd::cuda::dev
