// Adam with a learning rate and a step count per student on the GPU (torch.optim.Adam's
// arithmetic, as csrc/cpu/adam.cpp), computed in T.
//
// One elementwise launch per tensor: the host keeps the per-tensor pointers, so nothing but the
// per-student lr [N] and step [N] (already device tensors) is read from device memory besides the
// tensors themselves. Each element recomputes its student's bias corrections in double (two pow
// calls; the update is memory-bound, so this costs nothing measurable) and casts them to T as the
// CPU kernel does.
#include <cstdint>
#include <stdexcept>

#include "common/ops.h"
#include "cuda/common.cuh"

namespace eac {
namespace {

template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    adam_kernel(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                const T* __restrict lr, const int64_t* __restrict step, int64_t len,
                int64_t total, double beta1, double beta2, double eps) {
  const T b1 = T(beta1), b2 = T(beta2), e = T(eps);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += stride) {
    const int64_t n = k / len;  // [N, len]: row n is student n
    const double t = double(step[n]);
    const T ss = T(double(lr[n]) / (1.0 - pow(beta1, t)));
    const T ib = T(1.0 / sqrt(1.0 - pow(beta2, t)));
    const T gi = g[k];
    const T mi = b1 * m[k] + (T(1) - b1) * gi;
    const T vi = b2 * v[k] + (T(1) - b2) * gi * gi;
    m[k] = mi;
    v[k] = vi;
    p[k] -= ss * mi / (sqrt(vi) * ib + e);
  }
}

template <typename T>
void adam_impl(const AdamParams& a, cudaStream_t stream) {
  for (int k = 0; k < a.n_tensors; ++k) {
    const int64_t len = a.numel_per_student[k];
    const int64_t total = len * a.n_students;
    if (total == 0) continue;  // empty work: no launch
    adam_kernel<T><<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(
        static_cast<T*>(a.params[k]), static_cast<const T*>(a.grads[k]),
        static_cast<T*>(a.exp_avg[k]), static_cast<T*>(a.exp_avg_sq[k]),
        static_cast<const T*>(a.lr), a.step, len, total, a.beta1, a.beta2, a.eps);
    cuda::check_launch("adam_step (cuda)");
  }
}

}  // namespace

void adam_step_cuda(const AdamParams& a, void* stream) {
  if (a.n_tensors == 0 || a.n_students < 1) return;
  cuda::DeviceGuard guard(a.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.dtype == DType::F64)
    adam_impl<double>(a, s);
  else
    adam_impl<float>(a, s);
}

}  // namespace eac
