// Fused forward / forward + MSE + backward of an ensemble of N small MLPs on the GPU.
//
// Same semantics as csrc/cpu/mlp.cpp (loss_n = mean over B and d_out of (f_n(x) - y)^2 and its
// exact gradients), computed in T (float or double; doubles are never downcast).
//
// Work is split into items (student n, chunk c of the batch), one thread block per item. A block
// walks its chunk tile by tile (kRows rows): the tile's inputs are transposed to feature-major
// [features][kStride], and every layer's pre-activations Z and activations A stay in the block's
// buffers: shared memory when they fit (the toy and digits sizes), else a slice of the global
// workspace (the same code through generic pointers). The backward pass accumulates the item's
// weight gradients into its own slice of the workspace ([items][P], no atomics: each gradient
// entry is owned by one thread of the block); a second kernel sums the chunks of each student in
// chunk order. The chunk partition depends on the shapes, the dtype and the device's shared
// memory only, so two calls give bitwise equal results.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/activations.h"
#include "common/ops.h"
#include "cuda/common.cuh"

namespace eac {
namespace {

using cuda::kThreads;

// Rows of the batch per tile: one warp's worth, so a warp computing one output unit reads 32
// consecutive rows of a feature.
constexpr int kRows = 32;
// Row stride of the [features][kStride] tile buffers: one padding element makes the stride odd,
// so the threads of a warp reading one row element of 32 different features (weight-gradient
// loop) hit 32 different shared-memory banks.
constexpr int kStride = kRows + 1;
// At most this many chunks (blocks) per student: enough blocks to fill a GPU at N = 20 while
// keeping the partial-gradient reduction (n_chunks reads per gradient entry) cheap.
constexpr int64_t kMaxChunks = 64;
// Cap on the workspace of one call: fewer chunks when the partial gradients (and global tile
// buffers) of all blocks would take more than this.
constexpr size_t kWorkspaceBudget = size_t(256) << 20;
// Sections of the workspace start on this boundary (the alignment cudaMalloc guarantees).
constexpr size_t kAlign = 256;
// Shared memory (static + dynamic) a block may use without opting in (cudaFuncSetAttribute).
constexpr size_t kDefaultSmem = 48 << 10;
// The kernels' static shared memory: the loss reduction buffer.
constexpr size_t kStaticSmem = sizeof(double) * kThreads;

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Kernel arguments, passed by value (well below the 4 KiB parameter limit).
template <typename T>
struct Args {
  int n_students;
  int n_linear;
  int widths[kMaxLinearLayers + 1];
  int64_t batch;
  int64_t n_tiles, tiles_per_chunk, n_chunks;
  const T* w[kMaxLinearLayers];  // [N, out, in]
  const T* b[kMaxLinearLayers];  // [N, out]
  const T* x;                    // [B, d_in]
  const T* y;                    // [B, d_out]
  T* out;                        // [N, B, d_out] (forward)
  // Offsets (elements) of the tile buffers inside a block's scratch, each [width][kStride].
  int64_t off_a[kMaxLinearLayers];  // A[0] = input tile, A[l] = act(Z[l - 1]) for hidden l
  int64_t off_z[kMaxLinearLayers];
  int64_t off_d0, off_d1;
  int64_t scratch;  // elements of T per block
  int64_t off_g;    // version 2: offset (elements) of the block's gradient sums [P] in shared memory
  T* gscratch;      // [items][scratch] in global memory, or nullptr: use shared memory
  // Gradient partials: [items][P], one student's gradient flattened layer by layer (w then b).
  T* part;
  double* ploss;  // [items]
  int64_t P;
  int64_t off_w[kMaxLinearLayers], off_b[kMaxLinearLayers];
  T scale;  // 2 / (B * d_out)
};

// Host-side plan of one call: buffer layout, chunking and workspace layout.
template <typename T>
struct Plan {
  Args<T> a{};
  bool use_shared = false;
  size_t smem_bytes = 0;  // dynamic shared memory per block
  // Version 2 runs when the tile buffers and (with gradients) the block's gradient sums fit in
  // shared memory together; it needs smem_bytes_v2 of dynamic shared memory.
  bool v2 = false;
  size_t smem_bytes_v2 = 0;
  int64_t items = 0;
  size_t part_off = 0, ploss_off = 0, gscratch_off = 0, total = 0;
};

inline int max_optin_smem(int device) {
  int v = 0;
  cuda::check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
              "cudaDeviceGetAttribute");
  return v;
}

template <typename T>
Plan<T> make_plan(const MlpParams& p, bool grad) {
  Plan<T> pl;
  Args<T>& a = pl.a;
  const int L = p.n_linear;
  if (L < 1 || L > kMaxLinearLayers) throw std::invalid_argument("mlp (cuda): bad layer count");
  a.n_students = p.n_students;
  a.n_linear = L;
  for (int l = 0; l <= L; ++l) a.widths[l] = p.widths[l];
  a.batch = p.batch;
  // The kernels index one layer's weights and one tile buffer with int.
  for (int l = 0; l < L; ++l)
    if (int64_t(p.widths[l]) * p.widths[l + 1] > 0x7fffffff)
      throw std::invalid_argument("mlp (cuda): a layer has more than 2^31 - 1 weights");
  // Tile buffers.
  int64_t cur = int64_t(p.widths[0]) * kStride;
  a.off_a[0] = 0;
  for (int l = 0; l < L; ++l) {
    a.off_z[l] = cur;
    cur += int64_t(p.widths[l + 1]) * kStride;
    if (l + 1 < L) {
      a.off_a[l + 1] = cur;
      cur += int64_t(p.widths[l + 1]) * kStride;
    }
  }
  if (grad) {
    int64_t maxd = 0;
    for (int l = 1; l <= L; ++l) maxd = std::max<int64_t>(maxd, p.widths[l]);
    a.off_d0 = cur;
    cur += maxd * kStride;
    a.off_d1 = cur;
    cur += maxd * kStride;
  }
  a.scratch = cur;
  const size_t scratch_bytes = size_t(cur) * sizeof(T);
  const size_t static_smem = kStaticSmem;
  pl.use_shared = scratch_bytes + static_smem <= size_t(max_optin_smem(p.device));
  pl.smem_bytes = pl.use_shared ? scratch_bytes : 0;
  // Gradient layout.
  a.P = 0;
  for (int l = 0; l < L; ++l) {
    a.off_w[l] = a.P;
    a.P += int64_t(p.widths[l + 1]) * p.widths[l];
    a.off_b[l] = a.P;
    a.P += p.widths[l + 1];
  }
  {
    const size_t grad_bytes = grad ? size_t(a.P) * sizeof(T) : 0;
    const size_t g_off = align_up(scratch_bytes);
    a.off_g = int64_t(g_off / sizeof(T));
    pl.smem_bytes_v2 = g_off + grad_bytes;
    pl.v2 = cuda_kernel_version() >= 2 &&
            pl.smem_bytes_v2 + static_smem <= size_t(max_optin_smem(p.device));
  }
  // Chunking.
  const int64_t B = p.batch;
  a.n_tiles = (B + kRows - 1) / kRows;
  int64_t chunks = std::max<int64_t>(1, std::min(kMaxChunks, a.n_tiles));
  const size_t per_item = (grad ? size_t(a.P) * sizeof(T) + sizeof(double) : 0) +
                          (pl.use_shared ? 0 : scratch_bytes);
  if (per_item > 0) {
    const size_t fit = kWorkspaceBudget / (size_t(p.n_students) * per_item);
    chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, int64_t(fit)));
  }
  a.tiles_per_chunk = a.n_tiles > 0 ? (a.n_tiles + chunks - 1) / chunks : 1;
  a.n_chunks = a.n_tiles > 0 ? (a.n_tiles + a.tiles_per_chunk - 1) / a.tiles_per_chunk : 0;
  pl.items = int64_t(p.n_students) * a.n_chunks;
  if (pl.items > int64_t(0x7fffffff)) throw std::invalid_argument("mlp (cuda): too many students");
  // Workspace layout.
  size_t off = 0;
  if (grad) {
    pl.part_off = off;
    off = align_up(off + size_t(pl.items) * size_t(a.P) * sizeof(T));
    pl.ploss_off = off;
    off = align_up(off + size_t(pl.items) * sizeof(double));
  }
  if (!pl.use_shared) {
    pl.gscratch_off = off;
    off = align_up(off + size_t(pl.items) * scratch_bytes);
  }
  pl.total = off;
  a.scale = T(2) / (T(B > 0 ? B : 1) * T(p.widths[L]));
  return pl;
}

