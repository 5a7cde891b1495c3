// pybind11 module expand_and_cluster._C: the only place that branches on the device.
// Arguments arrive as raw data pointers (torch's data_ptr()), sizes and a dtype code, so the
// extension needs no libtorch. expand_and_cluster/ops.py validates tensors first; the checks here
// are the second line (std::invalid_argument becomes ValueError in Python).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
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

// True when the op runs on the CUDA device `device` (>= 0); throws when this build has no CUDA
// backend. device < 0 means the CPU.
bool on_cuda(int device, const char* op) {
  if (device < 0) return false;
#ifdef EAC_WITH_CUDA
  return true;
#else
  throw std::invalid_argument(std::string(op) +
                              ": not compiled with CUDA support; move the tensors to the CPU or "
                              "rebuild with a CUDA compiler on the PATH");
#endif
}

void* as_stream(int64_t s) { return reinterpret_cast<void*>(static_cast<uintptr_t>(s)); }
void* as_workspace(int64_t p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

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
    throw std::invalid_argument("weights: expected 1 to " + std::to_string(eac::kMaxLinearLayers) +
                                " layers, got " + std::to_string(n_linear));
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
                 int64_t out, int activation, int dtype, int device, int64_t stream,
                 int64_t workspace, int64_t workspace_bytes) {
  const bool cuda = on_cuda(device, "mlp_forward");
  eac::MlpParams p = make_mlp_params(w, b, widths, n_students, batch, x, activation, dtype);
  if (batch == 0) return;
  p.out = const_cast<void*>(as_ptr(out, "out"));
  p.device = device;
#ifdef EAC_WITH_CUDA
  if (cuda) {
    eac::mlp_forward_cuda(p, as_workspace(workspace), size_t(workspace_bytes), as_stream(stream));
    return;
  }
#endif
  (void)cuda, (void)stream, (void)workspace, (void)workspace_bytes;
  eac::mlp_forward_cpu(p);
}

// Bytes of device workspace mlp_forward (grad false) or mlp_mse_grad (grad true) needs on CUDA.
int64_t mlp_workspace_bytes(const std::vector<int64_t>& widths, int64_t n_students, int64_t batch,
                            int activation, int dtype, int device, bool grad) {
  on_cuda(device, "mlp_workspace_bytes");
  if (device < 0) return 0;
  // Shapes only: placeholder pointers (never dereferenced) satisfy make_mlp_params' checks.
  const size_t n_linear = widths.empty() ? 0 : widths.size() - 1;
  const std::vector<int64_t> dummy(n_linear, 1);
  eac::MlpParams p = make_mlp_params(dummy, dummy, widths, n_students, batch, 1, activation, dtype);
  p.device = device;
#ifdef EAC_WITH_CUDA
  return int64_t(grad ? eac::mlp_mse_grad_cuda_workspace_bytes(p)
                      : eac::mlp_forward_cuda_workspace_bytes(p));
#else
  (void)grad;
  return 0;
#endif
}

void mlp_mse_grad(const std::vector<int64_t>& w, const std::vector<int64_t>& b,
                  const std::vector<int64_t>& widths, int64_t n_students, int64_t batch, int64_t x,
                  int64_t y, int64_t loss, const std::vector<int64_t>& gw,
                  const std::vector<int64_t>& gb, int activation, int dtype, int device,
                  int64_t stream, int64_t workspace, int64_t workspace_bytes) {
  const bool cuda = on_cuda(device, "mlp_mse_grad");
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
  p.device = device;
#ifdef EAC_WITH_CUDA
  if (cuda) {
    eac::mlp_mse_grad_cuda(p, as_workspace(workspace), size_t(workspace_bytes), as_stream(stream));
    return;
  }
#endif
  (void)cuda, (void)stream, (void)workspace, (void)workspace_bytes;
  eac::mlp_mse_grad_cpu(p);
}

void adam_step(const std::vector<int64_t>& params, const std::vector<int64_t>& grads,
               const std::vector<int64_t>& exp_avg, const std::vector<int64_t>& exp_avg_sq,
               const std::vector<int64_t>& numel_per_student, int64_t n_students, int64_t lr,
               int64_t step, double beta1, double beta2, double eps, int dtype, int device,
               int64_t stream) {
  const bool cuda = on_cuda(device, "adam_step");
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
  a.device = device;
  if (k == 0) return;
#ifdef EAC_WITH_CUDA
  if (cuda) {
    eac::adam_step_cuda(a, as_stream(stream));
    return;
  }
#endif
  (void)cuda, (void)stream;
  eac::adam_step_cpu(a);
}

void cosine_distances(int64_t v, int64_t m, int64_t d, int dtype, bool absolute, int64_t out,
                      int device, int64_t stream, int64_t workspace) {
  const bool cuda = on_cuda(device, "cosine_distances");
  if (m < 0 || d < 1) throw std::invalid_argument("cosine_distances: need M >= 0 and D >= 1");
  if (m == 0) return;
#ifdef EAC_WITH_CUDA
  if (cuda) {  // workspace: 2 * m doubles on the device
    eac::cosine_distances_cuda(as_ptr(v, "v"), m, d, to_dtype(dtype), absolute,
                               static_cast<double*>(const_cast<void*>(as_ptr(out, "out"))),
                               const_cast<void*>(as_ptr(workspace, "workspace")), device,
                               as_stream(stream));
    return;
  }
#endif
  (void)cuda, (void)stream, (void)workspace;
  eac::cosine_distances_cpu(as_ptr(v, "v"), m, d, to_dtype(dtype), absolute,
                            static_cast<double*>(const_cast<void*>(as_ptr(out, "out"))));
}

