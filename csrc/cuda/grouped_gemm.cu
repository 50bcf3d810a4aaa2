// Grouped GEMM and grouped symmetric rank-k downdate, for woodbury_,
// kfac_update_ and kfac_apply (docs/design.md §2.2, §2.3).
//
// A "grouped" launch takes up to kMaxGroupProblems independent problems of
// different shapes (by value, in the kernel parameters: no descriptor upload,
// nothing to keep alive, safe under CUDA graph capture). The 64 x 64 output
// tiles of all problems are numbered one after the other; each block takes
// tiles in a grid-stride loop and finds its problem by a scan of the prefix
// sums. A tile is a plain shared-memory GEMM: K in steps of 16, 256 threads,
// a 4 x 4 block of outputs per thread (rows ty + 16 r, columns tx + 16 c, so
// the shared-memory reads are broadcasts or consecutive). The operands are
// addressed through (row, column) strides, so transposes and non-contiguous
// inputs cost nothing extra; the loads pick the thread mapping that is
// coalesced for the operand's contiguous direction.
//
// The downdate A <- (A - Y Y^T)/a computes only the lower tiles (I >= J) of
// Y Y^T (half the flops), reads only the lower triangle of A, and writes each
// new lower tile and, through shared memory, its transpose into the upper
// tile: the result is exactly symmetric by construction. Per matrix an ok
// condition (coefficients, Cholesky info, finiteness flags) is evaluated on
// the device; a matrix that fails it is not touched at all and counted once.
#include "device_utils.cuh"
#include "launch.h"

#include <algorithm>

namespace nhgd::cuda {
namespace {

using dev::ceil_div;

constexpr int kThreads = 256;
constexpr int kBM = 64, kBN = 64, kBK = 16;
constexpr int64_t kMaxGrid = int64_t(1) << 20;

struct GemmLaunch {
  GemmProblem p[kMaxGroupProblems];
  int64_t begin[kMaxGroupProblems + 1];  // first tile of each problem; begin[count] = total
  int count;
};

struct DowndateLaunch {
  DowndateProblem p[kMaxGroupProblems];
  int64_t begin[kMaxGroupProblems + 1];
  int count;
};

// Kernel parameters must stay below the classic 4 KiB limit.
static_assert(sizeof(GemmLaunch) + 64 <= 4096, "GemmLaunch too large for kernel parameters");
static_assert(sizeof(DowndateLaunch) + 64 <= 4096, "DowndateLaunch too large for kernel parameters");

template <typename T>
struct GemmShared {
  struct Operands {
    T a[kBK][kBM + 1];  // op(A) tile, k-major; +1 against bank conflicts
    T b[kBK][kBN + 1];  // op(B) tile
  };
  union {
    Operands ab;
    T tile[kBM][kBN + 1];  // downdate: the new lower tile, read back transposed
  } u;
  int ok;
  T inv_a;
};

// acc = op(A)[i0:i0+64, :] op(B)[:, j0:j0+64] for thread (tx, ty): rows
// i0 + ty + 16 r, columns j0 + tx + 16 c. Out-of-range entries count as 0.
// With check_b, a non-finite loaded entry of op(B) sets `bad`.
template <typename T>
__device__ void mma_tile(const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t b_rs, int64_t b_cs,
                         int M, int N, int K, int i0, int j0, bool check_b, T (&acc)[4][4], bool& bad,
                         GemmShared<T>& sh) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool a_k_contig = a_cs == 1;  // rows of op(A) contiguous: threads walk k
  const bool b_j_contig = b_cs == 1;  // rows of op(B) contiguous: threads walk j
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = T(0);
  }
  for (int k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int q = 0; q < (kBM * kBK) / kThreads; ++q) {
      const int e = tid + q * kThreads;
      const int il = a_k_contig ? e / kBK : e % kBM;
      const int ka = a_k_contig ? e % kBK : e / kBM;
      const int i = i0 + il, kk = k0 + ka;
      sh.u.ab.a[ka][il] = (i < M && kk < K) ? A[int64_t(i) * a_rs + int64_t(kk) * a_cs] : T(0);
      const int jl = b_j_contig ? e % kBN : e / kBK;
      const int kb = b_j_contig ? e / kBN : e % kBK;
      const int j = j0 + jl, kk2 = k0 + kb;
      const T v = (j < N && kk2 < K) ? B[int64_t(kk2) * b_rs + int64_t(j) * b_cs] : T(0);
      if (check_b && !dev::finite(v)) bad = true;
      sh.u.ab.b[kb][jl] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kl = 0; kl < kBK; ++kl) {
      T av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = sh.u.ab.a[kl][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < 4; ++c) bv[c] = sh.u.ab.b[kl][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fma(av[r], bv[c], acc[r][c]);
      }
    }
    __syncthreads();
  }
}

