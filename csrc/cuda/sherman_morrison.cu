// Sherman-Morrison update (docs/design.md §2.1) as one fused launch, plus the two
// other bandwidth-bound kernels: symmetrize (mirror the lower triangle) and
// the running average L <- a L + b B.
//
// Sherman-Morrison, for each of n matrices A (d x d, only the lower triangle
// read) and vectors g:
//   u = A g,  q = g.u,  s = b/a,  c = (s/a) / (1 + s q),  A'_ij = A_ij/a - c u_i u_j.
// The matrix is cut into 64 x 64 tiles; only the lower tiles (I, J <= I) are
// work items. Three phases:
//   1. each lower tile reads A_IJ once and produces both of its contributions
//      to u: A_IJ g_J (to the rows of I) and A_IJ^T g_I (to the rows of J),
//      written to the workspace W[J][rows of I] and W[I][rows of J]. Every
//      entry W[S][r] is written by exactly one tile (the diagonal tile
//      writes the sum of both halves), so no atomics are needed.
//   2. each chunk of 64 rows sums u_r = sum_S W[S][r] in a fixed order and
//      its share of q (in double), and marks a non-finite g (q becomes NaN).
//   3. each lower tile sums the shares of q in a fixed order (every tile of a
//      matrix gets the same bits), checks the coefficients and the
//      denominator, and, if all is well, writes A'_IJ (coalesced) and its
//      transpose into the upper tile (through shared memory, coalesced).
//      A failed check leaves the whole matrix untouched and counts one skip.
// Phases are separated by grid-wide barriers (cooperative launch); where the
// device or the context does not allow a cooperative launch, the same phases
// run as three ordinary launches. Every value depends only on the work item,
// never on the block or the grid size, and all arithmetic is explicitly
// rounded (add_rn, mul_rn, fma_rn), so both paths give bitwise the same A.
//
// Traffic per update: phase 1 reads d^2/2 elements, phase 3 reads d^2/2 more
// (mostly from L2) and writes d^2, against 3 d^2 for `A @ g` + `addr_`.
#include "device_utils.cuh"
#include "launch.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>

