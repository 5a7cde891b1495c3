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
// weight gradients (no atomics: each gradient entry is owned by one thread of the block) and
// writes them to its own slice of the workspace ([items][P]); a second kernel (reduce_kernel)
// sums the chunks of each student in chunk order. The kernel and the chunk partition depend on
// the shapes, the dtype and the device's shared memory only, so two calls give bitwise equal
// results.
//
// The kernel is chosen per call (make_plan), the first that applies:
// - mlp_thin_width_kernel (gradients only): one hidden layer with d_in <= 16, width <= 256 and
//   d_out <= 4, its buffers in shared memory; one thread per hidden neuron, which keeps the
//   neuron's weights and gradient sums in registers. Its own tiles and chunks.
// - mlp_tiled_kernel: the tile buffers and (with gradients) the block's gradient sums fit in
//   shared memory together; each thread computes a small register tile of outputs.
// - mlp_generic_kernel: any shape; one output per thread at a time, the gradient sums in the
//   workspace, the tile buffers in shared memory or the workspace.
// The thin-width kernel comes in two variants (set_cuda_thin_kernel_variant, common/ops.h): 0,
// the default, one kernel for every output count up to 4, tested at run time; 1, a kernel
// compiled for each output count with leaner tile loads. They load the same values and compute
// every sum with the same terms in the same order, so their results are bitwise equal.
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
// The generic and tiled kernels' static shared memory: the loss reduction buffer.
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
  int64_t off_g;    // tiled kernel: offset (elements) of the gradient sums [P] in shared memory
  T* gscratch;      // [items][scratch] in global memory, or nullptr: use shared memory
  // Gradient partials: [items][P], one student's gradient flattened layer by layer (w then b).
  T* part;
  double* ploss;  // [items]
  int64_t P;
  int64_t off_w[kMaxLinearLayers], off_b[kMaxLinearLayers];
  T scale;  // 2 / (B * d_out)
};

// Host-side plan of one call: kernel, buffer layout, chunking and workspace layout.
template <typename T>
struct Plan {
  Args<T> a{};
  // Generic kernel: tile buffers in shared memory (smem_bytes of dynamic shared memory) or not.
  bool use_shared = false;
  size_t smem_bytes = 0;
  // Tiled kernel: runs when the tile buffers and (with gradients) the block's gradient sums fit in
  // shared memory together; it needs smem_bytes_tiled of dynamic shared memory.
  bool tiled = false;
  size_t smem_bytes_tiled = 0;
  // Thin-width kernel (gradients of one-hidden-layer thin students): its own tiles and chunks,
  // thin_threads threads per block, smem_bytes_thin of dynamic shared memory.
  bool thin = false;
  size_t smem_bytes_thin = 0;
  int thin_threads = 0;
  int64_t items = 0;
  size_t part_off = 0, ploss_off = 0, gscratch_off = 0, total = 0;
};

inline int max_optin_smem(int device) {
  int v = 0;
  cuda::check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
              "cudaDeviceGetAttribute");
  return v;
}

// Sizes of the thin-width kernel (mlp_thin_width_kernel, described below).
// Rows per tile (three barriers per tile).
constexpr int kThinRows = 32;
constexpr int kThinMaxIn = 16;
constexpr int kThinMaxOut = 4;
constexpr int kThinMaxWidth = 256;  // threads per block = width rounded up to whole warps
// Its static shared memory (per-thread losses, output-bias sums per unit).
constexpr size_t kThinStaticSmem = sizeof(double) * (kThinMaxWidth + kThinMaxOut * kThinRows);
// Chunks per student: about max(kThinTargetBlocks, kThinTargetWarps / warps per block) blocks over
// all students, whatever the GPU (the partition must not depend on the device, so that results
// are the same on every GPU). One-warp blocks (widths up to 32) get more of them: a target of
// 1,024 (900 blocks at 2-20-1 with 20 students) leaves an H100's 132 SMs at about 7 resident
// warps each, latency bound.
constexpr int64_t kThinTargetBlocks = 1024;
constexpr int64_t kThinTargetWarps = 2048;

inline bool thin_applies(const MlpParams& p) {
  return p.n_linear == 2 && p.widths[0] <= kThinMaxIn && p.widths[1] <= kThinMaxWidth &&
         p.widths[2] <= kThinMaxOut;
}

// Inputs per row as the kernel stores them (a multiple of 4, for 16-byte vector loads).
inline int thin_d(int d_in) { return d_in <= 4 ? 4 : d_in <= 8 ? 8 : d_in <= 12 ? 12 : 16; }

inline int thin_threads(int width) { return (width + 31) / 32 * 32; }