// Index of the problem that owns tile w (begin[] ascending, problems non-empty).
template <typename Launch>
__device__ __forceinline__ int find_problem(const Launch& L, int64_t w) {
  int pi = 0;
  while (pi + 1 < L.count && L.begin[pi + 1] <= w) ++pi;
  return pi;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_kernel(const __grid_constant__ GemmLaunch L, const T* a_dev, double a_host, const T* b_dev,
                        double b_host) {
  __shared__ GemmShared<T> sh;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t total = L.begin[L.count];
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int pi = find_problem(L, w);
    const GemmProblem& pr = L.p[pi];
    const int64_t local = w - L.begin[pi];
    const int tn = static_cast<int>(ceil_div(pr.N, kBN));
    const int I = static_cast<int>(local / tn), J = static_cast<int>(local % tn);
    const int i0 = I * kBM, j0 = J * kBN;
    const bool check_b = (pr.flags & kGemmCheckB) != 0;
    const bool check_out = (pr.flags & kGemmCheckOut) != 0;
    bool bad = false;
    T acc[4][4];
    mma_tile(static_cast<const T*>(pr.A), pr.a_rs, pr.a_cs, static_cast<const T*>(pr.B), pr.b_rs, pr.b_cs, pr.M,
             pr.N, pr.K, i0, j0, check_b, acc, bad, sh);

    double alpha = pr.alpha;
    if (pr.flags & kGemmAlphaSqrtB) {
      const double b = dev::coeff(b_dev, b_host);
      alpha = sqrt((b > 0.0 ? b : 0.0) * pr.alpha);  // a bad b is rejected later, by the downdate
    }
    const T alpha_t = static_cast<T>(alpha);
    const bool add_diag = (pr.flags & kGemmDiagA) != 0;
    const T diag_t = add_diag ? static_cast<T>(dev::coeff(a_dev, a_host)) : T(0);
    T* C = static_cast<T*>(pr.C);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = i0 + ty + 16 * r, j = j0 + tx + 16 * c;
        if (i < pr.M && j < pr.N) {
          T v = alpha_t * acc[r][c];
          if (add_diag && i == j) v += diag_t;
          if (check_out && !dev::finite(v)) bad = true;
          C[int64_t(i) * pr.ldc + j] = v;
        }
      }
    }
    if ((check_b || check_out) && pr.bad != nullptr) {  // block-uniform condition
      if (__syncthreads_or(bad) && tid == 0) *pr.bad = 1;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    downdate_kernel(const __grid_constant__ DowndateLaunch L, const T* a_dev, double a_host, const T* b_dev,
                    double b_host, bool check_b, int* status) {
  __shared__ GemmShared<T> sh;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t total = L.begin[L.count];
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int pi = find_problem(L, w);
    const DowndateProblem& pr = L.p[pi];
    const int d = pr.d;
    const int64_t tm = ceil_div(d, kBM);
    const int64_t per = tm * (tm + 1) / 2;
    const int64_t local = w - L.begin[pi];
    const int64_t bi = local / per;  // matrix of the batch
    const int64_t k = local - bi * per;
    int I, J;
    dev::tri_coords(k, I, J);

    if (tid == 0) {
      const double a = dev::coeff(a_dev, a_host);
      bool ok = dev::valid_a(a);
      if (check_b) ok = ok && dev::valid_b(dev::coeff(b_dev, b_host));
      if (pr.info != nullptr) ok = ok && pr.info[bi] == 0;
      if (pr.bad != nullptr) ok = ok && pr.bad[bi] == 0;
      sh.ok = ok ? 1 : 0;
      sh.inv_a = static_cast<T>(1.0 / a);
      if (!ok && k == 0 && status != nullptr) atomicAdd(status, 1);  // once per matrix
    }
    __syncthreads();
    const bool ok = sh.ok != 0;
    const T inv_a = sh.inv_a;
    __syncthreads();  // everyone has read sh.ok before thread 0 may rewrite it
    if (!ok) continue;

    const T* Y = static_cast<const T*>(pr.Y) + bi * pr.y_bs;
    T* A = static_cast<T*>(pr.A) + bi * pr.a_bs;
    const int i0 = I * kBM, j0 = J * kBN;
    T acc[4][4];
    bool unused = false;
    // (Y Y^T)(i, j) = sum_l Y(i, l) Y(j, l): op(B)(l, j) = Y(j, l).
    mma_tile(Y, pr.y_rs, pr.y_cs, Y, pr.y_cs, pr.y_rs, d, d, pr.k, i0, j0, false, acc, unused, sh);

#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int il = ty + 16 * r, jl = tx + 16 * c;
        const int i = i0 + il, j = j0 + jl;
        if (i < d && j < d && i >= j) {
          const T nv = (A[int64_t(i) * d + j] - acc[r][c]) * inv_a;
          A[int64_t(i) * d + j] = nv;
          sh.u.tile[il][jl] = nv;
        }
      }
    }
    __syncthreads();
    // Upper tile (J, I): consecutive threads write consecutive columns i.
    for (int e = tid; e < kBM * kBN; e += kThreads) {
      const int jr = e / kBM, ir = e % kBM;
      const int i = i0 + ir, j = j0 + jr;
      if (i < d && j < d && i > j) A[int64_t(j) * d + i] = sh.u.tile[ir][jr];
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Non-finite flags: blockIdx.y walks the batch, blockIdx.x slices the entries
// of one matrix; a block that sees a non-finite entry stores 1 (the same value
// from every writer, so the unordered stores are harmless).
constexpr int kMaxFiniteChecks = 4;
struct FiniteLaunch {
  FiniteCheck c[kMaxFiniteChecks];
  int count;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nonfinite_kernel(const __grid_constant__ FiniteLaunch L, int64_t batch, int* flags) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    bool bad = false;
    for (int q = 0; q < L.count; ++q) {
      const FiniteCheck& c = L.c[q];
      const T* p = static_cast<const T*>(c.p) + b * c.bs;
      const int64_t n = c.rows * c.cols;
      for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += stride) {
        const int64_t i = e / c.cols, j = e - i * c.cols;
        bad |= !dev::finite(p[i * c.rs + j * c.cs]);
      }
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) flags[b] = 1;
  }
}

