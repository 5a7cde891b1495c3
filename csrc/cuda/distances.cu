// Pairwise cosine distances between the rows of v [M, D] on the GPU, written as float64 [M, M].
//
// Pass 1 (one block per row): the row's norm in float64, with the CPU kernel's rescaling by the
// largest magnitude when the sum of squares would overflow or underflow; it writes a scale and
// an inverse norm per row to the workspace ([2][M] doubles), so u = v / scale * inv_norm.
// Pass 2: 64 x 64 tiles of dot products of normalised rows, accumulated in float64 through shared
// memory (kK columns at a time, each thread 4 x 4 outputs). Only tiles on or above the diagonal are
// computed; each pair i < j is computed once and written to out[i][j] and out[j][i], so the result
// is exactly symmetric, with 0 on the diagonal and distances clamped at 0.
#include <cfloat>
#include <cstdint>
#include <stdexcept>

#include "common/ops.h"
#include "cuda/common.cuh"

namespace eac {
namespace {

using cuda::kThreads;

constexpr int kTile = 64;           // rows (and columns) of an output tile
constexpr int kK = 16;              // columns of v per shared-memory step
constexpr int kSub = 16;            // the block is kSub x kSub threads, each kPer x kPer outputs
constexpr int kPer = kTile / kSub;  // outputs per thread along each axis (4)
static_assert(kSub * kSub == kThreads, "one thread per (row, column) pair of the sub-grid");

__device__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

__device__ double block_max(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = fmax(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

// norms[0][i] = scale, norms[1][i] = 1 / ||v_i / scale|| (0 for a zero row).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    norms_kernel(const T* __restrict v, int64_t m, int64_t d, double* __restrict norms) {
  __shared__ double red[kThreads];
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const T* row = v + i * d;
    double ss = 0.0;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const double x = double(row[k]);
      ss += x * x;
    }
    ss = block_sum(ss, red);
    double scale = 1.0, inv = 0.0;
    if (ss >= DBL_MIN && ss <= DBL_MAX) {
      inv = 1.0 / sqrt(ss);
    } else {
      double amax = 0.0;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) amax = fmax(amax, fabs(double(row[k])));
      amax = block_max(amax, red);
      if (amax > 0.0) {
        double s2 = 0.0;
        for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
          const double x = double(row[k]) / amax;
          s2 += x * x;
        }
        s2 = block_sum(s2, red);
        scale = amax;
        inv = 1.0 / sqrt(s2);
      }
    }
    if (threadIdx.x == 0) {
      norms[i] = scale;
      norms[m + i] = inv;
    }
  }
}

// Pass 2 (cosine_kernel): each thread's 4 x 4 outputs are rows ty + 16 r and columns tx + 16 c,
// so each k step reads 8 doubles from shared memory for 16 FMAs. The rows' normalisation factors
// are staged in shared memory once per tile; load_tile computes u = v * inv when the row needed
// no rescaling (scale 1, bitwise the same as v / scale * inv), else v / scale * inv.