// One block = one (student, chunk) item; see the file comment.
template <typename T, Act A, bool kGrad>
__global__ void __launch_bounds__(kThreads) mlp_kernel(const Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[kThreads];
  const int tid = threadIdx.x;
  const int64_t item = blockIdx.x;
  const int n = int(item / a.n_chunks);
  const int64_t c = item % a.n_chunks;
  const int L = a.n_linear;
  const int64_t B = a.batch;
  const int d_in = a.widths[0], d_out = a.widths[L];
  T* buf = a.gscratch ? a.gscratch + item * a.scratch : reinterpret_cast<T*>(smem_raw);

  T* g = nullptr;
  if (kGrad) {
    g = a.part + item * a.P;
    for (int64_t k = tid; k < a.P; k += blockDim.x) g[k] = T(0);
  }
  double loss_acc = 0.0;

  const int64_t t_end =
      (c + 1) * a.tiles_per_chunk < a.n_tiles ? (c + 1) * a.tiles_per_chunk : a.n_tiles;
  for (int64_t tile = c * a.tiles_per_chunk; tile < t_end; ++tile) {
    const int64_t row0 = tile * kRows;
    const int tb = B - row0 < kRows ? int(B - row0) : kRows;
    __syncthreads();  // the previous tile (and the zeroing above) is done with the buffers
    // Input tile, [d_in][kStride], zero rows beyond the batch. Coalesced reads of x rows.
    {
      T* a0 = buf + a.off_a[0];
      for (int idx = tid; idx < d_in * kRows; idx += blockDim.x) {
        const int t = idx / d_in, i = idx % d_in;
        a0[i * kStride + t] = t < tb ? a.x[(row0 + t) * d_in + i] : T(0);
      }
    }
    __syncthreads();
    // Forward: z[o][t] = b[o] + sum_i W[o][i] a[i][t]; a warp shares o (W broadcast).
    for (int l = 0; l < L; ++l) {
      const int in = a.widths[l], out = a.widths[l + 1];
      const T* W = a.w[l] + int64_t(n) * out * in;
      const T* bb = a.b[l] + int64_t(n) * out;
      const T* al = buf + a.off_a[l];
      T* zl = buf + a.off_z[l];
      const bool hidden = l + 1 < L;
      T* an = hidden ? buf + a.off_a[l + 1] : nullptr;
      for (int idx = tid; idx < out * kRows; idx += blockDim.x) {
        const int o = idx / kRows, t = idx % kRows;
        const T* wo = W + int64_t(o) * in;
        T z = bb[o];
        for (int i = 0; i < in; ++i) z += wo[i] * al[i * kStride + t];
        zl[o * kStride + t] = z;
        if (hidden) an[o * kStride + t] = ActOp<A, T>::f(z);
        if (!kGrad && !hidden && t < tb) a.out[(int64_t(n) * B + row0 + t) * d_out + o] = z;
      }
      __syncthreads();
    }
    if (!kGrad) continue;
    // Output error: delta = scale * (f - y) on the tb real rows, 0 on the padding.
    {
      const T* zl = buf + a.off_z[L - 1];
      T* d = buf + a.off_d0;
      for (int idx = tid; idx < d_out * kRows; idx += blockDim.x) {
        const int j = idx / kRows, t = idx % kRows;
        const T r = t < tb ? zl[j * kStride + t] - a.y[(row0 + t) * d_out + j] : T(0);
        d[j * kStride + t] = a.scale * r;
        loss_acc += double(r) * double(r);
      }
    }
    __syncthreads();
    // Backward.
    T* dcur = buf + a.off_d0;
    T* dnext = buf + a.off_d1;
    for (int l = L - 1; l >= 0; --l) {
      const int in = a.widths[l], out = a.widths[l + 1];
      const T* al = buf + a.off_a[l];
      // gw[o][i] += sum_t d[o][t] a[i][t]; each entry owned by one thread (fixed mapping).
      T* gw = g + a.off_w[l];
      for (int idx = tid; idx < out * in; idx += blockDim.x) {
        const int o = idx / in, i = idx % in;
        const T* dr = dcur + o * kStride;
        const T* ar = al + i * kStride;
        T s = T(0);
        for (int t = 0; t < tb; ++t) s += dr[t] * ar[t];
        gw[idx] += s;
      }
      T* gb = g + a.off_b[l];
      for (int o = tid; o < out; o += blockDim.x) {
        const T* dr = dcur + o * kStride;
        T s = T(0);
        for (int t = 0; t < tb; ++t) s += dr[t];
        gb[o] += s;
      }
      if (l > 0) {
        // dprev[i][t] = (sum_o W[o][i] d[o][t]) * act'(z[i][t], a[i][t])
        const T* W = a.w[l] + int64_t(n) * out * in;
        const T* zp = buf + a.off_z[l - 1];
        for (int idx = tid; idx < in * kRows; idx += blockDim.x) {
          const int i = idx / kRows, t = idx % kRows;
          T s = T(0);
          if (t < tb) {
            for (int o = 0; o < out; ++o) s += W[int64_t(o) * in + i] * dcur[o * kStride + t];
            s *= ActOp<A, T>::df(zp[i * kStride + t], al[i * kStride + t]);
          }
          dnext[i * kStride + t] = s;
        }
        T* tmp = dcur;
        dcur = dnext;
        dnext = tmp;
      }
      __syncthreads();
    }
  }
  if (!kGrad) return;
  // The block's loss, summed in a fixed tree order.
  red[tid] = loss_acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  if (tid == 0) a.ploss[item] = red[0];
}