namespace nhgd::cuda {
namespace {

namespace cg = cooperative_groups;
using dev::add_rn;
using dev::ceil_div;
using dev::fma_rn;
using dev::load_cg;
using dev::mul_rn;
using dev::Vec;

constexpr int kThreads = 256;
constexpr int kTile = 64;
constexpr int64_t kMaxGrid = int64_t(1) << 20;  // grid-stride loops beyond this

template <typename T>
struct SmCfg {
  static constexpr int VEC = Vec<T>::kLanes;          // elements per 16-byte access
  static constexpr int TPR = kTile / VEC;             // threads per tile row: 16 | 32
  static constexpr int RPP = kThreads / TPR;          // tile rows per pass: 16 | 8
  static constexpr int PASSES = kTile / RPP;          // passes over a tile: 4 | 8
  static constexpr int GROUPS = kThreads / kTile;     // phase 2: partial sums per row
  static_assert(TPR <= 32 && 32 % TPR == 0, "a tile row must sit inside one warp");
};

template <typename T>
struct SmParams {
  T* A;
  const T* g;
  int d;
  int nT;                  // tiles per side: ceil(d / 64)
  int64_t tiles_per_mat;   // nT (nT + 1) / 2 lower tiles
  int64_t tiles;           // n * tiles_per_mat: phases 1 and 3
  int64_t chunks;          // n * nT row chunks: phase 2
  T* W;                    // n x nT x d partial products
  T* U;                    // n x d, u = A g
  double* Qp;              // n x nT partial sums of q
  const T* a_dev;
  double a_host;
  const T* b_dev;
  double b_host;
  int* status;
  bool vec;                // 16-byte accesses allowed (d % VEC == 0, A aligned)
};

template <typename T>
struct SmShared {
  T x[kTile];              // phase 1: g on the tile's rows; phase 3: u on its rows
  T y[kTile];              // ... on the tile's columns
  T rowpart[kTile];
  double prod[kTile];
  T c, inv_a;
  int ok;
  union {
    T colpart[SmCfg<T>::RPP][kTile];
    T red[SmCfg<T>::GROUPS][kTile];
    T tile[kTile][kTile + 1];  // +1: conflict-free column reads
  } u;
};

// VEC consecutive elements row[j..], zero where j + t >= end.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int j, int end, bool vec, T* v) {
  constexpr int V = Vec<T>::kLanes;
  if (vec && j + V <= end) {
    Vec<T>::load(row + j, v);
  } else {
#pragma unroll
    for (int t = 0; t < V; ++t) v[t] = (j + t < end) ? row[j + t] : T(0);
  }
}

// Stores v[t] to row[j + t] where j + t < end.
template <typename T>
__device__ __forceinline__ void store_chunk(T* row, int j, int end, bool vec, const T* v) {
  constexpr int V = Vec<T>::kLanes;
  if (vec && j + V <= end) {
    Vec<T>::store(row + j, v);
  } else {
#pragma unroll
    for (int t = 0; t < V; ++t) {
      if (j + t < end) row[j + t] = v[t];
    }
  }
}

// Phase 1, lower tile w: the contributions of A_IJ to u, into W.
template <typename T>
__device__ void sm_phase1(const SmParams<T>& p, int64_t w, SmShared<T>& sh) {
  using C = SmCfg<T>;
  const int tid = threadIdx.x;
  const int64_t m = w / p.tiles_per_mat;
  int I, J;
  dev::tri_coords(w - m * p.tiles_per_mat, I, J);
  const int d = p.d;
  const int i0 = I * kTile, j0 = J * kTile;
  const bool diag = I == J;
  const T* Am = p.A + m * d * d;
  const T* gm = p.g + m * d;

  if (tid < kTile) {
    sh.x[tid] = (i0 + tid < d) ? gm[i0 + tid] : T(0);
  } else if (tid < 2 * kTile) {
    const int t = tid - kTile;
    sh.y[t] = (j0 + t < d) ? gm[j0 + t] : T(0);
  }
  __syncthreads();

  const int cc = tid % C::TPR, rg = tid / C::TPR, jl = cc * C::VEC;
  T gy[C::VEC], col[C::VEC];
#pragma unroll
  for (int t = 0; t < C::VEC; ++t) {
    gy[t] = sh.y[jl + t];
    col[t] = T(0);
  }
#pragma unroll
  for (int ps = 0; ps < C::PASSES; ++ps) {
    const int r = rg + ps * C::RPP, i = i0 + r;
    T v[C::VEC];
    if (i < d) {
      load_chunk(Am + int64_t(i) * d, j0 + jl, d, p.vec, v);
    } else {
#pragma unroll
      for (int t = 0; t < C::VEC; ++t) v[t] = T(0);
    }
    const T gx = sh.x[r];
    T rs = T(0);
#pragma unroll
    for (int t = 0; t < C::VEC; ++t) {
      const int j = j0 + jl + t;
      // On the diagonal tile only the lower triangle is read: A_ij (j <= i)
      // feeds u_i, and for j < i also u_j as the mirrored A_ji. Selects, not
      // products with a mask, so whatever the upper triangle holds is ignored.
      const T x_row = (diag && j > i) ? T(0) : v[t];
      const T x_col = (diag && j >= i) ? T(0) : v[t];
      rs = fma_rn(x_row, gy[t], rs);
      col[t] = fma_rn(x_col, gx, col[t]);
    }
#pragma unroll
    for (int off = C::TPR / 2; off > 0; off >>= 1) {
      rs = add_rn(rs, __shfl_xor_sync(0xffffffffu, rs, off, C::TPR));
    }
    if (cc == 0) sh.rowpart[r] = rs;
  }
#pragma unroll
  for (int t = 0; t < C::VEC; ++t) sh.u.colpart[rg][jl + t] = col[t];
  __syncthreads();

  if (tid < kTile) {
    T cs = sh.u.colpart[0][tid];
#pragma unroll
    for (int q = 1; q < C::RPP; ++q) cs = add_rn(cs, sh.u.colpart[q][tid]);
    T* Wm = p.W + m * p.nT * d;
    if (diag) {
      if (i0 + tid < d) Wm[int64_t(I) * d + i0 + tid] = add_rn(sh.rowpart[tid], cs);
    } else {
      if (i0 + tid < d) Wm[int64_t(J) * d + i0 + tid] = sh.rowpart[tid];
      if (j0 + tid < d) Wm[int64_t(I) * d + j0 + tid] = cs;
    }
  }
  __syncthreads();
}

// Phase 2, row chunk w: u on 64 rows, their share of q (double), g checked.
template <typename T>
__device__ void sm_phase2(const SmParams<T>& p, int64_t w, SmShared<T>& sh) {
  using C = SmCfg<T>;
  const int tid = threadIdx.x;
  const int64_t m = w / p.nT;
  const int R = static_cast<int>(w - m * p.nT);
  const int d = p.d;
  const int il = tid % kTile, sg = tid / kTile;
  const int r = R * kTile + il;
  const T* Wm = p.W + m * p.nT * d;

  T part = T(0);
  if (r < d) {
    for (int S = sg; S < p.nT; S += C::GROUPS) part = add_rn(part, load_cg(Wm + int64_t(S) * d + r));
  }
  sh.u.red[sg][il] = part;
  __syncthreads();

  if (tid < kTile) {
    T u = sh.u.red[0][tid];
#pragma unroll
    for (int q = 1; q < C::GROUPS; ++q) u = add_rn(u, sh.u.red[q][tid]);
    double prod = 0.0;
    if (r < d) {
      p.U[m * d + r] = u;
      const T gv = p.g[m * d + r];
      // A non-finite g poisons q, so the denominator check rejects the matrix.
      prod = dev::finite(gv) ? __dmul_rn(static_cast<double>(gv), static_cast<double>(u))
                             : __longlong_as_double(0x7ff8000000000000LL);
    }
    sh.prod[tid] = prod;
  }
  __syncthreads();

  if (tid == 0) {
    double q = sh.prod[0];
    for (int t = 1; t < kTile; ++t) q = __dadd_rn(q, sh.prod[t]);
    p.Qp[m * p.nT + R] = q;
  }
  __syncthreads();
}

// Phase 3, lower tile w: checks, then A'_IJ and its mirror A'_JI.
template <typename T>
__device__ void sm_phase3(const SmParams<T>& p, int64_t w, SmShared<T>& sh) {
  using C = SmCfg<T>;
  const int tid = threadIdx.x;
  const int64_t m = w / p.tiles_per_mat;
  const int64_t k = w - m * p.tiles_per_mat;
  int I, J;
  dev::tri_coords(k, I, J);
  const int d = p.d;
  const int i0 = I * kTile, j0 = J * kTile;
  const bool diag = I == J;
  T* Am = p.A + m * d * d;
  const T* um = p.U + m * d;

  if (tid == 0) {
    // Every tile of matrix m sums the same values in the same order.
    const double* qm = p.Qp + m * p.nT;
    double q = load_cg(qm);
    for (int R = 1; R < p.nT; ++R) q = __dadd_rn(q, load_cg(qm + R));
    const double a = dev::coeff(p.a_dev, p.a_host);
    const double b = dev::coeff(p.b_dev, p.b_host);
    bool ok = dev::valid_a(a) && dev::valid_b(b);
    const double s = __ddiv_rn(b, a);
    const double den = __dadd_rn(1.0, __dmul_rn(s, q));
    ok = ok && isfinite(den) && den > 0.0;
    sh.ok = ok ? 1 : 0;
    sh.c = static_cast<T>(__ddiv_rn(__ddiv_rn(s, a), den));
    sh.inv_a = static_cast<T>(__ddiv_rn(1.0, a));
    if (!ok && k == 0 && p.status != nullptr) atomicAdd(p.status, 1);  // once per matrix
  } else if (tid >= kTile && tid < 2 * kTile) {
    const int t = tid - kTile;
    sh.x[t] = (i0 + t < d) ? load_cg(um + i0 + t) : T(0);
  } else if (tid >= 2 * kTile && tid < 3 * kTile) {
    const int t = tid - 2 * kTile;
    sh.y[t] = (j0 + t < d) ? load_cg(um + j0 + t) : T(0);
  }
  __syncthreads();

  if (sh.ok) {  // block-uniform
    const T negc = -sh.c, inv_a = sh.inv_a;
    const int cc = tid % C::TPR, rg = tid / C::TPR, jl = cc * C::VEC;
    T uy[C::VEC];
#pragma unroll
    for (int t = 0; t < C::VEC; ++t) uy[t] = sh.y[jl + t];
#pragma unroll
    for (int ps = 0; ps < C::PASSES; ++ps) {
      const int r = rg + ps * C::RPP, i = i0 + r;
      T v[C::VEC], nv[C::VEC];
      if (i < d) {
        load_chunk(Am + int64_t(i) * d, j0 + jl, d, p.vec, v);
      } else {
#pragma unroll
        for (int t = 0; t < C::VEC; ++t) v[t] = T(0);
      }
      const T ux = sh.x[r];
#pragma unroll
      for (int t = 0; t < C::VEC; ++t) {
        // A_ij / a - c u_i u_j; the mirrored entry gets this very value.
        nv[t] = fma_rn(negc, mul_rn(ux, uy[t]), mul_rn(v[t], inv_a));
        sh.u.tile[r][jl + t] = nv[t];
      }
      // Lower tile: whole rows; the diagonal tile only up to the diagonal.
      if (i < d) store_chunk(Am + int64_t(i) * d, j0 + jl, diag ? min(d, i + 1) : d, p.vec, nv);
    }
    __syncthreads();
    // Upper tile (J, I): row j = j0 + jr, columns i = i0 + ir, consecutive
    // threads on consecutive i; entry (j, i) is the new lower entry (i, j).
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int jr = e / kTile, ir = e % kTile;
      const int i = i0 + ir, j = j0 + jr;
      if (i < d && j < d && i > j) Am[int64_t(j) * d + i] = sh.u.tile[ir][jr];
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sm_fused_kernel(const SmParams<T> p) {
  __shared__ SmShared<T> sh;
  cg::grid_group grid = cg::this_grid();
  for (int64_t w = blockIdx.x; w < p.tiles; w += gridDim.x) sm_phase1(p, w, sh);
  grid.sync();
  for (int64_t w = blockIdx.x; w < p.chunks; w += gridDim.x) sm_phase2(p, w, sh);
  grid.sync();
  for (int64_t w = blockIdx.x; w < p.tiles; w += gridDim.x) sm_phase3(p, w, sh);
}

template <typename T, int Phase>
__global__ void __launch_bounds__(kThreads) sm_phase_kernel(const SmParams<T> p) {
  __shared__ SmShared<T> sh;
  const int64_t work = Phase == 2 ? p.chunks : p.tiles;
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    if (Phase == 1) {
      sm_phase1(p, w, sh);
    } else if (Phase == 2) {
      sm_phase2(p, w, sh);
    } else {
      sm_phase3(p, w, sh);
    }
  }
}

// Blocks of sm_fused_kernel<T> that can be co-resident on device `device`
// (0 if cooperative launches are not supported), cached per device.
template <typename T>
int cooperative_capacity(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: unknown, else capacity + 1
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) return v - 1;
  }
  int coop = 0, sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sm_fused_kernel<T>, kThreads, 0) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    coop = 0;
  }
  const int capacity = coop ? sms * per_sm : 0;
  if (device >= 0 && device < kMaxDevices) cache[device].store(capacity + 1, std::memory_order_relaxed);
  return capacity;
}

