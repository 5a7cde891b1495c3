// One epoch of the per-student training schedule, once for host and device: the update of one
// student's ReduceLROnPlateau (mode min, threshold 0; torch.optim.lr_scheduler's rules) and the
// stop rules of expand_and_cluster.training (Martinelli et al. 2024, App.: lr x 1/sqrt(10) on a
// plateau, stop at the loss target or when lr < min_lr). Float64 state, so the CPU and the GPU
// compute the same numbers.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/activations.h"  // EAC_HD
#include "common/ops.h"

namespace eac {

// Student n, in place; nothing happens to a student that is not live. Order (as
// ops.plateau_step_reference): divergence record, relative MSE and epoch, then the plateau rule
// (better -> best and bad = 0, else bad + 1; a cooldown step zeroes bad; bad > patience -> lr x
// factor, cooldown restarts, bad = 0), then the stop rules on the new relative MSE and lr.
template <typename T>
EAC_HD void plateau_student(const PlateauParams& p, int n) {
  if (!p.live[n]) return;
  const double loss = p.loss[n];
  if (!std::isfinite(loss) && p.diverged[n] == 0) p.diverged[n] = p.epoch;
  const double rel = loss / p.var_y;
  p.rel[n] = rel;
  p.epochs[n] = p.epoch;
  int64_t bad = p.bad[n] + 1;
  if (loss < p.best[n]) {
    p.best[n] = loss;
    bad = 0;
  }
  int64_t cool = p.cool[n];
  if (cool > 0) {
    cool -= 1;
    bad = 0;
  } else {
    cool = 0;
  }
  double lr = p.lr[n];
  if (bad > p.patience) {
    lr *= p.factor;
    cool = p.cooldown;
    bad = 0;
  }
  p.lr[n] = lr;
  p.bad[n] = bad;
  p.cool[n] = cool;
  const bool hit = rel <= p.target, low = lr < p.min_lr;
  if (hit)
    p.code[n] = 1;
  else if (low)
    p.code[n] = 2;
  const bool live = !(hit || low);
  p.live[n] = live ? 1 : 0;
  static_cast<T*>(p.step_lr)[n] = live ? T(lr) : T(0);
}

}  // namespace eac
