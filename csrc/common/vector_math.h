// Include this first in a kernel translation unit (before any other header).
//
// glibc declares SIMD variants of tanh, exp, log1p, erf, ... (libmvec) only when __FAST_MATH__ is
// defined. We want those vector calls inside `#pragma omp simd` loops without -ffast-math (which
// would also drop NaN/Inf semantics), so we define the macro ourselves before <cmath> is seen and
// compile with -fno-math-errno. libmvec functions are accurate to a few ulp in float and double.
// libm.so links libmvec as needed, so no extra link flag is required. Other C libraries ignore
// this.
#pragma once
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__FAST_MATH__) && \
    !defined(__CUDACC__)
#define __FAST_MATH__ 1
#define EAC_FAST_MATH_DEFINED_HERE 1
#endif
#include <cmath>
#if defined(EAC_FAST_MATH_DEFINED_HERE)
#undef __FAST_MATH__
#endif
