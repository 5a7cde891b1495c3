// Thread count of the CPU kernels (see common/ops.h).
#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/ops.h"

namespace eac {
namespace {

int default_threads() {
#ifdef _OPENMP
  return omp_get_num_procs();
#else
  return 1;
#endif
}

std::atomic<int> g_threads{default_threads()};

}  // namespace

int kernel_threads() { return g_threads.load(std::memory_order_relaxed); }

void set_kernel_threads(int n) { g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

}  // namespace eac
