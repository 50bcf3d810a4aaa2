// Launchers of the CUDA kernels of nhgd_ext: plain C++ declarations (raw
// pointers, sizes, a cudaStream_t), shared by the kernels (*.cu, compiled by
// nvcc without any torch header) and the host glue (ops_cuda.cpp).
//
// Conventions
// * Every launcher enqueues work on `stream` only, never synchronizes, and
//   returns the cudaError_t of its launches (cudaSuccess, or the first error).
// * Coefficients arrive as (dev, host): `dev` non-null means the value lives
//   on the device (same dtype as the state) and is read by the kernels only;
//   otherwise `host` is the value (already checked by the host).
// * Value checks that need device data (non-finite inputs, a <= 0 read on
//   the device, a non-positive Sherman-Morrison denominator, a failed
//   Cholesky factorization) make the kernels leave that matrix bit-for-bit
//   untouched and add 1 to *status (when status is not null).
// * Only float and double exist; each launcher has one overload per type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace nhgd::cuda {

// ---------------------------------------------------------------------------
// Sherman-Morrison, A' = A/a - (s/a) u u^T / (1 + s q), u = A g, q = g.u, s = b/a,
// for n matrices of size d x d (A: n*d*d contiguous, g: n*d contiguous). One
// fused launch (cooperative) when the device allows, else three launches of
// the same phases (bitwise the same result). Reads only the lower triangle;
// writes both, exactly symmetric. `workspace` holds
// sherman_morrison_workspace_bytes(n, d, sizeof(T)) bytes (16-byte aligned).
size_t sherman_morrison_workspace_bytes(int64_t n, int64_t d, size_t elem_size);
cudaError_t sherman_morrison(float* A, const float* g, int64_t n, int64_t d, void* workspace,
                             const float* a_dev, double a_host, const float* b_dev, double b_host,
                             int* status, cudaStream_t stream);
cudaError_t sherman_morrison(double* A, const double* g, int64_t n, int64_t d, void* workspace,
                             const double* a_dev, double a_host, const double* b_dev, double b_host,
                             int* status, cudaStream_t stream);

// Copies the strictly lower triangle of each of the n d x d matrices onto the
// upper triangle (exactly symmetric result).
cudaError_t symmetrize(float* A, int64_t n, int64_t d, cudaStream_t stream);
cudaError_t symmetrize(double* A, int64_t n, int64_t d, cudaStream_t stream);

// L <- a L + b B elementwise (numel elements, both contiguous). `flag` is a
// device int of workspace (the launcher clears it): a first kernel sets it
// when B has a non-finite entry, and the update kernel then writes nothing
// and counts one skip (as it does for invalid device coefficients).
cudaError_t running_average(float* L, const float* B, int64_t numel, int* flag,
                            const float* a_dev, double a_host, const float* b_dev, double b_host,
                            int* status, cudaStream_t stream);
cudaError_t running_average(double* L, const double* B, int64_t numel, int* flag,
                            const double* a_dev, double a_host, const double* b_dev, double b_host,
                            int* status, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Grouped GEMM: for each problem, C = alpha * op(A) op(B) (+ a on the diagonal),
// op(A)(i, l) = A[i*a_rs + l*a_cs] (M x K), op(B)(l, j) = B[l*b_rs + j*b_cs]
// (K x N), C[i*ldc + j] (M x N). All strides in elements; any layout works
// (transposes are strides). One launch per kMaxGroupProblems problems.
enum GemmFlags : int32_t {
  kGemmAlphaSqrtB = 1,  // alpha = sqrt(max(b, 0) * alpha) with the call's coefficient b
  kGemmDiagA = 2,       // add the call's coefficient a to C(i, i)
  kGemmCheckB = 4,      // a non-finite entry of op(B) sets *bad = 1
  kGemmCheckOut = 8,    // a non-finite entry of C sets *bad = 1
};

struct GemmProblem {
  const void* A = nullptr;
  const void* B = nullptr;
  void* C = nullptr;
  int64_t a_rs = 0, a_cs = 0, b_rs = 0, b_cs = 0, ldc = 0;
  int32_t M = 0, N = 0, K = 0;
  int32_t flags = 0;
  double alpha = 1.0;
  int* bad = nullptr;  // needed with kGemmCheckB / kGemmCheckOut
};

// Symmetric rank-k downdate, for each problem and each of its `batch` matrices:
// A <- (A - Y Y^T) / a, computed on the lower triangle of A (the only part
// read) and mirrored, so A is exactly symmetric. A: d x d contiguous
// (matrix b at A + b*a_bs), Y: d x k with Y(i, l) = Y[b*y_bs + i*y_rs + l*y_cs].
// A matrix is left untouched and counted in *status unless all of these hold:
// a finite and > 0, (with check_b) b finite and >= 0, info[b] == 0,
// bad[b] == 0 (each pointer may be null: no condition).
struct DowndateProblem {
  void* A = nullptr;
  int64_t a_bs = 0;
  const void* Y = nullptr;
  int64_t y_rs = 0, y_cs = 0, y_bs = 0;
  int32_t d = 0, k = 0, batch = 1;
  const int* info = nullptr;
  const int* bad = nullptr;
};

// A batch of matrices to check for non-finite entries: element (b, i, j) at
// p[b*bs + i*rs + j*cs], i < rows, j < cols.
struct FiniteCheck {
  const void* p = nullptr;
  int64_t rows = 0, cols = 0, rs = 0, cs = 0, bs = 0;
};

constexpr int kMaxGroupProblems = 32;  // problems per launch (kernel parameters < 4 KiB)

cudaError_t grouped_gemm(const GemmProblem* problems, int count, bool is_double,
                         const void* a_dev, double a_host, const void* b_dev, double b_host,
                         cudaStream_t stream);
cudaError_t grouped_downdate(const DowndateProblem* problems, int count, bool is_double,
                             const void* a_dev, double a_host, const void* b_dev, double b_host,
                             bool check_b, int* status, cudaStream_t stream);

// flags[b] = 1 if matrix b of any of the `count` (<= 4) checks has a
// non-finite entry, else 0 (the launcher clears the flags first).
cudaError_t nonfinite_flags(const FiniteCheck* checks, int count, int64_t batch, bool is_double, int* flags,
                            cudaStream_t stream);

}  // namespace nhgd::cuda