// ---- version 2: register-tiled phases, gradient sums in shared memory ----------------------
//
// Same items, tiles and buffers as mlp_kernel, and the same sums in the same order (each output,
// gradient entry and back-propagated error is summed over the same index in the same sequence),
// but each thread computes a small tile of outputs, so one shared-memory read feeds several
// FMAs, and the block's gradient sums stay in shared memory across its tiles (written to the
// workspace once, at the end, instead of a global read-modify-write per tile).
//
// Mappings (u = a thread's work unit, looped with stride blockDim.x):
// - forward / back-propagation: MO outputs (or MI inputs) x MT rows; rows t = tg + TG j with
//   TG = kRows / MT, so the lanes of a warp read consecutive rows of a feature (distinct banks);
//   outputs o = og + OG k (strided), so a warp reads few distinct weights (broadcasts).
// - weight gradient: MO x MI entries, o = og + OG k and i = ig + IG k (strided), so the lanes of
//   a warp read rows of distinct features (distinct banks thanks to the odd kStride).

template <typename T, Act A, int MO, int MT, bool kGrad>
__device__ __forceinline__ void v2_forward(const Args<T>& a, int l, int n, int64_t row0, int tb,
                                           T* buf) {
  constexpr int TG = kRows / MT;
  const int in = a.widths[l], out = a.widths[l + 1];
  const int L = a.n_linear;
  const T* __restrict W = a.w[l] + int64_t(n) * out * in;
  const T* __restrict bb = a.b[l] + int64_t(n) * out;
  const T* al = buf + a.off_a[l];
  T* zl = buf + a.off_z[l];
  const bool hidden = l + 1 < L;
  T* an = hidden ? buf + a.off_a[l + 1] : nullptr;
  const int OG = (out + MO - 1) / MO;
  for (int u = threadIdx.x; u < OG * TG; u += blockDim.x) {
    const int og = u / TG, tg = u % TG;
    T acc[MO][MT];
#pragma unroll
    for (int k = 0; k < MO; ++k) {
      const int o = og + OG * k;
      const T bv = o < out ? bb[o] : T(0);
#pragma unroll
      for (int j = 0; j < MT; ++j) acc[k][j] = bv;
    }
    for (int i = 0; i < in; ++i) {
      T av[MT], wv[MO];
#pragma unroll
      for (int j = 0; j < MT; ++j) av[j] = al[i * kStride + tg + TG * j];
#pragma unroll
      for (int k = 0; k < MO; ++k) {
        const int o = og + OG * k;
        wv[k] = o < out ? W[int64_t(o) * in + i] : T(0);
      }
#pragma unroll
      for (int k = 0; k < MO; ++k)
#pragma unroll
        for (int j = 0; j < MT; ++j) acc[k][j] += wv[k] * av[j];
    }
#pragma unroll
    for (int k = 0; k < MO; ++k) {
      const int o = og + OG * k;
      if (o >= out) continue;
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const int t = tg + TG * j;
        zl[o * kStride + t] = acc[k][j];
        if (hidden) an[o * kStride + t] = ActOp<A, T>::f(acc[k][j]);
        if (!kGrad && !hidden && t < tb)
          a.out[(int64_t(n) * a.batch + row0 + t) * out + o] = acc[k][j];
      }
    }
  }
}