// Threads that sum one output unit (k, t) of the thin-width kernel: G consecutive threads, G a
// power of two (at most 32, so a group lies in one warp), as many as the block's threads allow.
__host__ __device__ inline int thin_group(int n_units, int threads) {
  int G = 1;
  while (G < 32 && 2 * G * n_units <= threads) G *= 2;
  return G;
}

// Dynamic shared memory of the thin-width kernel: the input tile [kThinRows][D], the targets and
// the scaled errors [2][kThinMaxOut][kThinRows], the activations (and the pre-activations, for
// the activations whose derivative reads them) [1 or 2][kThinRows][threads] and the output
// products [d_out][kThinRows][threads + G] (rows padded by the group size G, thin_group, so that
// the groups' reads fall in distinct banks).
template <typename T>
size_t thin_smem_bytes(const MlpParams& p) {
  constexpr int TR = kThinRows;
  const size_t threads = size_t(thin_threads(p.widths[1]));
  const size_t hz = df_needs_z(static_cast<Act>(p.activation)) ? 2 : 1;
  const size_t G = size_t(thin_group(p.widths[2] * TR, int(threads)));
  const size_t elems = size_t(TR) * thin_d(p.widths[0]) + 2 * size_t(kThinMaxOut) * TR +
                       hz * TR * threads + size_t(p.widths[2]) * TR * (threads + G);
  return elems * sizeof(T);
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
  const size_t max_smem = size_t(max_optin_smem(p.device));
  pl.use_shared = scratch_bytes + kStaticSmem <= max_smem;
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
    pl.smem_bytes_tiled = g_off + grad_bytes;
    pl.tiled = pl.smem_bytes_tiled + kStaticSmem <= max_smem;
  }
  if (grad && thin_applies(p)) {
    const size_t smem = thin_smem_bytes<T>(p);
    if (smem + kThinStaticSmem <= max_smem) {
      pl.thin = true;
      pl.tiled = false;
      pl.use_shared = true;
      pl.smem_bytes_thin = smem;
      pl.thin_threads = thin_threads(p.widths[1]);
    }
  }
  // Chunking: chunks per student before the workspace cap.
  const int64_t B = p.batch;
  int64_t chunks;
  if (pl.thin) {
    a.n_tiles = (B + kThinRows - 1) / kThinRows;
    const int64_t target =
        std::max<int64_t>(kThinTargetBlocks, kThinTargetWarps / (pl.thin_threads / 32));
    chunks = std::max<int64_t>(1, std::min((target + p.n_students - 1) / p.n_students, a.n_tiles));
  } else {
    a.n_tiles = (B + kRows - 1) / kRows;
    chunks = std::max<int64_t>(1, std::min(kMaxChunks, a.n_tiles));
  }
  const size_t per_item =
      (grad ? size_t(a.P) * sizeof(T) + sizeof(double) : 0) + (pl.use_shared ? 0 : scratch_bytes);
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

// ---- Helpers of every kernel: the tiles of the block's item ----------------------------------

// One past the last tile of chunk c (the chunk's tiles are c * tiles_per_chunk, ..., end - 1).
template <typename T>
__device__ __forceinline__ int64_t chunk_tile_end(const Args<T>& a, int64_t c) {
  return (c + 1) * a.tiles_per_chunk < a.n_tiles ? (c + 1) * a.tiles_per_chunk : a.n_tiles;
}

// Rows of the batch in the tile of R rows that starts at row row0 (fewer than R in the last one).
template <int R>
__device__ __forceinline__ int tile_rows(int64_t batch, int64_t row0) {
  return batch - row0 < R ? int(batch - row0) : R;
}

// ---- Phases shared by the generic and the tiled kernel ---------------------------------------

// The input tile into A[0], [d_in][kStride], zero rows beyond the batch. Coalesced reads of x rows.
template <typename T>
__device__ __forceinline__ void load_input_tile(const Args<T>& a, int64_t row0, int tb, T* buf) {
  const int d_in = a.widths[0];
  T* a0 = buf + a.off_a[0];
  for (int idx = threadIdx.x; idx < d_in * kRows; idx += blockDim.x) {
    const int t = idx / d_in, i = idx % d_in;
    a0[i * kStride + t] = t < tb ? a.x[(row0 + t) * d_in + i] : T(0);
  }
}

// Layer l's operands in the forward pass of student n.
template <typename T>
struct ForwardLayer {
  int in, out;
  const T* W;   // the student's weights [out][in]
  const T* b;   // the student's biases [out]
  const T* al;  // the layer's input tile A[l], [in][kStride]
  T* zl;        // its pre-activations Z[l], [out][kStride]
  bool hidden;  // l + 1 < L
  T* an;        // A[l + 1] = act(Z[l]) for a hidden layer; nullptr for the output layer
};

