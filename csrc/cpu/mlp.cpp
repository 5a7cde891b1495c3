// Fused forward / forward + MSE + backward of an ensemble of N small MLPs on the CPU.
//
// Work is split into items (student n, chunk c of the batch). An item walks its chunk tile by
// tile (kTile rows): the tile's inputs are transposed to feature-major [features][kTile], every
// layer's pre-activations Z and activations A stay in a per-thread workspace (L1/L2), the output
// error is formed, and the backward pass accumulates the weight gradients of the item. The chunk
// partition depends on B only, and partial gradients are summed in chunk order, so results do not
// depend on the number of threads or on scheduling.
#include "common/vector_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/activations.h"
#include "common/ops.h"

namespace eac {
namespace {

// Rows of the batch per tile. 64 rows of float64 is 512 bytes per feature row; a 64-wide layer's
// Z and A then take 64 KiB, which stays in L2 (and largely in L1 for float32).
constexpr int kTile = 64;
// Rows per chunk before the cap below; a chunk is the unit of parallel work inside one student.
constexpr int64_t kChunkRows = 256;
// At most this many chunks per student: bounds the partial-gradient memory (kMaxChunks * N * P).
constexpr int64_t kMaxChunks = 8;
// Below this many multiply-adds per call the work runs on the calling thread: waking the OpenMP
// team costs several microseconds, more than tiny mini-batches take (measured: 8-20-2 students,
// B = 512, N = 10 ran faster on one thread).
constexpr double kMinParallelWork = 2e5;

// Multiply-adds of one forward pass of all students over the batch.
inline double forward_work(const MlpParams& p) {
  double per_row = 0;
  for (int l = 0; l < p.n_linear; ++l) per_row += double(p.widths[l]) * p.widths[l + 1];
  return per_row * double(p.batch) * p.n_students;
}

template <typename T>
struct Net {
  int n_linear;
  const int* widths;
  const T* w[kMaxLinearLayers];  // student's weights
  const T* b[kMaxLinearLayers];
};

// Per-thread workspace, reused across calls (grows only).
template <typename T>
struct Workspace {
  std::vector<T> buf;
  T* Z[kMaxLinearLayers];      // Z[l]: [widths[l+1]][kTile] pre-activation of layer l
  T* A[kMaxLinearLayers + 1];  // A[0]: input tile, A[l+1] = act(Z[l]) (hidden layers only)
  T* d0;                       // delta buffers [max_width][kTile]
  T* d1;
  void setup(const int* widths, int n_linear) {
    int64_t total = 0, maxw = 0;
    for (int l = 0; l <= n_linear; ++l) maxw = std::max<int64_t>(maxw, widths[l]);
    for (int l = 0; l < n_linear; ++l) total += 2 * int64_t(widths[l + 1]);
    total += widths[0] + 2 * maxw;
    total *= kTile;
    if (int64_t(buf.size()) < total) buf.assign(total, T(0));
    T* p = buf.data();
    A[0] = p;
    p += int64_t(widths[0]) * kTile;
    for (int l = 0; l < n_linear; ++l) {
      Z[l] = p;
      p += int64_t(widths[l + 1]) * kTile;
      A[l + 1] = p;
      p += int64_t(widths[l + 1]) * kTile;
    }
    d0 = p;
    p += maxw * kTile;
    d1 = p;
  }
};

template <typename T>
Workspace<T>& thread_workspace() {
  static thread_local Workspace<T> ws;
  return ws;
}

// Load rows [row0, row0 + tb) of src [B, cols] into dst [cols][kTile], zero-padding to kTile.
template <typename T>
inline void load_transposed(const T* src, int64_t row0, int tb, int cols, T* dst) {
  for (int t = 0; t < tb; ++t) {
    const T* s = src + (row0 + t) * cols;
    for (int i = 0; i < cols; ++i) dst[int64_t(i) * kTile + t] = s[i];
  }
  if (tb < kTile)
    for (int i = 0; i < cols; ++i)
      std::fill(dst + int64_t(i) * kTile + tb, dst + int64_t(i + 1) * kTile, T(0));
}

// z[o][:] = b[o] + sum_i W[o][i] a[i][:], four output rows at a time (each a[i] row loaded once
// per four FMAs).
template <typename T>
inline void dense_tile(const T* __restrict W, const T* __restrict b, const T* __restrict a, int in,
                       int out, T* __restrict z) {
  int o = 0;
  for (; o + 4 <= out; o += 4) {
    T* z0 = z + int64_t(o) * kTile;
    T* z1 = z0 + kTile;
    T* z2 = z1 + kTile;
    T* z3 = z2 + kTile;
    const T* w0 = W + int64_t(o) * in;
    const T* w1 = w0 + in;
    const T* w2 = w1 + in;
    const T* w3 = w2 + in;
#pragma omp simd
    for (int t = 0; t < kTile; ++t) {
      z0[t] = b[o];
      z1[t] = b[o + 1];
      z2[t] = b[o + 2];
      z3[t] = b[o + 3];
    }
    for (int i = 0; i < in; ++i) {
      const T* ai = a + int64_t(i) * kTile;
      const T c0 = w0[i], c1 = w1[i], c2 = w2[i], c3 = w3[i];
#pragma omp simd
      for (int t = 0; t < kTile; ++t) {
        const T av = ai[t];
        z0[t] += c0 * av;
        z1[t] += c1 * av;
        z2[t] += c2 * av;
        z3[t] += c3 * av;
      }
    }
  }
  for (; o < out; ++o) {
    T* zo = z + int64_t(o) * kTile;
    const T* wo = W + int64_t(o) * in;
#pragma omp simd
    for (int t = 0; t < kTile; ++t) zo[t] = b[o];
    for (int i = 0; i < in; ++i) {
      const T* ai = a + int64_t(i) * kTile;
      const T c = wo[i];
#pragma omp simd
      for (int t = 0; t < kTile; ++t) zo[t] += c * ai[t];
    }
  }
}

// kDf (the gradient pass): each hidden layer's Z is overwritten with the activation's derivative
// f'(z), computed with f (ActFdf: the exponentials they share once), for delta_tile.
template <typename T, Act A, bool kDf>
inline void forward_tile(const Net<T>& net, Workspace<T>& ws) {
  const int L = net.n_linear;
  for (int l = 0; l < L; ++l) {
    const int in = net.widths[l], out = net.widths[l + 1];
    dense_tile(net.w[l], net.b[l], ws.A[l], in, out, ws.Z[l]);
    if (l + 1 < L) {
      T* __restrict z = ws.Z[l];
      T* __restrict a = ws.A[l + 1];
      const int64_t n = int64_t(out) * kTile;
      if constexpr (kDf) {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          T av, dv;
          ActFdf<A, T>::run(z[k], av, dv);
          a[k] = av;
          z[k] = dv;
        }
      } else {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) a[k] = ActOp<A, T>::f(z[k]);
      }
    }
  }
}