// gw[o][i] += sum_{t < tb} d[o][t] a[i][t] (gw in shared memory, [out][in]).
template <typename T, int MO, int MI>
__device__ __forceinline__ void v2_weight_grad(const T* d, const T* al, int in, int out, int tb,
                                               T* gw) {
  const int OG = (out + MO - 1) / MO, IG = (in + MI - 1) / MI;
  for (int u = threadIdx.x; u < OG * IG; u += blockDim.x) {
    const int og = u / IG, ig = u % IG;
    // Rows of features beyond the layer are clamped to its last one (in bounds; never summed).
    const T* dr[MO];
    const T* ar[MI];
#pragma unroll
    for (int k = 0; k < MO; ++k) dr[k] = d + min(og + OG * k, out - 1) * kStride;
#pragma unroll
    for (int k = 0; k < MI; ++k) ar[k] = al + min(ig + IG * k, in - 1) * kStride;
    T acc[MO][MI];
#pragma unroll
    for (int k = 0; k < MO; ++k)
#pragma unroll
      for (int q = 0; q < MI; ++q) acc[k][q] = T(0);
    for (int t = 0; t < tb; ++t) {
      T dv[MO], av[MI];
#pragma unroll
      for (int k = 0; k < MO; ++k) dv[k] = dr[k][t];
#pragma unroll
      for (int q = 0; q < MI; ++q) av[q] = ar[q][t];
#pragma unroll
      for (int k = 0; k < MO; ++k)
#pragma unroll
        for (int q = 0; q < MI; ++q) acc[k][q] += dv[k] * av[q];
    }
#pragma unroll
    for (int k = 0; k < MO; ++k) {
      const int o = og + OG * k;
#pragma unroll
      for (int q = 0; q < MI; ++q) {
        const int i = ig + IG * q;
        if (o < out && i < in) gw[o * in + i] += acc[k][q];
      }
    }
  }
}

