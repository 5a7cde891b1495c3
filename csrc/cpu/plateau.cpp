// The per-student training schedule on the CPU (the rule is in common/plateau.h).
#include "common/plateau.h"

namespace eac {
namespace {

template <typename T>
void plateau_impl(const PlateauParams& p) {
  for (int n = 0; n < p.n_students; ++n) plateau_student<T>(p, n);
}

}  // namespace

void plateau_step_cpu(const PlateauParams& p) {
  if (p.step_dtype == DType::F64)
    plateau_impl<double>(p);
  else
    plateau_impl<float>(p);
}

}  // namespace eac