int grid_for(int64_t work) { return static_cast<int>(std::max<int64_t>(1, std::min(work, kMaxGrid))); }

template <typename T>
cudaError_t grouped_gemm_impl(const GemmProblem* problems, int count, const void* a_dev, double a_host,
                              const void* b_dev, double b_host, cudaStream_t stream) {
  for (int s = 0; s < count; s += kMaxGroupProblems) {
    GemmLaunch L{};
    int c = 0;
    int64_t total = 0;
    for (int q = s; q < std::min(count, s + kMaxGroupProblems); ++q) {
      const GemmProblem& pr = problems[q];
      const int64_t tiles = (pr.M > 0 && pr.N > 0) ? ceil_div(pr.M, kBM) * ceil_div(pr.N, kBN) : 0;
      if (tiles == 0) continue;
      L.p[c] = pr;
      L.begin[c] = total;
      total += tiles;
      ++c;
    }
    L.begin[c] = total;
    L.count = c;
    if (total == 0) continue;
    grouped_gemm_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
        L, static_cast<const T*>(a_dev), a_host, static_cast<const T*>(b_dev), b_host);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t grouped_downdate_impl(const DowndateProblem* problems, int count, const void* a_dev, double a_host,
                                  const void* b_dev, double b_host, bool check_b, int* status,
                                  cudaStream_t stream) {
  for (int s = 0; s < count; s += kMaxGroupProblems) {
    DowndateLaunch L{};
    int c = 0;
    int64_t total = 0;
    for (int q = s; q < std::min(count, s + kMaxGroupProblems); ++q) {
      const DowndateProblem& pr = problems[q];
      if (pr.d <= 0 || pr.batch <= 0) continue;
      const int64_t tm = ceil_div(pr.d, kBM);
      L.p[c] = pr;
      L.begin[c] = total;
      total += int64_t(pr.batch) * (tm * (tm + 1) / 2);
      ++c;
    }
    L.begin[c] = total;
    L.count = c;
    if (total == 0) continue;
    downdate_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
        L, static_cast<const T*>(a_dev), a_host, static_cast<const T*>(b_dev), b_host, check_b, status);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t nonfinite_flags_impl(const FiniteCheck* checks, int count, int64_t batch, int* flags,
                                 cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (count > kMaxFiniteChecks) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(flags, 0, sizeof(int) * size_t(batch), stream);
  if (err != cudaSuccess) return err;
  FiniteLaunch L{};
  int64_t most = 0;
  for (int q = 0; q < count; ++q) {
    L.c[q] = checks[q];
    most = std::max(most, checks[q].rows * checks[q].cols);
  }
  L.count = count;
  // About 16 entries per thread, at most 1024 blocks per matrix.
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(1024, ceil_div(most, int64_t(kThreads) * 16)));
  const int64_t gy = std::min<int64_t>(batch, 65535);
  nonfinite_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(
      L, batch, flags);
  return cudaGetLastError();
}

}  // namespace

cudaError_t grouped_gemm(const GemmProblem* problems, int count, bool is_double, const void* a_dev,
                         double a_host, const void* b_dev, double b_host, cudaStream_t stream) {
  return is_double ? grouped_gemm_impl<double>(problems, count, a_dev, a_host, b_dev, b_host, stream)
                   : grouped_gemm_impl<float>(problems, count, a_dev, a_host, b_dev, b_host, stream);
}

cudaError_t grouped_downdate(const DowndateProblem* problems, int count, bool is_double, const void* a_dev,
                             double a_host, const void* b_dev, double b_host, bool check_b, int* status,
                             cudaStream_t stream) {
  return is_double
             ? grouped_downdate_impl<double>(problems, count, a_dev, a_host, b_dev, b_host, check_b, status, stream)
             : grouped_downdate_impl<float>(problems, count, a_dev, a_host, b_dev, b_host, check_b, status, stream);
}

cudaError_t nonfinite_flags(const FiniteCheck* checks, int count, int64_t batch, bool is_double, int* flags,
                            cudaStream_t stream) {
  return is_double ? nonfinite_flags_impl<double>(checks, count, batch, flags, stream)
                   : nonfinite_flags_impl<float>(checks, count, batch, flags, stream);
}

}  // namespace nhgd::cuda
