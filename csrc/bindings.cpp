// pybind11 module expand_and_cluster._C: the only place that branches on the device.
// Arguments arrive as raw data pointers (torch's data_ptr()), sizes and a dtype code, so the
// extension needs no libtorch. expand_and_cluster/ops.py validates tensors first; the checks here
// are the second line (std::invalid_argument becomes ValueError in Python).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/activations.h"
#include "common/ops.h"

namespace py = pybind11;
using eac::DType;

namespace {

DType to_dtype(int code) {
  if (code != 0 && code != 1)
    throw std::invalid_argument("dtype code must be 0 (float32) or 1 (float64), got " +
                                std::to_string(code));
  return static_cast<DType>(code);
}

void require_cpu(int device, const char* op) {
  if (device >= 0) {
#ifdef EAC_WITH_CUDA
    throw std::invalid_argument(std::string(op) + ": the CUDA path is not wired in this build");
#else
    throw std::invalid_argument(std::string(op) +
                                ": not compiled with CUDA support; move the tensors to the CPU or "
                                "rebuild with a CUDA compiler on the PATH");
#endif
  }
}

const void* as_ptr(int64_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
  return reinterpret_cast<const void*>(static_cast<uintptr_t>(p));
}

eac::MlpParams make_mlp_params(const std::vector<int64_t>& w, const std::vector<int64_t>& b,
                               const std::vector<int64_t>& widths, int64_t n_students,
                               int64_t batch, int64_t x, int activation, int dtype) {
  eac::MlpParams p;
  const size_t n_linear = w.size();
  if (n_linear < 1 || n_linear > static_cast<size_t>(eac::kMaxLinearLayers))
    throw std::invalid_argument("weights: expected 1 to " +
                                std::to_string(eac::kMaxLinearLayers) + " layers, got " +
                                std::to_string(n_linear));
  if (b.size() != n_linear)
    throw std::invalid_argument("biases: expected one per weight (" + std::to_string(n_linear) +
                                "), got " + std::to_string(b.size()));
  if (widths.size() != n_linear + 1)
    throw std::invalid_argument("widths: expected " + std::to_string(n_linear + 1) +
                                " entries, got " + std::to_string(widths.size()));
  if (n_students < 1) throw std::invalid_argument("n_students must be >= 1");
  if (batch < 0) throw std::invalid_argument("batch must be >= 0");
  if (activation < 0 || activation >= eac::kNumActivations)
    throw std::invalid_argument("activation code out of range: " + std::to_string(activation));
  p.n_students = static_cast<int>(n_students);
  p.batch = batch;
  p.n_linear = static_cast<int>(n_linear);
  p.activation = activation;
  p.dtype = to_dtype(dtype);
  for (size_t i = 0; i <= n_linear; ++i) {
    if (widths[i] < 1 || widths[i] > (1 << 20))
      throw std::invalid_argument("widths[" + std::to_string(i) + "] must be in [1, 2^20], got " +
                                  std::to_string(widths[i]));
    p.widths[i] = static_cast<int>(widths[i]);
  }
  for (size_t l = 0; l < n_linear; ++l) {
    p.w[l] = as_ptr(w[l], "weights[l]");
    p.b[l] = as_ptr(b[l], "biases[l]");
  }
  p.x = batch > 0 ? as_ptr(x, "x") : nullptr;
  return p;
}

void mlp_forward(const std::vector<int64_t>& w, const std::vector<int64_t>& b,
                 const std::vector<int64_t>& widths, int64_t n_students, int64_t batch, int64_t x,
                 int64_t out, int activation, int dtype, int device) {
  require_cpu(device, "mlp_forward");
  eac::MlpParams p = make_mlp_params(w, b, widths, n_students, batch, x, activation, dtype);
  if (batch == 0) return;
  p.out = const_cast<void*>(as_ptr(out, "out"));
  eac::mlp_forward_cpu(p);
}

void mlp_mse_grad(const std::vector<int64_t>& w, const std::vector<int64_t>& b,
                  const std::vector<int64_t>& widths, int64_t n_students, int64_t batch,
                  int64_t x, int64_t y, int64_t loss, const std::vector<int64_t>& gw,
                  const std::vector<int64_t>& gb, int activation, int dtype, int device) {
  require_cpu(device, "mlp_mse_grad");
  eac::MlpParams p = make_mlp_params(w, b, widths, n_students, batch, x, activation, dtype);
  if (batch < 1) throw std::invalid_argument("mlp_mse_grad: the batch must hold at least 1 query");
  if (gw.size() != w.size() || gb.size() != b.size())
    throw std::invalid_argument("grad_weights/grad_biases: expected one per layer");
  p.y = as_ptr(y, "y");
  p.loss = const_cast<void*>(as_ptr(loss, "loss"));
  for (size_t l = 0; l < w.size(); ++l) {
    p.gw[l] = const_cast<void*>(as_ptr(gw[l], "grad_weights[l]"));
    p.gb[l] = const_cast<void*>(as_ptr(gb[l], "grad_biases[l]"));
  }
  eac::mlp_mse_grad_cpu(p);
}

void adam_step(const std::vector<int64_t>& params, const std::vector<int64_t>& grads,
               const std::vector<int64_t>& exp_avg, const std::vector<int64_t>& exp_avg_sq,
               const std::vector<int64_t>& numel_per_student, int64_t n_students, int64_t lr,
               int64_t step, double beta1, double beta2, double eps, double weight_decay,
               int dtype, int device) {
  require_cpu(device, "adam_step");
  const size_t k = params.size();
  if (grads.size() != k || exp_avg.size() != k || exp_avg_sq.size() != k ||
      numel_per_student.size() != k)
    throw std::invalid_argument(
        "adam_step: params, grads, exp_avg, exp_avg_sq must be lists of the same length");
  if (n_students < 1) throw std::invalid_argument("adam_step: n_students must be >= 1");
  std::vector<void*> p(k), m(k), v(k);
  std::vector<const void*> g(k);
  for (size_t i = 0; i < k; ++i) {
    p[i] = const_cast<void*>(as_ptr(params[i], "params[i]"));
    g[i] = as_ptr(grads[i], "grads[i]");
    m[i] = const_cast<void*>(as_ptr(exp_avg[i], "exp_avg[i]"));
    v[i] = const_cast<void*>(as_ptr(exp_avg_sq[i], "exp_avg_sq[i]"));
    if (numel_per_student[i] < 0) throw std::invalid_argument("numel_per_student must be >= 0");
  }
  eac::AdamParams a;
  a.n_students = static_cast<int>(n_students);
  a.n_tensors = static_cast<int>(k);
  a.dtype = to_dtype(dtype);
  a.numel_per_student = numel_per_student.data();
  a.params = p.data();
  a.grads = g.data();
  a.exp_avg = m.data();
  a.exp_avg_sq = v.data();
  a.lr = as_ptr(lr, "lr");
  a.step = static_cast<const int64_t*>(as_ptr(step, "step"));
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  if (k > 0) eac::adam_step_cpu(a);
}

void cosine_distances(int64_t v, int64_t m, int64_t d, int dtype, bool absolute, int64_t out,
                      int device) {
  require_cpu(device, "cosine_distances");
  if (m < 0 || d < 1) throw std::invalid_argument("cosine_distances: need M >= 0 and D >= 1");
  if (m == 0) return;
  eac::cosine_distances_cpu(as_ptr(v, "v"), m, d, to_dtype(dtype), absolute,
                            static_cast<double*>(const_cast<void*>(as_ptr(out, "out"))));
}

void average_linkage(int64_t dist, int64_t m, int64_t z) {
  if (m < 2) throw std::invalid_argument("average_linkage: need at least 2 observations");
  eac::average_linkage_cpu(static_cast<double*>(const_cast<void*>(as_ptr(dist, "dist"))), m,
                           static_cast<double*>(const_cast<void*>(as_ptr(z, "z"))));
}

std::vector<std::string> backends() {
  std::vector<std::string> out{"cpu"};
#ifdef EAC_WITH_CUDA
  out.push_back("cuda");
#endif
  return out;
}

int num_threads() { return eac::kernel_threads(); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1");
  eac::set_kernel_threads(n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "expand-and-cluster compiled kernels (raw-pointer API; use expand_and_cluster.ops)";
  m.attr("__version__") = EAC_VERSION;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("mlp_forward", &mlp_forward, nogil);
  m.def("mlp_mse_grad", &mlp_mse_grad, nogil);
  m.def("adam_step", &adam_step, nogil);
  m.def("cosine_distances", &cosine_distances, nogil);
  m.def("average_linkage", &average_linkage, nogil);
  m.def("backends", &backends);
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads);
}