size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

struct SmLayout {
  size_t w_bytes, u_bytes, q_bytes;
  SmLayout(int64_t n, int64_t d, size_t es) {
    const int64_t nT = ceil_div(d, kTile);
    w_bytes = align16(size_t(n) * size_t(nT) * size_t(d) * es);
    u_bytes = align16(size_t(n) * size_t(d) * es);
    q_bytes = align16(size_t(n) * size_t(nT) * sizeof(double));
  }
  size_t total() const { return w_bytes + u_bytes + q_bytes; }
};

int grid_for(int64_t work) { return static_cast<int>(std::max<int64_t>(1, std::min(work, kMaxGrid))); }

template <typename T>
cudaError_t sherman_morrison_impl(T* A, const T* g, int64_t n, int64_t d, void* workspace,
                                  const T* a_dev, double a_host, const T* b_dev, double b_host,
                                  int* status, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return cudaSuccess;
  const SmLayout layout(n, d, sizeof(T));
  char* ws = static_cast<char*>(workspace);
  SmParams<T> p;
  p.A = A;
  p.g = g;
  p.d = static_cast<int>(d);
  p.nT = static_cast<int>(ceil_div(d, kTile));
  p.tiles_per_mat = int64_t(p.nT) * (p.nT + 1) / 2;
  p.tiles = n * p.tiles_per_mat;
  p.chunks = n * p.nT;
  p.W = reinterpret_cast<T*>(ws);
  p.U = reinterpret_cast<T*>(ws + layout.w_bytes);
  p.Qp = reinterpret_cast<double*>(ws + layout.w_bytes + layout.u_bytes);
  p.a_dev = a_dev;
  p.a_host = a_host;
  p.b_dev = b_dev;
  p.b_host = b_host;
  p.status = status;
  p.vec = (d % Vec<T>::kLanes == 0) && dev::aligned16(A);

  // One cooperative launch when the device allows it. Not while the stream
  // is being captured into a CUDA graph: the three-launch path is capturable
  // everywhere and gives the same bits.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    (void)cudaGetLastError();
    capture = cudaStreamCaptureStatusActive;
  }
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return cudaGetLastError();
  const int capacity = capture == cudaStreamCaptureStatusNone ? cooperative_capacity<T>(device) : 0;
  if (capacity > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>(capacity, std::max(p.tiles, p.chunks)));
    void* args[] = {&p};
    const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&sm_fused_kernel<T>),
                                                        dim3(blocks), dim3(kThreads), args, 0, stream);
    if (err == cudaSuccess) return cudaSuccess;
    if (err != cudaErrorCooperativeLaunchTooLarge && err != cudaErrorNotSupported) return err;
    (void)cudaGetLastError();  // not an error of the stream: fall back
  }
  sm_phase_kernel<T, 1><<<grid_for(p.tiles), kThreads, 0, stream>>>(p);
  sm_phase_kernel<T, 2><<<grid_for(p.chunks), kThreads, 0, stream>>>(p);
  sm_phase_kernel<T, 3><<<grid_for(p.tiles), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// symmetrize: strictly lower -> strictly upper, tile by tile through shared