// gw[o][i] += sum_t d[o][t] a[i][t]; gb[o] += sum_t d[o][t]
template <typename T>
inline void weight_grad_tile(const T* __restrict d, const T* __restrict a, int in, int out,
                             T* __restrict gw, T* __restrict gb) {
  for (int o = 0; o < out; ++o) {
    const T* dr = d + int64_t(o) * kTile;
    T* g = gw + int64_t(o) * in;
    int i = 0;
    for (; i + 4 <= in; i += 4) {
      const T* a0 = a + int64_t(i) * kTile;
      const T* a1 = a0 + kTile;
      const T* a2 = a1 + kTile;
      const T* a3 = a2 + kTile;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int t = 0; t < kTile; ++t) {
        const T dv = dr[t];
        s0 += dv * a0[t];
        s1 += dv * a1[t];
        s2 += dv * a2[t];
        s3 += dv * a3[t];
      }
      g[i] += s0;
      g[i + 1] += s1;
      g[i + 2] += s2;
      g[i + 3] += s3;
    }
    for (; i < in; ++i) {
      const T* ai = a + int64_t(i) * kTile;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int t = 0; t < kTile; ++t) s += dr[t] * ai[t];
      g[i] += s;
    }
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int t = 0; t < kTile; ++t) s += dr[t];
    gb[o] += s;
  }
}

