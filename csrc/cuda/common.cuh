// Helpers shared by the CUDA kernels: error checks and a device guard.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace eac {
namespace cuda {

// Threads per block of the elementwise and reduction kernels (a multiple of the 32-thread warp).
constexpr int kThreads = 256;
// CUDA's limit on gridDim.y and gridDim.z (gridDim.x allows 2^31 - 1).
constexpr int kMaxGridY = 65535;
// Cap on gridDim.x of grid-stride loops: enough blocks to fill any current GPU many times over.
constexpr int kMaxGridX = 1 << 16;

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
}

// After a launch: configuration errors (grid, shared memory) show up here; faults inside the
// kernel surface asynchronously, at the caller's next synchronising call.
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

// Makes `device` current for the scope (torch's stream and pointers live there) and restores the
// previous device, so the caller's current device never changes.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (device != prev_) check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = device != prev_;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

inline int blocks_for(long long n, int threads = kThreads) {
  const long long b = (n + threads - 1) / threads;
  return static_cast<int>(b < kMaxGridX ? (b > 0 ? b : 1) : kMaxGridX);
}

}  // namespace cuda
}  // namespace eac