// state: the pointers of lr, best, bad, cool, live, rel, epochs, code, diverged (ops.h's order).
void plateau_step(int64_t n_students, int64_t epoch, int64_t loss,
                  const std::vector<int64_t>& state, int64_t step_lr, int step_dtype, double var_y,
                  int64_t patience, int64_t cooldown, double factor, double target, double min_lr,
                  int device, int64_t stream) {
  const bool cuda = on_cuda(device, "plateau_step");
  if (n_students < 1) throw std::invalid_argument("plateau_step: n_students must be >= 1");
  if (state.size() != 9)
    throw std::invalid_argument("plateau_step: state must hold 9 pointers, got " +
                                std::to_string(state.size()));
  auto mut = [](int64_t ptr, const char* name) { return const_cast<void*>(as_ptr(ptr, name)); };
  eac::PlateauParams p;
  p.n_students = static_cast<int>(n_students);
  p.epoch = epoch;
  p.var_y = var_y;
  p.factor = factor;
  p.target = target;
  p.min_lr = min_lr;
  p.patience = patience;
  p.cooldown = cooldown;
  p.loss = static_cast<const double*>(as_ptr(loss, "loss"));
  p.lr = static_cast<double*>(mut(state[0], "lr"));
  p.best = static_cast<double*>(mut(state[1], "best"));
  p.bad = static_cast<int64_t*>(mut(state[2], "bad"));
  p.cool = static_cast<int64_t*>(mut(state[3], "cool"));
  p.live = static_cast<uint8_t*>(mut(state[4], "live"));
  p.rel = static_cast<double*>(mut(state[5], "rel"));
  p.epochs = static_cast<int64_t*>(mut(state[6], "epochs"));
  p.code = static_cast<int64_t*>(mut(state[7], "code"));
  p.diverged = static_cast<int64_t*>(mut(state[8], "diverged"));
  p.step_lr = mut(step_lr, "step_lr");
  p.step_dtype = to_dtype(step_dtype);
  p.device = device;
#ifdef EAC_WITH_CUDA
  if (cuda) {
    eac::plateau_step_cuda(p, as_stream(stream));
    return;
  }
#endif
  (void)cuda, (void)stream;
  eac::plateau_step_cpu(p);
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

namespace eac {
namespace {
std::atomic<int> g_cuda_thin_kernel_variant{0};
}
void set_cuda_thin_kernel_variant(int variant) {
  if (variant != 0 && variant != 1)
    throw std::invalid_argument(
        "set_cuda_thin_kernel_variant: variant must be 0 (output count tested at run time) or 1 "
        "(compiled per output count), got " +
        std::to_string(variant));
  g_cuda_thin_kernel_variant.store(variant);
}
int cuda_thin_kernel_variant() { return g_cuda_thin_kernel_variant.load(); }
}  // namespace eac

PYBIND11_MODULE(_C, m) {
  m.doc() = "expand-and-cluster compiled kernels (raw-pointer API; use expand_and_cluster.ops)";
  m.attr("__version__") = EAC_VERSION;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  auto nogil = py::call_guard<py::gil_scoped_release>();
  // stream: a cudaStream_t as an integer (torch's .cuda_stream); workspace: a device pointer.
  // Both are ignored on the CPU (device < 0).
  m.def("mlp_forward", &mlp_forward, nogil, py::arg("w"), py::arg("b"), py::arg("widths"),
        py::arg("n_students"), py::arg("batch"), py::arg("x"), py::arg("out"),
        py::arg("activation"), py::arg("dtype"), py::arg("device"), py::arg("stream") = 0,
        py::arg("workspace") = 0, py::arg("workspace_bytes") = 0);
  m.def("mlp_mse_grad", &mlp_mse_grad, nogil, py::arg("w"), py::arg("b"), py::arg("widths"),
        py::arg("n_students"), py::arg("batch"), py::arg("x"), py::arg("y"), py::arg("loss"),
        py::arg("gw"), py::arg("gb"), py::arg("activation"), py::arg("dtype"), py::arg("device"),
        py::arg("stream") = 0, py::arg("workspace") = 0, py::arg("workspace_bytes") = 0);
  m.def("mlp_workspace_bytes", &mlp_workspace_bytes, nogil, py::arg("widths"),
        py::arg("n_students"), py::arg("batch"), py::arg("activation"), py::arg("dtype"),
        py::arg("device"), py::arg("grad"));
  m.def("adam_step", &adam_step, nogil, py::arg("params"), py::arg("grads"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("numel_per_student"), py::arg("n_students"), py::arg("lr"),
        py::arg("step"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("dtype"),
        py::arg("device"), py::arg("stream") = 0);
  m.def("cosine_distances", &cosine_distances, nogil, py::arg("v"), py::arg("m"), py::arg("d"),
        py::arg("dtype"), py::arg("absolute"), py::arg("out"), py::arg("device"),
        py::arg("stream") = 0, py::arg("workspace") = 0);
  m.def("plateau_step", &plateau_step, nogil, py::arg("n_students"), py::arg("epoch"),
        py::arg("loss"), py::arg("state"), py::arg("step_lr"), py::arg("step_dtype"),
        py::arg("var_y"), py::arg("patience"), py::arg("cooldown"), py::arg("factor"),
        py::arg("target"), py::arg("min_lr"), py::arg("device"), py::arg("stream") = 0);
  m.def("average_linkage", &average_linkage, nogil);
  m.def("backends", &backends);
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads);
  m.def("set_cuda_thin_kernel_variant", &eac::set_cuda_thin_kernel_variant, py::arg("variant"));
  m.def("cuda_thin_kernel_variant", &eac::cuda_thin_kernel_variant);
}