// dprev[i][t] = (sum_o W[o][i] d[o][t]) * df[i][t], df the stored derivative (forward_tile)
template <typename T>
inline void delta_tile(const T* __restrict W, const T* __restrict d, const T* __restrict df, int in,
                       int out, T* __restrict dprev) {
  std::fill(dprev, dprev + int64_t(in) * kTile, T(0));
  for (int o = 0; o < out; ++o) {
    const T* dr = d + int64_t(o) * kTile;
    const T* wo = W + int64_t(o) * in;
    int i = 0;
    for (; i + 4 <= in; i += 4) {
      T* p0 = dprev + int64_t(i) * kTile;
      T* p1 = p0 + kTile;
      T* p2 = p1 + kTile;
      T* p3 = p2 + kTile;
      const T c0 = wo[i], c1 = wo[i + 1], c2 = wo[i + 2], c3 = wo[i + 3];
#pragma omp simd
      for (int t = 0; t < kTile; ++t) {
        const T dv = dr[t];
        p0[t] += c0 * dv;
        p1[t] += c1 * dv;
        p2[t] += c2 * dv;
        p3[t] += c3 * dv;
      }
    }
    for (; i < in; ++i) {
      T* pi = dprev + int64_t(i) * kTile;
      const T c = wo[i];
#pragma omp simd
      for (int t = 0; t < kTile; ++t) pi[t] += c * dr[t];
    }
  }
  const int64_t n = int64_t(in) * kTile;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dprev[k] *= df[k];
}

template <typename T>
Net<T> student_net(const MlpParams& p, int n) {
  Net<T> net;
  net.n_linear = p.n_linear;
  net.widths = p.widths;
  for (int l = 0; l < p.n_linear; ++l) {
    const int64_t in = p.widths[l], out = p.widths[l + 1];
    net.w[l] = static_cast<const T*>(p.w[l]) + int64_t(n) * out * in;
    net.b[l] = static_cast<const T*>(p.b[l]) + int64_t(n) * out;
  }
  return net;
}

template <typename T, Act A>
void forward_impl(const MlpParams& p) {
  const int64_t B = p.batch;
  const int N = p.n_students;
  const int d_in = p.widths[0], d_out = p.widths[p.n_linear];
  const int64_t n_tiles = (B + kTile - 1) / kTile;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t items = int64_t(N) * n_tiles;
  const double work = forward_work(p);
#pragma omp parallel if (items > 1 && work > kMinParallelWork) num_threads(kernel_threads())
  {
    Workspace<T>& ws = thread_workspace<T>();
    ws.setup(p.widths, p.n_linear);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int n = int(item / n_tiles);
      const int64_t row0 = (item % n_tiles) * kTile;
      const int tb = int(std::min<int64_t>(kTile, B - row0));
      const Net<T> net = student_net<T>(p, n);
      load_transposed(x, row0, tb, d_in, ws.A[0]);
      forward_tile<T, A, false>(net, ws);
      const T* zl = ws.Z[p.n_linear - 1];
      T* o = out + (int64_t(n) * B + row0) * d_out;
      for (int t = 0; t < tb; ++t)
        for (int j = 0; j < d_out; ++j) o[int64_t(t) * d_out + j] = zl[int64_t(j) * kTile + t];
    }
  }
}

template <typename T, Act A>
void mse_grad_impl(const MlpParams& p) {
  const int64_t B = p.batch;
  const int N = p.n_students;
  const int L = p.n_linear;
  const int d_in = p.widths[0], d_out = p.widths[L];
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);

  // Chunking: depends on B only (determinism), at most kMaxChunks chunks, whole tiles each.
  int64_t n_chunks = std::min<int64_t>(kMaxChunks, (B + kChunkRows - 1) / kChunkRows);
  n_chunks = std::max<int64_t>(1, n_chunks);
  const int64_t n_tiles = (B + kTile - 1) / kTile;
  const int64_t tiles_per_chunk = (n_tiles + n_chunks - 1) / n_chunks;
  n_chunks = (n_tiles + tiles_per_chunk - 1) / tiles_per_chunk;

  // Offsets of each layer's gradient inside one student's flat gradient [P].
  int64_t off_w[kMaxLinearLayers], off_b[kMaxLinearLayers], P = 0;
  for (int l = 0; l < L; ++l) {
    off_w[l] = P;
    P += int64_t(p.widths[l + 1]) * p.widths[l];
    off_b[l] = P;
    P += p.widths[l + 1];
  }
  const int64_t items = int64_t(N) * n_chunks;
  const double work = 3 * forward_work(p);
  static thread_local std::vector<T> partial;  // [items][P]
  static thread_local std::vector<double> partial_loss;
  if (int64_t(partial.size()) < items * P) partial.resize(items * P);
  partial_loss.assign(items, 0.0);
  T* part = partial.data();
  double* ploss = partial_loss.data();
  const T scale = T(2) / (T(B) * T(d_out));

