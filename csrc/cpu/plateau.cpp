// The per-student training schedule on the CPU (the rule is in common/plateau.h).
#include "common/plateau.h"

namespace eac {

void plateau_step_cpu(const PlateauParams& p) {
  for (int n = 0; n < p.n_students; ++n) {
    if (p.step_dtype == DType::F64)
      plateau_student<double>(p, n);
    else
      plateau_student<float>(p, n);
  }
}

}  // namespace eac