// dprev[i][t] = (sum_o W[o][i] d[o][t]) * act'(z[i][t], a[i][t]) for t < tb, 0 on the padding.
template <typename T, Act A, int MI, int MT>
__device__ __forceinline__ void v2_backprop(const T* __restrict W, const T* d, const T* zp,
                                            const T* ap, int in, int out, int tb, T* dnext) {
  constexpr int TG = kRows / MT;
  const int IG = (in + MI - 1) / MI;
  for (int u = threadIdx.x; u < IG * TG; u += blockDim.x) {
    const int ig = u / TG, tg = u % TG;
    T acc[MI][MT];
#pragma unroll
    for (int k = 0; k < MI; ++k)
#pragma unroll
      for (int j = 0; j < MT; ++j) acc[k][j] = T(0);
    for (int o = 0; o < out; ++o) {
      T dv[MT], wv[MI];
#pragma unroll
      for (int j = 0; j < MT; ++j) dv[j] = d[o * kStride + tg + TG * j];
#pragma unroll
      for (int k = 0; k < MI; ++k) {
        const int i = ig + IG * k;
        wv[k] = i < in ? W[int64_t(o) * in + i] : T(0);
      }
#pragma unroll
      for (int k = 0; k < MI; ++k)
#pragma unroll
        for (int j = 0; j < MT; ++j) acc[k][j] += wv[k] * dv[j];
    }
#pragma unroll
    for (int k = 0; k < MI; ++k) {
      const int i = ig + IG * k;
      if (i >= in) continue;
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const int t = tg + TG * j;
        dnext[i * kStride + t] =
            t < tb ? acc[k][j] * ActOp<A, T>::df(zp[i * kStride + t], ap[i * kStride + t]) : T(0);
      }
    }
  }
}