#pragma omp parallel if (items > 1 && work > kMinParallelWork) num_threads(kernel_threads())
  {
    Workspace<T>& ws = thread_workspace<T>();
    ws.setup(p.widths, L);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int n = int(item / n_chunks);
      const int64_t c = item % n_chunks;
      const Net<T> net = student_net<T>(p, n);
      T* g = part + item * P;
      std::fill(g, g + P, T(0));
      double loss_acc = 0.0;
      const int64_t t_end = std::min(n_tiles, (c + 1) * tiles_per_chunk);
      for (int64_t tile = c * tiles_per_chunk; tile < t_end; ++tile) {
        const int64_t row0 = tile * kTile;
        const int tb = int(std::min<int64_t>(kTile, B - row0));
        load_transposed(x, row0, tb, d_in, ws.A[0]);
        forward_tile<T, A, true>(net, ws);
        // Output error: delta = scale * (f - y) on the tb real rows, 0 on the padding.
        T* d = ws.d0;
        const T* zl = ws.Z[L - 1];
        for (int j = 0; j < d_out; ++j) {
          T* dj = d + int64_t(j) * kTile;
          const T* zj = zl + int64_t(j) * kTile;
          T s = 0;
          for (int t = 0; t < tb; ++t) {
            const T r = zj[t] - y[(row0 + t) * d_out + j];
            s += r * r;
            dj[t] = scale * r;
          }
          for (int t = tb; t < kTile; ++t) dj[t] = T(0);
          loss_acc += double(s);
        }
        // Backward through the layers.
        T* dcur = ws.d0;
        T* dnext = ws.d1;
        for (int l = L - 1; l >= 0; --l) {
          const int in = p.widths[l], out = p.widths[l + 1];
          weight_grad_tile(dcur, ws.A[l], in, out, g + off_w[l], g + off_b[l]);
          if (l > 0) {
            delta_tile(net.w[l], dcur, ws.Z[l - 1], in, out, dnext);
            std::swap(dcur, dnext);
          }
        }
      }
      ploss[item] = loss_acc;
    }
    // Reduce the chunks of each student in chunk order into the outputs.
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const T* base = part + int64_t(n) * n_chunks * P;
      double lsum = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) lsum += ploss[int64_t(n) * n_chunks + c];
      static_cast<T*>(p.loss)[n] = T(lsum / (double(B) * double(d_out)));
      for (int l = 0; l < L; ++l) {
        const int64_t nw = int64_t(p.widths[l + 1]) * p.widths[l], nb = p.widths[l + 1];
        T* gw = static_cast<T*>(p.gw[l]) + int64_t(n) * nw;
        T* gb = static_cast<T*>(p.gb[l]) + int64_t(n) * nb;
        std::memcpy(gw, base + off_w[l], sizeof(T) * nw);
        std::memcpy(gb, base + off_b[l], sizeof(T) * nb);
        for (int64_t c = 1; c < n_chunks; ++c) {
          const T* src = base + c * P;
#pragma omp simd
          for (int64_t k = 0; k < nw; ++k) gw[k] += src[off_w[l] + k];
#pragma omp simd
          for (int64_t k = 0; k < nb; ++k) gb[k] += src[off_b[l] + k];
        }
      }
    }
  }
}

template <typename T, template <typename, Act> class F>
void dispatch_act(const MlpParams& p) {
  switch (static_cast<Act>(p.activation)) {
    case Act::Identity: return F<T, Act::Identity>::run(p);
    case Act::Relu: return F<T, Act::Relu>::run(p);
    case Act::LeakyRelu: return F<T, Act::LeakyRelu>::run(p);
    case Act::Tanh: return F<T, Act::Tanh>::run(p);
    case Act::Sigmoid: return F<T, Act::Sigmoid>::run(p);
    case Act::Softplus: return F<T, Act::Softplus>::run(p);
    case Act::Gelu: return F<T, Act::Gelu>::run(p);
    case Act::Silu: return F<T, Act::Silu>::run(p);
    case Act::G: return F<T, Act::G>::run(p);
  }
}

template <typename T, Act A>
struct ForwardOp {
  static void run(const MlpParams& p) { forward_impl<T, A>(p); }
};
template <typename T, Act A>
struct MseGradOp {
  static void run(const MlpParams& p) { mse_grad_impl<T, A>(p); }
};

}  // namespace

void mlp_forward_cpu(const MlpParams& p) {
  if (p.batch == 0) return;
  if (p.dtype == DType::F64)
    dispatch_act<double, ForwardOp>(p);
  else
    dispatch_act<float, ForwardOp>(p);
}

void mlp_mse_grad_cpu(const MlpParams& p) {
  if (p.dtype == DType::F64)
    dispatch_act<double, MseGradOp>(p);
  else
    dispatch_act<float, MseGradOp>(p);
}

}  // namespace eac
