// Parameter structs and entry points shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
// Kernels never see torch objects: raw pointers, sizes and a dtype. bindings.cpp validates and
// fills these structs; it is the only place that branches on the device.
#pragma once
#include <cstddef>
#include <cstdint>

namespace eac {

enum class DType : int { F32 = 0, F64 = 1 };

// Threads of the CPU kernels. Our own setting, not the OpenMP ICV: torch loads a libgomp of the
// same soname, so the process has one OpenMP runtime and torch.set_num_threads() would otherwise
// change our kernels' thread count too. Default: the number of processors.
int kernel_threads();
void set_kernel_threads(int n);

constexpr int kMaxLinearLayers = 9;  // up to 8 hidden layers + the linear output layer

// An ensemble of N MLPs that all read the same batch x.
// widths[0] = d_in, widths[1..L] = hidden widths, widths[L+1] = d_out; n_linear = L + 1.
// w[l]: [N, widths[l+1], widths[l]] (torch.nn.Linear layout per student), b[l]: [N, widths[l+1]].
struct MlpParams {
  int n_students = 0;
  int64_t batch = 0;
  int n_linear = 0;
  int widths[kMaxLinearLayers + 1] = {};
  int activation = 0;
  DType dtype = DType::F32;
  int device = -1;  // CUDA device index of every pointer (CUDA entry points only)
  const void* w[kMaxLinearLayers] = {};
  const void* b[kMaxLinearLayers] = {};
  const void* x = nullptr;          // [B, d_in]
  const void* y = nullptr;          // [B, d_out] (mse_grad only)
  void* out = nullptr;              // [N, B, d_out] (forward only)
  void* loss = nullptr;             // [N] (mse_grad only)
  void* gw[kMaxLinearLayers] = {};  // like w (mse_grad only)
  void* gb[kMaxLinearLayers] = {};  // like b (mse_grad only)
};

void mlp_forward_cpu(const MlpParams& p);
void mlp_mse_grad_cpu(const MlpParams& p);

// CUDA entry points (csrc/cuda; compiled only with EAC_WITH_CUDA). Pointers are device pointers
// on p.device; `stream` is a cudaStream_t (the caller's torch stream), kept as void* so this header
// needs no CUDA include. Work is enqueued on the stream and not waited for. `workspace` is scratch
// device memory of at least the bytes the matching *_workspace_bytes(p) returns (which reads
// p.device, the shapes and the dtype only). Errors throw std::runtime_error with CUDA's message.
//
// The fused MLP kernel is chosen per call from the shapes, the dtype and the device's shared
// memory (csrc/cuda/mlp.cu): the thin-width kernel for the gradients of one-hidden-layer students
// with d_in <= 16, width <= 256 and d_out <= 4 when its buffers fit in shared memory; else the
// tiled kernel when its tile buffers and gradient sums fit there; else the generic kernel.
//
// Variant of the thin-width kernel (process-wide, internal: kept until timed on a GPU; the other
// kernels ignore it): 0, the default, one kernel for every output count, tested at run time; 1, a
// kernel compiled for each output count. Both give bitwise equal results.
// set_cuda_thin_kernel_variant throws std::invalid_argument for any other value.
void set_cuda_thin_kernel_variant(int variant);
int cuda_thin_kernel_variant();
size_t mlp_forward_cuda_workspace_bytes(const MlpParams& p);
void mlp_forward_cuda(const MlpParams& p, void* workspace, size_t workspace_bytes, void* stream);
size_t mlp_mse_grad_cuda_workspace_bytes(const MlpParams& p);
void mlp_mse_grad_cuda(const MlpParams& p, void* workspace, size_t workspace_bytes, void* stream);

// Adam (torch.optim.Adam's formula) on a list of tensors, each [N, numel_per_student[k]].
// lr: [N] (dtype of the parameters), step: [N] int64, the step number after this update (>= 1).
struct AdamParams {
  int n_students = 0;
  int n_tensors = 0;
  DType dtype = DType::F32;
  const int64_t* numel_per_student = nullptr;  // [n_tensors]
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* exp_avg = nullptr;
  void* const* exp_avg_sq = nullptr;
  const void* lr = nullptr;
  const int64_t* step = nullptr;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int device = -1;  // CUDA only: the device of every pointer except numel_per_student and the
                    // pointer arrays themselves, which stay on the host
};
void adam_step_cpu(const AdamParams& p);
// CUDA: lr and step are device arrays [N]; one elementwise launch per tensor on `stream`.
void adam_step_cuda(const AdamParams& p, void* stream);

// One epoch of the training schedule of N students, in place (csrc/common/plateau.h has the
// rule). State arrays [N]: lr, best, rel (float64), bad, cool, epochs, code (1 stopped on the
// target, 2 on min_lr), diverged (first epoch with a non-finite loss, 0 none) (int64), live
// (uint8: 1 still training). loss [N] float64: the epoch's loss of every student (ignored where
// not live). step_lr [N] (float32 or float64, the parameters' dtype): written with the learning
// rate of the next Adam steps, 0 for a student that stopped (its weights then stay frozen).
struct PlateauParams {
  int n_students = 0;
  int64_t epoch = 0;
  double var_y = 1.0, factor = 0.0, target = 0.0, min_lr = 0.0;
  int64_t patience = 0, cooldown = 0;
  const double* loss = nullptr;
  double* lr = nullptr;
  double* best = nullptr;
  int64_t* bad = nullptr;
  int64_t* cool = nullptr;
  uint8_t* live = nullptr;
  double* rel = nullptr;
  int64_t* epochs = nullptr;
  int64_t* code = nullptr;
  int64_t* diverged = nullptr;
  void* step_lr = nullptr;
  DType step_dtype = DType::F32;
  int device = -1;  // CUDA only
};
void plateau_step_cpu(const PlateauParams& p);
// CUDA: every array on p.device; one launch on `stream`.
void plateau_step_cuda(const PlateauParams& p, void* stream);

// Cosine distances between the rows of v [M, D] (float32 or float64), written as float64 [M, M]:
// 1 - cos, or 1 - |cos| when absolute. A zero row has distance 1 to everything (0 to itself).
void cosine_distances_cpu(const void* v, int64_t m, int64_t d, DType dtype, bool absolute,
                          double* out);
// CUDA: v and out on `device`; workspace holds 2 * m doubles (per-row scale and inverse norm).
void cosine_distances_cuda(const void* v, int64_t m, int64_t d, DType dtype, bool absolute,
                           double* out, void* workspace, int device, void* stream);

// UPGMA (average linkage) on a symmetric float64 distance matrix [M, M], destroyed in the process.
// Writes the linkage matrix z [M - 1, 4] in scipy.cluster.hierarchy's format (merged ids, height,
// size; rows sorted by height, new cluster of row i has id M + i).
void average_linkage_cpu(double* dist, int64_t m, double* z);

}  // namespace eac