template <typename T>
__device__ __forceinline__ ForwardLayer<T> forward_layer(const Args<T>& a, int l, int n, T* buf) {
  ForwardLayer<T> f;
  f.in = a.widths[l];
  f.out = a.widths[l + 1];
  f.W = a.w[l] + int64_t(n) * f.out * f.in;
  f.b = a.b[l] + int64_t(n) * f.out;
  f.al = buf + a.off_a[l];
  f.zl = buf + a.off_z[l];
  f.hidden = l + 1 < a.n_linear;
  f.an = f.hidden ? buf + a.off_a[l + 1] : nullptr;
  return f;
}

// The output error into D0: delta = scale * (f - y) on the tb real rows, 0 on the padding; the
// thread's squared residuals are added to loss_acc (in the order of its idx).
template <typename T>
__device__ __forceinline__ void output_error(const Args<T>& a, int64_t row0, int tb, T* buf,
                                             double& loss_acc) {
  const int d_out = a.widths[a.n_linear];
  const T* zl = buf + a.off_z[a.n_linear - 1];
  T* d = buf + a.off_d0;
  for (int idx = threadIdx.x; idx < d_out * kRows; idx += blockDim.x) {
    const int j = idx / kRows, t = idx % kRows;
    const T r = t < tb ? zl[j * kStride + t] - a.y[(row0 + t) * d_out + j] : T(0);
    d[j * kStride + t] = a.scale * r;
    loss_acc += double(r) * double(r);
  }
}

// gb[o] += sum_{t < tb} d[o][t].
template <typename T>
__device__ __forceinline__ void bias_grad(const T* d, int out, int tb, T* gb) {
  for (int o = threadIdx.x; o < out; o += blockDim.x) {
    const T* dr = d + o * kStride;
    T s = T(0);
    for (int t = 0; t < tb; ++t) s += dr[t];
    gb[o] += s;
  }
}

// The block's loss: the threads' loss_acc summed in a fixed tree order (red: kThreads doubles of
// shared memory), written to *dst by thread 0.
__device__ __forceinline__ void block_loss(double loss_acc, double* red, double* dst) {
  const int tid = threadIdx.x;
  red[tid] = loss_acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  if (tid == 0) *dst = red[0];
}

// ---- The generic kernel's phases: one output (or gradient entry) per thread at a time --------

// z[o][t] = b[o] + sum_i W[o][i] a[i][t]; a warp shares o (W broadcast).
template <typename T, Act A, bool kGrad>
__device__ __forceinline__ void generic_forward(const Args<T>& a, int l, int n, int64_t row0,
                                                int tb, T* buf) {
  const ForwardLayer<T> f = forward_layer(a, l, n, buf);
  for (int idx = threadIdx.x; idx < f.out * kRows; idx += blockDim.x) {
    const int o = idx / kRows, t = idx % kRows;
    const T* wo = f.W + int64_t(o) * f.in;
    T z = f.b[o];
    for (int i = 0; i < f.in; ++i) z += wo[i] * f.al[i * kStride + t];
    f.zl[o * kStride + t] = z;
    if (f.hidden) f.an[o * kStride + t] = ActOp<A, T>::f(z);
    if (!kGrad && !f.hidden && t < tb) a.out[(int64_t(n) * a.batch + row0 + t) * f.out + o] = z;
  }
}

// gw[o][i] += sum_{t < tb} d[o][t] a[i][t]; each entry owned by one thread (fixed mapping).
template <typename T>
__device__ __forceinline__ void generic_weight_grad(const T* d, const T* al, int in, int out,
                                                    int tb, T* gw) {
  for (int idx = threadIdx.x; idx < out * in; idx += blockDim.x) {
    const int o = idx / in, i = idx % in;
    const T* dr = d + o * kStride;
    const T* ar = al + i * kStride;
    T s = T(0);
    for (int t = 0; t < tb; ++t) s += dr[t] * ar[t];
    gw[idx] += s;
  }
}

// dprev[i][t] = (sum_o W[o][i] d[o][t]) * act'(z[i][t], a[i][t]) for t < tb, 0 on the padding.
template <typename T, Act A>
__device__ __forceinline__ void generic_backprop(const T* W, const T* d, const T* zp, const T* ap,
                                                 int in, int out, int tb, T* dnext) {
  for (int idx = threadIdx.x; idx < in * kRows; idx += blockDim.x) {
    const int i = idx / kRows, t = idx % kRows;
    T s = T(0);
    if (t < tb) {
      for (int o = 0; o < out; ++o) s += W[int64_t(o) * in + i] * d[o * kStride + t];
      s *= ActOp<A, T>::df(zp[i * kStride + t], ap[i * kStride + t]);
    }
    dnext[i * kStride + t] = s;
  }
}