// memory (coalesced reads of the lower tile, coalesced writes of the upper).
template <typename T>
__global__ void __launch_bounds__(kThreads) mirror_kernel(T* A, int d, int64_t tiles_per_mat, int64_t tiles) {
  __shared__ T tile[kTile][kTile + 1];
  const int tid = threadIdx.x;
  for (int64_t w = blockIdx.x; w < tiles; w += gridDim.x) {
    const int64_t m = w / tiles_per_mat;
    int I, J;
    dev::tri_coords(w - m * tiles_per_mat, I, J);
    const int i0 = I * kTile, j0 = J * kTile;
    T* Am = A + m * d * d;
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int i = i0 + r, j = j0 + c;
      if (i < d && j < d && i > j) tile[r][c] = Am[int64_t(i) * d + j];
    }
    __syncthreads();
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int jr = e / kTile, ir = e % kTile;
      const int i = i0 + ir, j = j0 + jr;
      if (i < d && j < d && i > j) Am[int64_t(j) * d + i] = tile[ir][jr];
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t symmetrize_impl(T* A, int64_t n, int64_t d, cudaStream_t stream) {
  if (n <= 0 || d <= 1) return cudaSuccess;
  const int64_t nT = ceil_div(d, kTile);
  const int64_t per = nT * (nT + 1) / 2;
  mirror_kernel<T><<<grid_for(n * per), kThreads, 0, stream>>>(A, static_cast<int>(d), per, n * per);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// running average: a check of B (sets *flag on a non-finite entry), then the
// update, which writes nothing when the flag is set or a coefficient is bad.
template <typename T>
__global__ void __launch_bounds__(kThreads) ra_check_kernel(const T* B, int64_t numel, bool vec, int* flag) {
  constexpr int V = Vec<T>::kLanes;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t t0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  bool bad = false;
  int64_t tail = 0;
  if (vec) {
    const int64_t nv = numel / V;
    for (int64_t q = t0; q < nv; q += stride) {
      T v[V];
      Vec<T>::load(B + q * V, v);
#pragma unroll
      for (int t = 0; t < V; ++t) bad |= !dev::finite(v[t]);
    }
    tail = nv * V;
  }
  for (int64_t i = tail + t0; i < numel; i += stride) bad |= !dev::finite(B[i]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ra_update_kernel(T* L, const T* B, int64_t numel, bool vec,
                                                             const int* flag, const T* a_dev, double a_host,
                                                             const T* b_dev, double b_host, int* status) {
  constexpr int V = Vec<T>::kLanes;
  const double a = dev::coeff(a_dev, a_host), b = dev::coeff(b_dev, b_host);
  if (*flag != 0 || !dev::valid_a(a) || !dev::valid_b(b)) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && status != nullptr) atomicAdd(status, 1);
    return;
  }
  const T ca = static_cast<T>(a), cb = static_cast<T>(b);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t t0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec) {
    const int64_t nv = numel / V;
    for (int64_t q = t0; q < nv; q += stride) {
      T l[V], x[V];
      Vec<T>::load(L + q * V, l);
      Vec<T>::load(B + q * V, x);
#pragma unroll
      for (int t = 0; t < V; ++t) l[t] = fma_rn(ca, l[t], mul_rn(cb, x[t]));
      Vec<T>::store(L + q * V, l);
    }
    tail = nv * V;
  }
  for (int64_t i = tail + t0; i < numel; i += stride) L[i] = fma_rn(ca, L[i], mul_rn(cb, B[i]));
}

template <typename T>
cudaError_t running_average_impl(T* L, const T* B, int64_t numel, int* flag, const T* a_dev, double a_host,
                                 const T* b_dev, double b_host, int* status, cudaStream_t stream) {
  constexpr int V = Vec<T>::kLanes;
  constexpr int64_t kMaxBlocks = 4096;
  cudaError_t err = cudaMemsetAsync(flag, 0, sizeof(int), stream);
  if (err != cudaSuccess) return err;
  const bool vec_b = dev::aligned16(B);
  const bool vec_lb = vec_b && dev::aligned16(L);
  const int64_t blocks = std::min(kMaxBlocks, std::max<int64_t>(1, ceil_div(ceil_div(numel, V), kThreads)));
  if (numel > 0) ra_check_kernel<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(B, numel, vec_b, flag);
  // With numel == 0 the update kernel still runs: it checks device coefficients.
  ra_update_kernel<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(L, B, numel, vec_lb, flag, a_dev,
                                                                           a_host, b_dev, b_host, status);
  return cudaGetLastError();
}

}  // namespace