template <typename T, Act A, bool kGrad>
__global__ void __launch_bounds__(kThreads) mlp_kernel_v2(const Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[kThreads];
  const int tid = threadIdx.x;
  const int64_t item = blockIdx.x;
  const int n = int(item / a.n_chunks);
  const int64_t c = item % a.n_chunks;
  const int L = a.n_linear;
  const int64_t B = a.batch;
  const int d_in = a.widths[0], d_out = a.widths[L];
  T* buf = reinterpret_cast<T*>(smem_raw);
  T* g = kGrad ? buf + a.off_g : nullptr;
  if (kGrad)
    for (int64_t k = tid; k < a.P; k += blockDim.x) g[k] = T(0);
  double loss_acc = 0.0;

  const int64_t t_end =
      (c + 1) * a.tiles_per_chunk < a.n_tiles ? (c + 1) * a.tiles_per_chunk : a.n_tiles;
  for (int64_t tile = c * a.tiles_per_chunk; tile < t_end; ++tile) {
    const int64_t row0 = tile * kRows;
    const int tb = B - row0 < kRows ? int(B - row0) : kRows;
    __syncthreads();
    {
      T* a0 = buf + a.off_a[0];
      for (int idx = tid; idx < d_in * kRows; idx += blockDim.x) {
        const int t = idx / d_in, i = idx % d_in;
        a0[i * kStride + t] = t < tb ? a.x[(row0 + t) * d_in + i] : T(0);
      }
    }
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      if (a.widths[l + 1] >= 8)
        v2_forward<T, A, 4, 2, kGrad>(a, l, n, row0, tb, buf);
      else
        v2_forward<T, A, 1, 1, kGrad>(a, l, n, row0, tb, buf);
      __syncthreads();
    }
    if (!kGrad) continue;
    {
      const T* zl = buf + a.off_z[L - 1];
      T* d = buf + a.off_d0;
      for (int idx = tid; idx < d_out * kRows; idx += blockDim.x) {
        const int j = idx / kRows, t = idx % kRows;
        const T r = t < tb ? zl[j * kStride + t] - a.y[(row0 + t) * d_out + j] : T(0);
        d[j * kStride + t] = a.scale * r;
        loss_acc += double(r) * double(r);
      }
    }
    __syncthreads();
    T* dcur = buf + a.off_d0;
    T* dnext = buf + a.off_d1;
    for (int l = L - 1; l >= 0; --l) {
      const int in = a.widths[l], out = a.widths[l + 1];
      const T* al = buf + a.off_a[l];
      if (out >= 4 && in >= 4)
        v2_weight_grad<T, 4, 4>(dcur, al, in, out, tb, g + a.off_w[l]);
      else
        v2_weight_grad<T, 1, 1>(dcur, al, in, out, tb, g + a.off_w[l]);
      {
        T* gb = g + a.off_b[l];
        for (int o = tid; o < out; o += blockDim.x) {
          const T* dr = dcur + o * kStride;
          T s = T(0);
          for (int t = 0; t < tb; ++t) s += dr[t];
          gb[o] += s;
        }
      }
      if (l > 0) {
        const T* W = a.w[l] + int64_t(n) * out * in;
        const T* zp = buf + a.off_z[l - 1];
        if (in >= 8)
          v2_backprop<T, A, 4, 2>(W, dcur, zp, al, in, out, tb, dnext);
        else
          v2_backprop<T, A, 1, 1>(W, dcur, zp, al, in, out, tb, dnext);
        T* tmp = dcur;
        dcur = dnext;
        dnext = tmp;
      }
      __syncthreads();
    }
  }
  if (!kGrad) return;
  // The block's gradient sums to its slice of the workspace (coalesced), and its loss.
  {
    T* part = a.part + item * a.P;
    for (int64_t k = tid; k < a.P; k += blockDim.x) part[k] = g[k];
  }
  red[tid] = loss_acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  if (tid == 0) a.ploss[item] = red[0];
}