// ---- The tiled kernel's phases: register tiles -----------------------------------------------
//
// The same sums as the generic phases, in the same order (each output, gradient entry and
// back-propagated error is summed over the same index in the same sequence), but each thread
// computes a small tile of outputs, so one shared-memory read feeds several FMAs.
//
// Mappings (u = a thread's work unit, looped with stride blockDim.x):
// - forward / back-propagation: MO outputs (or MI inputs) x MT rows; rows t = tg + TG j with
//   TG = kRows / MT, so the lanes of a warp read consecutive rows of a feature (distinct banks);
//   outputs o = og + OG k (strided), so a warp reads few distinct weights (broadcasts).
// - weight gradient: MO x MI entries, o = og + OG k and i = ig + IG k (strided), so the lanes of
//   a warp read rows of distinct features (distinct banks thanks to the odd kStride).

template <typename T, Act A, int MO, int MT, bool kGrad>
__device__ __forceinline__ void tiled_forward(const Args<T>& a, int l, int n, int64_t row0, int tb,
                                              T* buf) {
  constexpr int TG = kRows / MT;
  const ForwardLayer<T> f = forward_layer(a, l, n, buf);
  const int in = f.in, out = f.out;
  const T* __restrict W = f.W;
  const T* __restrict bb = f.b;
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
      for (int j = 0; j < MT; ++j) av[j] = f.al[i * kStride + tg + TG * j];
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
        f.zl[o * kStride + t] = acc[k][j];
        if (f.hidden) f.an[o * kStride + t] = ActOp<A, T>::f(acc[k][j]);
        if (!kGrad && !f.hidden && t < tb)
          a.out[(int64_t(n) * a.batch + row0 + t) * out + o] = acc[k][j];
      }
    }
  }
}

