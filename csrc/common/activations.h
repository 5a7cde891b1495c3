// Activation functions and their derivatives, once for host and device, templated on the scalar.
// The numbering of Act matches expand_and_cluster.activations (the `code` field).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define EAC_HD __host__ __device__ __forceinline__
#else
#define EAC_HD inline
#endif

namespace eac {

enum class Act : int {
  Identity = 0,
  Relu = 1,
  LeakyRelu = 2,  // negative slope 0.01, as torch.nn.functional.leaky_relu
  Tanh = 3,
  Sigmoid = 4,
  Softplus = 5,  // log(1 + e^z), computed stably (no threshold, unlike torch's default)
  Gelu = 6,      // exact (erf) form, as torch.nn.functional.gelu's default
  Silu = 7,
  G = 8,  // g(z) = sigmoid(4z) + softplus(z), the paper's activation without symmetry
};
constexpr int kNumActivations = 9;

// sigmoid(z) given e = exp(-|z|) (shared with softplus' log1p(e) where both are needed).
template <typename T>
EAC_HD T sigmoid_from_exp(T z, T e) {
  T p = T(1) / (T(1) + e);
  return z >= T(0) ? p : e * p;
}

template <typename T>
EAC_HD T sigmoid_stable(T z) {
  // e = exp(-|z|) never overflows; both branches are computed so the loop stays vectorisable.
  return sigmoid_from_exp(z, std::exp(-std::fabs(z)));
}

// log(1 + e^z) given e = exp(-|z|).
template <typename T>
EAC_HD T softplus_from_exp(T z, T e) {
  return (z > T(0) ? z : T(0)) + std::log1p(e);
}

template <typename T>
EAC_HD T softplus_stable(T z) {
  return softplus_from_exp(z, std::exp(-std::fabs(z)));
}

template <Act A, typename T>
struct ActOp;

template <typename T>
struct ActOp<Act::Identity, T> {
  static EAC_HD T f(T z) { return z; }
  static EAC_HD T df(T, T) { return T(1); }
};
template <typename T>
struct ActOp<Act::Relu, T> {
  static EAC_HD T f(T z) { return z > T(0) ? z : T(0); }
  static EAC_HD T df(T z, T) { return z > T(0) ? T(1) : T(0); }
};
template <typename T>
struct ActOp<Act::LeakyRelu, T> {
  static EAC_HD T f(T z) { return z > T(0) ? z : T(0.01) * z; }
  static EAC_HD T df(T z, T) { return z > T(0) ? T(1) : T(0.01); }
};
template <typename T>
struct ActOp<Act::Tanh, T> {
  static EAC_HD T f(T z) { return std::tanh(z); }
  static EAC_HD T df(T, T a) { return T(1) - a * a; }  // reuses the stored output
};
template <typename T>
struct ActOp<Act::Sigmoid, T> {
  static EAC_HD T f(T z) { return sigmoid_stable(z); }
  static EAC_HD T df(T, T a) { return a * (T(1) - a); }
};
template <typename T>
struct ActOp<Act::Softplus, T> {
  static EAC_HD T f(T z) { return softplus_stable(z); }
  static EAC_HD T df(T z, T) { return sigmoid_stable(z); }
};
template <typename T>
struct ActOp<Act::Gelu, T> {
  static EAC_HD T f(T z) { return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440))); }
  static EAC_HD T df(T z, T) {
    const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * z * z);
    return cdf + z * pdf;
  }
};
template <typename T>
struct ActOp<Act::Silu, T> {
  static EAC_HD T f(T z) { return z * sigmoid_stable(z); }
  static EAC_HD T df(T z, T) {
    const T s = sigmoid_stable(z);
    return s * (T(1) + z * (T(1) - s));
  }
};
template <typename T>
struct ActOp<Act::G, T> {
  static EAC_HD T f(T z) { return sigmoid_stable(T(4) * z) + softplus_stable(z); }
  static EAC_HD T df(T z, T) {
    const T s4 = sigmoid_stable(T(4) * z);
    return T(4) * s4 * (T(1) - s4) + sigmoid_stable(z);
  }
};

// Whether the activation's derivative reads the pre-activation z (ActOp<A, T>::df(z, a)) rather
// than only the activation a = f(z): a kernel that keeps a for the backward pass needs to keep z
// too only where this is true. Usable at compile time (template arguments, if constexpr) and at
// run time.
EAC_HD constexpr bool df_needs_z(Act a) {
  return !(a == Act::Identity || a == Act::Tanh || a == Act::Sigmoid);
}

// a = f(z) and d = f'(z) in one pass, for kernels that store the derivative in the forward pass
// (csrc/cpu/mlp.cpp). Where f and f' share an exponential or erf it is computed once; the values
// are those of ActOp<A, T>::f and ::df bit for bit (the same operations on the same operands).
template <Act A, typename T>
struct ActFdf {
  static EAC_HD void run(T z, T& a, T& d) {
    a = ActOp<A, T>::f(z);
    d = ActOp<A, T>::df(z, a);
  }
};
template <typename T>
struct ActFdf<Act::Softplus, T> {
  static EAC_HD void run(T z, T& a, T& d) {
    const T e = std::exp(-std::fabs(z));
    a = softplus_from_exp(z, e);
    d = sigmoid_from_exp(z, e);
  }
};
template <typename T>
struct ActFdf<Act::Gelu, T> {
  static EAC_HD void run(T z, T& a, T& d) {
    const T er = std::erf(z * T(0.70710678118654752440));
    a = T(0.5) * z * (T(1) + er);
    const T cdf = T(0.5) * (T(1) + er);
    const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * z * z);
    d = cdf + z * pdf;
  }
};
template <typename T>
struct ActFdf<Act::Silu, T> {
  static EAC_HD void run(T z, T& a, T& d) {
    const T s = sigmoid_stable(z);
    a = z * s;
    d = s * (T(1) + z * (T(1) - s));
  }
};
template <typename T>
struct ActFdf<Act::G, T> {
  static EAC_HD void run(T z, T& a, T& d) {
    const T s4 = sigmoid_stable(T(4) * z);
    const T e = std::exp(-std::fabs(z));
    a = s4 + softplus_from_exp(z, e);
    d = T(4) * s4 * (T(1) - s4) + sigmoid_from_exp(z, e);
  }
};

}  // namespace eac
