// The per-student training schedule on the GPU: one thread per student, one launch per epoch,
// so the training loop needs no host synchronisation to run it (the rule is in common/plateau.h).
#include "common/plateau.h"
#include "cuda/common.cuh"

namespace eac {
namespace {

template <typename T>
__global__ void __launch_bounds__(cuda::kThreads) plateau_kernel(const PlateauParams p) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n < p.n_students) plateau_student<T>(p, n);
}

}  // namespace

void plateau_step_cuda(const PlateauParams& p, void* stream) {
  if (p.n_students < 1) return;
  cuda::DeviceGuard guard(p.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int blocks = cuda::blocks_for(p.n_students);
  if (p.step_dtype == DType::F64)
    plateau_kernel<double><<<blocks, cuda::kThreads, 0, s>>>(p);
  else
    plateau_kernel<float><<<blocks, cuda::kThreads, 0, s>>>(p);
  cuda::check_launch("plateau_step (cuda)");
}

}  // namespace eac