// gw[o][i] += sum_{t < tb} d[o][t] a[i][t] (gw in shared memory, [out][in]).
template <typename T, int MO, int MI>
__device__ __forceinline__ void tiled_weight_grad(const T* d, const T* al, int in, int out, int tb,
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
__device__ __forceinline__ void tiled_backprop(const T* __restrict W, const T* d, const T* zp,
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

// ---- mlp_generic_kernel and mlp_tiled_kernel ---------------------------------------------------
//
// One block = one (student, chunk) item (see the file comment); the two kernels walk the item
// alike and differ in their phases (kTiled) and in where the block's gradient sums g live: the
// generic kernel adds each tile's sums to its slice of the workspace; the tiled kernel keeps them
// in shared memory across the tiles and copies them to its slice once, at the end. The tiled
// kernel's buffers are always in shared memory; the generic kernel's are in the workspace
// (a.gscratch) when they do not fit there.
template <typename T, Act A, bool kGrad, bool kTiled>
__device__ __forceinline__ void walk_item(const Args<T>& a, unsigned char* smem, double* red) {
  const int tid = threadIdx.x;
  const int64_t item = blockIdx.x;
  const int n = int(item / a.n_chunks);
  const int64_t c = item % a.n_chunks;
  const int L = a.n_linear;
  T* buf = !kTiled && a.gscratch ? a.gscratch + item * a.scratch : reinterpret_cast<T*>(smem);
  T* g = nullptr;
  if (kGrad) {
    g = kTiled ? buf + a.off_g : a.part + item * a.P;
    for (int64_t k = tid; k < a.P; k += blockDim.x) g[k] = T(0);
  }
  double loss_acc = 0.0;

  const int64_t t_end = chunk_tile_end(a, c);
  for (int64_t tile = c * a.tiles_per_chunk; tile < t_end; ++tile) {
    const int64_t row0 = tile * kRows;
    const int tb = tile_rows<kRows>(a.batch, row0);
    __syncthreads();  // the previous tile (and the zeroing above) is done with the buffers
    load_input_tile(a, row0, tb, buf);
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      if constexpr (kTiled) {
        if (a.widths[l + 1] >= 8)
          tiled_forward<T, A, 4, 2, kGrad>(a, l, n, row0, tb, buf);
        else
          tiled_forward<T, A, 1, 1, kGrad>(a, l, n, row0, tb, buf);
      } else {
        generic_forward<T, A, kGrad>(a, l, n, row0, tb, buf);
      }
      __syncthreads();
    }
    if (!kGrad) continue;
    output_error(a, row0, tb, buf, loss_acc);
    __syncthreads();
    // Backward.
    T* dcur = buf + a.off_d0;
    T* dnext = buf + a.off_d1;
    for (int l = L - 1; l >= 0; --l) {
      const int in = a.widths[l], out = a.widths[l + 1];
      const T* al = buf + a.off_a[l];
      if constexpr (kTiled) {
        if (out >= 4 && in >= 4)
          tiled_weight_grad<T, 4, 4>(dcur, al, in, out, tb, g + a.off_w[l]);
        else
          tiled_weight_grad<T, 1, 1>(dcur, al, in, out, tb, g + a.off_w[l]);
      } else {
        generic_weight_grad(dcur, al, in, out, tb, g + a.off_w[l]);
      }
      bias_grad(dcur, out, tb, g + a.off_b[l]);
      if (l > 0) {
        const T* W = a.w[l] + int64_t(n) * out * in;
        const T* zp = buf + a.off_z[l - 1];
        if constexpr (kTiled) {
          if (in >= 8)
            tiled_backprop<T, A, 4, 2>(W, dcur, zp, al, in, out, tb, dnext);
          else
            tiled_backprop<T, A, 1, 1>(W, dcur, zp, al, in, out, tb, dnext);
        } else {
          generic_backprop<T, A>(W, dcur, zp, al, in, out, tb, dnext);
        }
        T* tmp = dcur;
        dcur = dnext;
        dnext = tmp;
      }
      __syncthreads();
    }
  }
  if (!kGrad) return;
  if (kTiled) {  // the block's gradient sums to its slice of the workspace (coalesced)
    T* part = a.part + item * a.P;
    for (int64_t k = tid; k < a.P; k += blockDim.x) part[k] = g[k];
  }
  block_loss(loss_acc, red, a.ploss + item);
}

template <typename T, Act A, bool kGrad>
__global__ void __launch_bounds__(kThreads) mlp_generic_kernel(const Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[kThreads];
  walk_item<T, A, kGrad, false>(a, smem_raw, red);
}

template <typename T, Act A, bool kGrad>
__global__ void __launch_bounds__(kThreads) mlp_tiled_kernel(const Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[kThreads];
  walk_item<T, A, kGrad, true>(a, smem_raw, red);
}

// ---- mlp_thin_width_kernel: one hidden layer, few inputs and outputs ------------------------
//
// At the thin sizes (d_in <= 16, width <= 256, d_out <= 4) a tiled-kernel block idles most of the
// time: a 32-row tile of an 80-unit layer is only 2,560 products, and the output layer's phases
// (one output unit) run on one warp. This kernel maps one thread to one hidden neuron j of one
// student and walks the block's chunk of the batch in tiles of kThinRows rows. The neuron's
// incoming weights, bias and outgoing weights stay in registers, and so do its gradient sums over
// all the rows of the chunk: the weight gradients need no sum across threads inside the block.
// The only such sum is the network output of each row, sum_j W2[k][j] h_j[t]: each thread writes
// its products to shared memory, a group of G threads per (output k, row t) adds them in a fixed
// order and writes the scaled error back, and every thread then back-propagates it through its
// own neuron. The tile's inputs and targets are read together, several loads in flight per thread
// (reading each target inside the serial per-output loop would cost one global-memory latency per
// output). The chunk partials go to the workspace ([items][P]) and reduce_kernel sums them in
// chunk order, as for the other kernels: deterministic, no atomics. Threads per block: the width
// rounded up to whole warps.

// Vector loads of D consecutive shared-memory elements (16-byte aligned): a whole warp reads the
// same address (broadcast), so one 16-byte load feeds 4 (float) or 2 (double) FMAs per thread.
template <int D>
__device__ __forceinline__ void load_row(const float* p, float (&v)[D]) {
#pragma unroll
  for (int i = 0; i < D; i += 4) {
    const float4 q = *reinterpret_cast<const float4*>(p + i);
    v[i] = q.x;
    v[i + 1] = q.y;
    v[i + 2] = q.z;
    v[i + 3] = q.w;
  }
}
template <int D>
__device__ __forceinline__ void load_row(const double* p, double (&v)[D]) {
#pragma unroll
  for (int i = 0; i < D; i += 2) {
    const double2 q = *reinterpret_cast<const double2*>(p + i);
    v[i] = q.x;
    v[i + 1] = q.y;
  }
}

// D: inputs per row as stored (thin_d). DO: output units the kernel is compiled for.
// kStaticOut false (variant 0): DO = kThinMaxOut, any d_out up to it, tested at run time.
// kStaticOut true (variant 1): DO == d_out (one kernel per output count), so the per-output loops
// and tests fold away at compile time; and the tile's loads index from the tile's first row in
// 32-bit offsets, inputs and targets in separate loops. The variants differ in their instructions
// only: the values loaded and every sum (its terms and their order) are the same.
template <typename T, Act A, int D, int DO, bool kStaticOut>
__global__ void __launch_bounds__(kThinMaxWidth) mlp_thin_width_kernel(const Args<T> a) {
  constexpr int TR = kThinRows;
  constexpr bool kStoreZ = df_needs_z(A);
  static_assert(DO >= 1 && DO <= kThinMaxOut, "mlp_thin_width_kernel: DO out of range");
  static_assert(kStaticOut || DO == kThinMaxOut,
                "mlp_thin_width_kernel: variant 0 is compiled for DO = kThinMaxOut");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double lsum[kThinMaxWidth];  // each thread's loss
  __shared__ T gb2u[kThinMaxOut * TR];    // output-bias gradient per unit (k, t), over the tiles
  const int tid = threadIdx.x, wp = blockDim.x;
  const int64_t item = blockIdx.x;
  const int n = int(item / a.n_chunks);
  const int64_t c = item % a.n_chunks;
  const int d_in = a.widths[0], width = a.widths[1];
  const int d_out = kStaticOut ? DO : a.widths[2];
  const int64_t B = a.batch;
  T* xs = reinterpret_cast<T*>(smem_raw);  // [TR][D], zero beyond d_in and the batch
  T* ys = xs + TR * D;                     // [DO][TR]: targets (written through xs)
  T* errs = ys + DO * TR;                  // [DO][TR]: scale * (f_k - y_k), 0 off the batch
  T* hs = errs + DO * TR;                  // [TR][wp]: h_j[t] (column j private to thread j)
  T* zs = hs + TR * wp;                    // [TR][wp]: z_j[t] (if the derivative reads it)
  // Output sums: G consecutive threads per unit (k, t) (thin_group); the thread with g == 0 owns
  // the unit (its error, bias gradient and loss). The products' rows are padded to rs = wp + G
  // elements: group u's lanes then read banks u * G + g + G * i (mod 32), distinct across the
  // warp (unpadded, every group of a warp read the same bank: a 32-way conflict when G = 1).
  const int n_units = d_out * TR;
  const int G = thin_group(n_units, wp);
  const int rs = wp + G;
  T* red = kStoreZ ? zs + TR * wp : zs;  // [d_out][TR][rs]: W2[k][j] h_j[t]

  // The neuron's parameters (threads beyond the width copy neuron 0 and write no results).
  const bool active = tid < width;
  const int j = active ? tid : 0;
  T w1[D], w2[DO];
  {
    const T* src = a.w[0] + (int64_t(n) * width + j) * d_in;
#pragma unroll
    for (int i = 0; i < D; ++i) w1[i] = i < d_in ? src[i] : T(0);
#pragma unroll
    for (int k = 0; k < DO; ++k)
      w2[k] = k < d_out ? a.w[1][(int64_t(n) * d_out + k) * width + j] : T(0);
  }
  const T b1 = a.b[0][int64_t(n) * width + j];
  const T* b2 = a.b[1] + int64_t(n) * d_out;
  T gw1[D], gw2[DO], gb1 = T(0);
#pragma unroll
  for (int i = 0; i < D; ++i) gw1[i] = T(0);
#pragma unroll
  for (int k = 0; k < DO; ++k) gw2[k] = T(0);
  for (int u = tid; u < DO * TR; u += wp) gb2u[u] = T(0);
  double loss_acc = 0.0;

  const int64_t t_end = chunk_tile_end(a, c);
  for (int64_t tile = c * a.tiles_per_chunk; tile < t_end; ++tile) {
    const int64_t row0 = tile * TR;
    const int tb = tile_rows<TR>(B, row0);
    __syncthreads();  // the previous tile is done with xs, ys, errs (and gb2u is zeroed)
    // The tile's inputs and targets into xs and ys (zero beyond d_in, d_out and the batch):
    // kLoads loads in flight per thread before the first store, so a tile costs about one
    // global-memory latency.
    constexpr int kLoads = 4;
    if constexpr (kStaticOut) {
      // Offsets from the tile's first row (int: at most kThinRows rows of kThinMaxIn inputs).
      // The targets first (at most DO per thread: wp >= 32 == TR), held over the input loads.
      const T* xt = a.x + row0 * d_in;
      const T* yt = a.y + row0 * d_out;
      T yv[DO];
#pragma unroll
      for (int q = 0; q < DO; ++q) {
        const int u = tid + q * wp, k = u / TR, t = u % TR;  // u < DO * TR: k < d_out
        yv[q] = u < DO * TR && t < tb ? yt[t * d_out + k] : T(0);
      }
      constexpr int kX = TR * D;
      for (int base = tid; base < kX; base += kLoads * wp) {
        T v[kLoads];
#pragma unroll
        for (int q = 0; q < kLoads; ++q) {
          const int idx = base + q * wp, t = idx / D, i = idx - t * D;
          v[q] = idx < kX && t < tb && i < d_in ? xt[t * d_in + i] : T(0);
        }
#pragma unroll
        for (int q = 0; q < kLoads; ++q)
          if (base + q * wp < kX) xs[base + q * wp] = v[q];
      }
#pragma unroll
      for (int q = 0; q < DO; ++q)
        if (tid + q * wp < DO * TR) ys[tid + q * wp] = yv[q];
    } else {
      constexpr int kTotal = TR * D + DO * TR;
      for (int base = tid; base < kTotal; base += kLoads * wp) {
        T v[kLoads];
#pragma unroll
        for (int q = 0; q < kLoads; ++q) {
          const int idx = base + q * wp;
          v[q] = T(0);
          if (idx < TR * D) {
            const int t = idx / D, i = idx % D;
            if (t < tb && i < d_in) v[q] = a.x[(row0 + t) * d_in + i];
          } else if (idx < kTotal) {
            const int u = idx - TR * D, k = u / TR, t = u % TR;
            if (k < d_out && t < tb) v[q] = a.y[(row0 + t) * d_out + k];
          }
        }
#pragma unroll
        for (int q = 0; q < kLoads; ++q)
          if (base + q * wp < kTotal) xs[base + q * wp] = v[q];
      }
    }
    __syncthreads();
    // Forward through the neuron; its share of each output to shared memory.
#pragma unroll 4
    for (int t = 0; t < TR; ++t) {
      T xv[D];
      load_row<D>(xs + t * D, xv);
      T z = b1;
#pragma unroll
      for (int i = 0; i < D; ++i) z += w1[i] * xv[i];
      const T h = ActOp<A, T>::f(z);
      hs[t * wp + tid] = h;
      if (kStoreZ) zs[t * wp + tid] = z;
      if (active) {
#pragma unroll
        for (int k = 0; k < DO; ++k)
          if (k < d_out) red[(k * TR + t) * rs + tid] = w2[k] * h;
      }
    }
    __syncthreads();
    // Outputs and errors: each group sums its unit's products in a fixed order.
    for (int base = 0; base < n_units * G; base += wp) {
      const int v = base + tid, u = v / G, g = v % G;
      T s = T(0);
      if (u < n_units) {
        const T* r = red + u * rs;
#pragma unroll 4
        for (int q = g; q < width; q += G) s += r[q];
      }
      for (int off = G / 2; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
      if (u < n_units && g == 0) {
        const int k = u / TR, t = u % TR;
        T e = T(0);
        if (t < tb) {
          const T res = b2[k] + s - ys[u];
          loss_acc += double(res) * double(res);
          e = a.scale * res;
        }
        errs[u] = e;
        gb2u[u] += e;
      }
    }
    __syncthreads();
    // Backward through the neuron; its gradient sums stay in registers.
#pragma unroll 4
    for (int t = 0; t < TR; ++t) {
      T ev[DO];
#pragma unroll
      for (int k = 0; k < DO; ++k) ev[k] = k < d_out ? errs[k * TR + t] : T(0);
      T dh = T(0);
#pragma unroll
      for (int k = 0; k < DO; ++k) dh += w2[k] * ev[k];
      const T h = hs[t * wp + tid];
      const T z = kStoreZ ? zs[t * wp + tid] : T(0);
      const T delta = dh * ActOp<A, T>::df(z, h);
      T xv[D];
      load_row<D>(xs + t * D, xv);
#pragma unroll
      for (int i = 0; i < D; ++i) gw1[i] += delta * xv[i];
      gb1 += delta;
#pragma unroll
      for (int k = 0; k < DO; ++k) gw2[k] += ev[k] * h;
    }
  }
  // The block's gradient sums and loss to its slice of the workspace.
  T* part = a.part + item * a.P;
  if (active) {
#pragma unroll
    for (int i = 0; i < D; ++i)
      if (i < d_in) part[a.off_w[0] + int64_t(j) * d_in + i] = gw1[i];
    part[a.off_b[0] + j] = gb1;
#pragma unroll
    for (int k = 0; k < DO; ++k)
      if (k < d_out) part[a.off_w[1] + int64_t(k) * width + j] = gw2[k];
  }
  lsum[tid] = loss_acc;
  __syncthreads();
  if (tid == 0) {
    double s = 0.0;
    for (int q = 0; q < wp; ++q) s += lsum[q];
    a.ploss[item] = s;
  }
  if (tid < d_out) {
    T g = T(0);
    for (int t = 0; t < TR; ++t) g += gb2u[tid * TR + t];
    part[a.off_b[1] + tid] = g;
  }
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

// The thin-width kernel for D = d stored inputs (thin_d).
template <typename T, Act A, int DO, bool kStaticOut>
auto thin_kernel_for(int d) {
  return d == 4    ? mlp_thin_width_kernel<T, A, 4, DO, kStaticOut>
         : d == 8  ? mlp_thin_width_kernel<T, A, 8, DO, kStaticOut>
         : d == 12 ? mlp_thin_width_kernel<T, A, 12, DO, kStaticOut>
                   : mlp_thin_width_kernel<T, A, 16, DO, kStaticOut>;
}

// Launches `kernel` on one block per item of the plan, `threads` threads and smem bytes of dynamic
// shared memory per block. The default limit of dynamic shared memory is 48 KB minus the kernel's
// static shared memory (static_smem): the kernel opts in beyond it.
template <typename T, typename Kernel>
void launch_items(Kernel kernel, const Plan<T>& pl, int threads, size_t smem, size_t static_smem,
                  cudaStream_t stream, const char* what) {
  if (smem + static_smem > kDefaultSmem)
    cuda::check(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "mlp (cuda): cudaFuncSetAttribute");
  kernel<<<unsigned(pl.items), threads, smem, stream>>>(pl.a);
  cuda::check_launch(what);
}

template <typename T, Act A>
void launch_thin(const Plan<T>& pl, cudaStream_t stream) {
  const int d = thin_d(pl.a.widths[0]), d_out = pl.a.widths[2];
  const bool static_out = cuda_thin_kernel_variant() == 1;
  auto kernel = !static_out  ? thin_kernel_for<T, A, kThinMaxOut, false>(d)
                : d_out == 1 ? thin_kernel_for<T, A, 1, true>(d)
                : d_out == 2 ? thin_kernel_for<T, A, 2, true>(d)
                : d_out == 3 ? thin_kernel_for<T, A, 3, true>(d)
                             : thin_kernel_for<T, A, 4, true>(d);
  launch_items(kernel, pl, pl.thin_threads, pl.smem_bytes_thin, kThinStaticSmem, stream,
               static_out ? "mlp_mse_grad (cuda, thin-width kernel per output count)"
                          : "mlp_mse_grad (cuda, thin-width kernel)");
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
  const char* what = kGrad ? "mlp_mse_grad (cuda)" : "mlp_forward (cuda)";
  if (kGrad && pl.thin)
    launch_thin<T, A>(pl, stream);
  else if (pl.tiled)
    launch_items(mlp_tiled_kernel<T, A, kGrad>, pl, kThreads, pl.smem_bytes_tiled, kStaticSmem,
                 stream, what);
  else
    launch_items(mlp_generic_kernel<T, A, kGrad>, pl, kThreads, pl.smem_bytes, kStaticSmem, stream,
                 what);
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
  return p.dtype == DType::F64 ? make_plan<double>(p, grad).total : make_plan<float>(p, grad).total;
}

}  // namespace

size_t mlp_forward_cuda_workspace_bytes(const MlpParams& p) { return workspace_bytes(p, false); }

size_t mlp_mse_grad_cuda_workspace_bytes(const MlpParams& p) { return workspace_bytes(p, true); }

void mlp_forward_cuda(const MlpParams& p, void* workspace, size_t workspace_bytes, void* stream) {
  if (p.batch == 0) return;
  cuda::DeviceGuard guard(p.device);
  if (p.dtype == DType::F64)
    dispatch<double, false>(p, workspace, workspace_bytes, stream);
  else
    dispatch<float, false>(p, workspace, workspace_bytes, stream);
}

void mlp_mse_grad_cuda(const MlpParams& p, void* workspace, size_t workspace_bytes, void* stream) {
  if (p.batch < 1) throw std::invalid_argument("mlp_mse_grad (cuda): need a batch of >= 1");
  cuda::DeviceGuard guard(p.device);
  if (p.dtype == DType::F64)
    dispatch<double, true>(p, workspace, workspace_bytes, stream);
  else
    dispatch<float, true>(p, workspace, workspace_bytes, stream);
}

}  // namespace eac