// Sums the chunks of each student, in chunk order, into the outputs.
template <typename T>
struct ReduceArgs {
  int n_students, n_linear;
  int widths[kMaxLinearLayers + 1];
  int64_t n_chunks, P;
  int64_t off_w[kMaxLinearLayers], off_b[kMaxLinearLayers];
  const T* part;
  const double* ploss;
  T* gw[kMaxLinearLayers];
  T* gb[kMaxLinearLayers];
  T* loss;
  double inv_count;  // 1 / (B * d_out)
};

template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const ReduceArgs<T> r) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t n = first; n < r.n_students; n += stride) {
    double s = 0.0;
    for (int64_t c = 0; c < r.n_chunks; ++c) s += r.ploss[n * r.n_chunks + c];
    r.loss[n] = T(s * r.inv_count);
  }
  const int64_t total = int64_t(r.n_students) * r.P;
  for (int64_t e = first; e < total; e += stride) {
    const int64_t n = e / r.P, k = e % r.P;
    const T* src = r.part + n * r.n_chunks * r.P + k;
    T s = src[0];
    for (int64_t c = 1; c < r.n_chunks; ++c) s += src[c * r.P];
    int l = 0;
    while (l + 1 < r.n_linear && k >= r.off_w[l + 1]) ++l;
    const int64_t nw = int64_t(r.widths[l + 1]) * r.widths[l], nb = r.widths[l + 1];
    if (k < r.off_b[l])
      r.gw[l][n * nw + (k - r.off_w[l])] = s;
    else
      r.gb[l][n * nb + (k - r.off_b[l])] = s;
  }
}

template <typename T, Act A, bool kGrad>
void launch(const MlpParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Plan<T> pl = make_plan<T>(p, kGrad);
  if (pl.items == 0) return;
  if (workspace_bytes < pl.total || (pl.total > 0 && !workspace))
    throw std::invalid_argument("mlp (cuda): workspace of " + std::to_string(workspace_bytes) +
                                " bytes, need " + std::to_string(pl.total));
  Args<T>& a = pl.a;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  for (int l = 0; l < p.n_linear; ++l) {
    a.w[l] = static_cast<const T*>(p.w[l]);
    a.b[l] = static_cast<const T*>(p.b[l]);
  }
  a.x = static_cast<const T*>(p.x);
  a.y = static_cast<const T*>(p.y);
  a.out = static_cast<T*>(p.out);
  a.gscratch = pl.use_shared ? nullptr : reinterpret_cast<T*>(ws + pl.gscratch_off);
  a.part = kGrad ? reinterpret_cast<T*>(ws + pl.part_off) : nullptr;
  a.ploss = kGrad ? reinterpret_cast<double*>(ws + pl.ploss_off) : nullptr;
  auto kernel = pl.v2 ? mlp_kernel_v2<T, A, kGrad> : mlp_kernel<T, A, kGrad>;
  const size_t smem = pl.v2 ? pl.smem_bytes_v2 : pl.smem_bytes;
  // The default dynamic limit is 48 KB minus the static shared memory: opt in beyond it.
  if (smem + kStaticSmem > kDefaultSmem)
    cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     int(smem)),
                "mlp (cuda): cudaFuncSetAttribute");
  kernel<<<unsigned(pl.items), kThreads, smem, stream>>>(a);
  cuda::check_launch(kGrad ? "mlp_mse_grad (cuda)" : "mlp_forward (cuda)");
  if (!kGrad) return;
  ReduceArgs<T> r{};
  r.n_students = p.n_students;
  r.n_linear = p.n_linear;
  for (int l = 0; l <= p.n_linear; ++l) r.widths[l] = p.widths[l];
  r.n_chunks = a.n_chunks;
  r.P = a.P;
  for (int l = 0; l < p.n_linear; ++l) {
    r.off_w[l] = a.off_w[l];
    r.off_b[l] = a.off_b[l];
    r.gw[l] = static_cast<T*>(p.gw[l]);
    r.gb[l] = static_cast<T*>(p.gb[l]);
  }
  r.part = a.part;
  r.ploss = a.ploss;
  r.loss = static_cast<T*>(p.loss);
  r.inv_count = 1.0 / (double(p.batch) * double(p.widths[p.n_linear]));
  reduce_kernel<T><<<cuda::blocks_for(int64_t(p.n_students) * a.P), kThreads, 0, stream>>>(r);
  cuda::check_launch("mlp_mse_grad (cuda): reduction");
}