template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict v, int64_t m, int64_t d, int64_t r0,
                                          int64_t k0, const double* sc, const double* inv,
                                          double (*s)[kTile + 1]) {
  for (int idx = threadIdx.x; idx < kTile * kK; idx += blockDim.x) {
    const int r = idx / kK, k = idx % kK;  // consecutive threads read consecutive columns
    const int64_t row = r0 + r, col = k0 + k;
    double u = 0.0;
    if (row < m && col < d) {
      const double x = double(v[row * d + col]);
      u = sc[r] == 1.0 ? x * inv[r] : x / sc[r] * inv[r];
    }
    s[k][r] = u;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cosine_kernel(const T* __restrict v, int64_t m, int64_t d, const double* __restrict norms,
                  bool absolute, double* __restrict out) {
  __shared__ double sa[kK][kTile + 1];
  __shared__ double sb[kK][kTile + 1];
  __shared__ double fa[2][kTile], fb[2][kTile];  // scale, inverse norm of the tiles' rows
  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t n_tiles = (m + kTile - 1) / kTile;
  const int64_t tj = blockIdx.x;
  for (int64_t ti = blockIdx.y; ti <= tj && ti < n_tiles; ti += gridDim.y) {
    const int64_t i0 = ti * kTile, j0 = tj * kTile;
    __syncthreads();  // the previous tile is done with fa, fb
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
      const int64_t i = i0 + r, j = j0 + r;
      fa[0][r] = i < m ? norms[i] : 1.0;
      fa[1][r] = i < m ? norms[m + i] : 0.0;
      fb[0][r] = j < m ? norms[j] : 1.0;
      fb[1][r] = j < m ? norms[m + j] : 0.0;
    }
    double acc[kPer][kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r)
#pragma unroll
      for (int c = 0; c < kPer; ++c) acc[r][c] = 0.0;
    for (int64_t k0 = 0; k0 < d; k0 += kK) {
      __syncthreads();  // fa, fb written; the previous step is done with sa, sb
      load_tile(v, m, d, i0, k0, fa[0], fa[1], sa);
      load_tile(v, m, d, j0, k0, fb[0], fb[1], sb);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        double x[kPer], y[kPer];
#pragma unroll
        for (int r = 0; r < kPer; ++r) x[r] = sa[k][ty + kSub * r];
#pragma unroll
        for (int c = 0; c < kPer; ++c) y[c] = sb[k][tx + kSub * c];
#pragma unroll
        for (int r = 0; r < kPer; ++r)
#pragma unroll
          for (int c = 0; c < kPer; ++c) acc[r][c] += x[r] * y[c];
      }
    }
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int64_t i = i0 + ty + kSub * r;
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        const int64_t j = j0 + tx + kSub * c;
        if (i >= m || j >= m || i > j) continue;
        if (i == j) {
          out[i * m + i] = 0.0;
          continue;
        }
        double dist = 1.0 - (absolute ? fabs(acc[r][c]) : acc[r][c]);
        dist = dist > 0.0 ? dist : 0.0;
        out[i * m + j] = dist;
        out[j * m + i] = dist;
      }
    }
  }
}

template <typename T>
void cosine_impl(const T* v, int64_t m, int64_t d, bool absolute, double* out, double* norms,
                 cudaStream_t stream) {
  const int rows_grid = int(m < cuda::kMaxGridX ? m : cuda::kMaxGridX);
  norms_kernel<T><<<rows_grid, kThreads, 0, stream>>>(v, m, d, norms);
  cuda::check_launch("cosine_distances (cuda): norms");
  const int64_t n_tiles = (m + kTile - 1) / kTile;
  if (n_tiles > 0x7fffffff) throw std::invalid_argument("cosine_distances (cuda): M too large");
  // grid.x: the column tile; grid.y: row tiles, strided to respect the grid.y limit.
  const dim3 grid(unsigned(n_tiles),
                  unsigned(n_tiles < cuda::kMaxGridY ? n_tiles : cuda::kMaxGridY));
  cosine_kernel<T><<<grid, kThreads, 0, stream>>>(v, m, d, norms, absolute, out);
  cuda::check_launch("cosine_distances (cuda)");
}

}  // namespace

void cosine_distances_cuda(const void* v, int64_t m, int64_t d, DType dtype, bool absolute,
                           double* out, void* workspace, int device, void* stream) {
  if (m < 0 || d < 1) throw std::invalid_argument("cosine_distances: need M >= 0 and D >= 1");
  if (m == 0) return;
  if (!v || !out || !workspace) throw std::invalid_argument("cosine_distances: null pointer");
  cuda::DeviceGuard guard(device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  double* norms = static_cast<double*>(workspace);
  if (dtype == DType::F64)
    cosine_impl(static_cast<const double*>(v), m, d, absolute, out, norms, s);
  else
    cosine_impl(static_cast<const float*>(v), m, d, absolute, out, norms, s);
}

}  // namespace eac
