// Pairwise cosine distances between the rows of v [M, D], written as float64 [M, M].
//
// The rows are normalised in float64 and packed tile by tile: tile t holds rows 8t..8t+7 as
// [D][8] (zero rows pad M up to a multiple of 8). A tile pair (ti <= tj) is an 8 x 8 block of dot
// products, accumulated over k with a broadcast of the i-tile's column k times the j-tile's
// column k (both contiguous, so the loop vectorises and the accumulators stay in registers). Each
// pair i < j is computed once and written to out[i][j] and out[j][i], so the result is exactly
// symmetric; the mirrored write of a tile is one 64-byte run per row. Rows are processed in blocks
// of up to 32 tiles that share a sweep over the j tiles (each j tile is read once per block,
// from L1/L2). OpenMP hands out row blocks dynamically: the upper triangle gives uneven work.
//
// At large M a fresh output costs as much as the arithmetic: the first touch of 3.2 GB (M =
// 20,000) page-faults it in, which every thread does for its own rows. Asking for transparent
// huge pages (madvise) was measured: faster on reused memory, but about 3x slower on a process's
// first large allocation (synchronous compaction and zeroing), so it is not done.
#include "common/vector_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common/ops.h"

namespace eac {
namespace {

constexpr int kT = 8;  // rows per tile (8 doubles: one 64-byte cache line, one zmm)
// Row tiles per parallel work item: as many as fit in about 256 KiB of packed rows, 4 to 32.
// More rows per block means longer runs in the mirrored writes and fewer passes over the j tiles.
inline int64_t block_tiles(int64_t d) {
  return std::clamp<int64_t>((int64_t(256) << 10) / (d * kT * int64_t(sizeof(double))), 4, 32);
}

// Normalise row `src` (length d) into column `lane` of the packed tile `dst` ([d][kT]).
// A zero row stays zero (cos 0 with everything). The sum of squares is rescaled by the largest
// magnitude when it would overflow or underflow.
template <typename T>
void normalise_row(const T* src, int64_t d, double* dst, int lane) {
  double ss = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double x = static_cast<double>(src[k]);
    ss += x * x;
  }
  if (ss == 0.0 ||
      !(ss >= std::numeric_limits<double>::min() && ss <= std::numeric_limits<double>::max())) {
    double amax = 0.0;
    for (int64_t k = 0; k < d; ++k) amax = std::max(amax, std::abs(static_cast<double>(src[k])));
    if (amax == 0.0) return;  // a zero row
    ss = 0.0;
    for (int64_t k = 0; k < d; ++k) {
      const double x = static_cast<double>(src[k]) / amax;
      ss += x * x;
    }
    const double inv = 1.0 / std::sqrt(ss);
    for (int64_t k = 0; k < d; ++k) dst[k * kT + lane] = static_cast<double>(src[k]) / amax * inv;
    return;
  }
  const double inv = 1.0 / std::sqrt(ss);
  for (int64_t k = 0; k < d; ++k) dst[k * kT + lane] = static_cast<double>(src[k]) * inv;
}

// acc[r][c] = sum_k a[k][r] * b[k][c] for two packed tiles a, b ([d][kT]).
inline void tile_dot(const double* __restrict a, const double* __restrict b, int64_t d,
                     double (&acc)[kT][kT]) {
  double s[kT][kT] = {};
  for (int64_t k = 0; k < d; ++k) {
    const double* ak = a + k * kT;
    const double* bk = b + k * kT;
    for (int r = 0; r < kT; ++r) {
      const double ar = ak[r];
#pragma omp simd
      for (int c = 0; c < kT; ++c) s[r][c] += ar * bk[c];
    }
  }
  std::memcpy(acc, s, sizeof(s));
}

// Distance from a cosine: 1 - c (or 1 - |c|), clamped at 0 against rounding.
inline double to_distance(double c, bool absolute) {
  const double dist = 1.0 - (absolute ? std::abs(c) : c);
  return dist > 0.0 ? dist : 0.0;
}

// Write the tile (ti, tj) of distances: out[i][j] and out[j][i] for i in tile ti, j in tile tj,
// i < j < m (and out[i][i] = 0 on a diagonal tile).
inline void store_tile(const double (&acc)[kT][kT], int64_t ti, int64_t tj, int64_t m,
                       bool absolute, double* __restrict out) {
  const int64_t i0 = ti * kT, j0 = tj * kT;
  double dist[kT][kT];
  for (int r = 0; r < kT; ++r) {
#pragma omp simd
    for (int c = 0; c < kT; ++c) dist[r][c] = to_distance(acc[r][c], absolute);
  }
  if (ti != tj && j0 + kT <= m) {  // a full off-diagonal tile (j0 > i0, so i0 + kT <= m too)
    for (int r = 0; r < kT; ++r) {
      double* dst = out + (i0 + r) * m + j0;
#pragma omp simd
      for (int c = 0; c < kT; ++c) dst[c] = dist[r][c];
    }
    for (int c = 0; c < kT; ++c) {  // the mirror image: one 64-byte run per row j
      double* dst = out + (j0 + c) * m + i0;
#pragma omp simd
      for (int r = 0; r < kT; ++r) dst[r] = dist[r][c];
    }
    return;
  }
  const int rmax = static_cast<int>(std::min<int64_t>(kT, m - i0));
  const int cmax = static_cast<int>(std::min<int64_t>(kT, m - j0));
  for (int r = 0; r < rmax; ++r) {
    const int c0 = ti == tj ? r + 1 : 0;  // diagonal tile: strictly above the diagonal
    for (int c = c0; c < cmax; ++c) {
      out[(i0 + r) * m + j0 + c] = dist[r][c];
      out[(j0 + c) * m + i0 + r] = dist[r][c];
    }
    if (ti == tj) out[(i0 + r) * m + i0 + r] = 0.0;
  }
}

template <typename T>
void cosine_impl(const T* v, int64_t m, int64_t d, bool absolute, double* out) {
  const int64_t n_tiles = (m + kT - 1) / kT;
  const int64_t tile_len = d * kT;
  std::vector<double> packed(static_cast<size_t>(n_tiles * tile_len), 0.0);
  double* pk = packed.data();

#pragma omp parallel num_threads(kernel_threads())
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i)
      normalise_row(v + i * d, d, pk + (i / kT) * tile_len, static_cast<int>(i % kT));

    const int64_t bt = block_tiles(d);
    const int64_t n_blocks = (n_tiles + bt - 1) / bt;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t t_begin = blk * bt;
      const int64_t t_end = std::min(n_tiles, t_begin + bt);
      double acc[kT][kT];
      for (int64_t tj = t_begin; tj < n_tiles; ++tj) {
        const double* b = pk + tj * tile_len;
        const int64_t ti_end = std::min(t_end, tj + 1);  // ti <= tj only
        for (int64_t ti = t_begin; ti < ti_end; ++ti) {
          tile_dot(pk + ti * tile_len, b, d, acc);
          store_tile(acc, ti, tj, m, absolute, out);
        }
      }
    }
  }
}

}  // namespace

void cosine_distances_cpu(const void* v, int64_t m, int64_t d, DType dtype, bool absolute,
                          double* out) {
  if (m < 0 || d < 1) throw std::invalid_argument("cosine_distances: need M >= 0 and D >= 1");
  if (m == 0) return;
  if (!v || !out) throw std::invalid_argument("cosine_distances: null pointer");
  if (dtype == DType::F64)
    cosine_impl(static_cast<const double*>(v), m, d, absolute, out);
  else
    cosine_impl(static_cast<const float*>(v), m, d, absolute, out);
}

}  // namespace eac