template <typename T, bool kGrad>
void dispatch(const MlpParams& p, void* ws, size_t ws_bytes, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (static_cast<Act>(p.activation)) {
    case Act::Identity: return launch<T, Act::Identity, kGrad>(p, ws, ws_bytes, s);
    case Act::Relu: return launch<T, Act::Relu, kGrad>(p, ws, ws_bytes, s);
    case Act::LeakyRelu: return launch<T, Act::LeakyRelu, kGrad>(p, ws, ws_bytes, s);
    case Act::Tanh: return launch<T, Act::Tanh, kGrad>(p, ws, ws_bytes, s);
    case Act::Sigmoid: return launch<T, Act::Sigmoid, kGrad>(p, ws, ws_bytes, s);
    case Act::Softplus: return launch<T, Act::Softplus, kGrad>(p, ws, ws_bytes, s);
    case Act::Gelu: return launch<T, Act::Gelu, kGrad>(p, ws, ws_bytes, s);
    case Act::Silu: return launch<T, Act::Silu, kGrad>(p, ws, ws_bytes, s);
    case Act::G: return launch<T, Act::G, kGrad>(p, ws, ws_bytes, s);
  }
  throw std::invalid_argument("mlp (cuda): activation code out of range");
}

size_t workspace_bytes(const MlpParams& p, bool grad) {
  cuda::DeviceGuard guard(p.device);
  return p.dtype == DType::F64 ? make_plan<double>(p, grad).total
                               : make_plan<float>(p, grad).total;
}

}  // namespace

size_t mlp_forward_cuda_workspace_bytes(const MlpParams& p) { return workspace_bytes(p, false); }

size_t mlp_mse_grad_cuda_workspace_bytes(const MlpParams& p) { return workspace_bytes(p, true); }

void mlp_forward_cuda(const MlpParams& p, void* workspace, size_t workspace_bytes,
                      void* stream) {
  if (p.batch == 0) return;
  cuda::DeviceGuard guard(p.device);
  if (p.dtype == DType::F64)
    dispatch<double, false>(p, workspace, workspace_bytes, stream);
  else
    dispatch<float, false>(p, workspace, workspace_bytes, stream);
}

void mlp_mse_grad_cuda(const MlpParams& p, void* workspace, size_t workspace_bytes,
                       void* stream) {
  if (p.batch < 1) throw std::invalid_argument("mlp_mse_grad (cuda): need a batch of >= 1");
  cuda::DeviceGuard guard(p.device);
  if (p.dtype == DType::F64)
    dispatch<double, true>(p, workspace, workspace_bytes, stream);
  else
    dispatch<float, true>(p, workspace, workspace_bytes, stream);
}

}  // namespace eac