size_t sherman_morrison_workspace_bytes(int64_t n, int64_t d, size_t elem_size) {
  if (n <= 0 || d <= 0) return 16;
  return SmLayout(n, d, elem_size).total();
}

cudaError_t sherman_morrison(float* A, const float* g, int64_t n, int64_t d, void* workspace,
                             const float* a_dev, double a_host, const float* b_dev, double b_host,
                             int* status, cudaStream_t stream) {
  return sherman_morrison_impl<float>(A, g, n, d, workspace, a_dev, a_host, b_dev, b_host, status, stream);
}
cudaError_t sherman_morrison(double* A, const double* g, int64_t n, int64_t d, void* workspace,
                             const double* a_dev, double a_host, const double* b_dev, double b_host,
                             int* status, cudaStream_t stream) {
  return sherman_morrison_impl<double>(A, g, n, d, workspace, a_dev, a_host, b_dev, b_host, status, stream);
}

cudaError_t symmetrize(float* A, int64_t n, int64_t d, cudaStream_t stream) {
  return symmetrize_impl<float>(A, n, d, stream);
}
cudaError_t symmetrize(double* A, int64_t n, int64_t d, cudaStream_t stream) {
  return symmetrize_impl<double>(A, n, d, stream);
}

cudaError_t running_average(float* L, const float* B, int64_t numel, int* flag, const float* a_dev,
                            double a_host, const float* b_dev, double b_host, int* status,
                            cudaStream_t stream) {
  return running_average_impl<float>(L, B, numel, flag, a_dev, a_host, b_dev, b_host, status, stream);
}
cudaError_t running_average(double* L, const double* B, int64_t numel, int* flag, const double* a_dev,
                            double a_host, const double* b_dev, double b_host, int* status,
                            cudaStream_t stream) {
  return running_average_impl<double>(L, B, numel, flag, a_dev, a_host, b_dev, b_host, status, stream);
}

}  // namespace nhgd::cuda
