// Adam with a learning rate and a step count per student (torch.optim.Adam's arithmetic).
#include "common/vector_math.h"

#include <cstdint>
#include <vector>

#include "common/ops.h"

namespace eac {
namespace {

template <typename T>
void adam_impl(const AdamParams& a) {
  const T* lr = static_cast<const T*>(a.lr);
  const T b1 = static_cast<T>(a.beta1), b2 = static_cast<T>(a.beta2), eps = static_cast<T>(a.eps);
  // Bias corrections per student, computed once in double then cast (as torch does for its
  // Python-float step sizes).
  std::vector<T> step_size(a.n_students), inv_bc2_sqrt(a.n_students);
  for (int n = 0; n < a.n_students; ++n) {
    const double t = static_cast<double>(a.step[n]);
    const double bc1 = 1.0 - std::pow(a.beta1, t);
    const double bc2 = 1.0 - std::pow(a.beta2, t);
    step_size[n] = static_cast<T>(static_cast<double>(lr[n]) / bc1);
    inv_bc2_sqrt[n] = static_cast<T>(1.0 / std::sqrt(bc2));
  }
  const int64_t total = static_cast<int64_t>(a.n_tensors) * a.n_students;
  // Below this many elements the update runs on the calling thread (team wake-up costs more).
  constexpr double kMinParallelWork = 1e5;
  double work = 0;
  for (int k = 0; k < a.n_tensors; ++k) work += double(a.numel_per_student[k]) * a.n_students;
#pragma omp parallel for schedule(static) if (total > 1 && work > kMinParallelWork) \
    num_threads(kernel_threads())
  for (int64_t job = 0; job < total; ++job) {
    const int k = static_cast<int>(job / a.n_students);
    const int n = static_cast<int>(job % a.n_students);
    const int64_t len = a.numel_per_student[k];
    T* p = static_cast<T*>(a.params[k]) + n * len;
    const T* g = static_cast<const T*>(a.grads[k]) + n * len;
    T* m = static_cast<T*>(a.exp_avg[k]) + n * len;
    T* v = static_cast<T*>(a.exp_avg_sq[k]) + n * len;
    const T ss = step_size[n], ib = inv_bc2_sqrt[n];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const T gi = g[i];
      const T mi = b1 * m[i] + (T(1) - b1) * gi;
      const T vi = b2 * v[i] + (T(1) - b2) * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] -= ss * mi / (std::sqrt(vi) * ib + eps);
    }
  }
}

}  // namespace

void adam_step_cpu(const AdamParams& a) {
  if (a.dtype == DType::F64)
    adam_impl<double>(a);
  else
    adam_impl<float>(a);
}

}  // namespace eac
