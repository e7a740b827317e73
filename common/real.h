/* The floating-point type of the CPU model code. Programs use float (the CPU path computes in fp32);
 * the test build defines KLT_FP64 so that backward passes can be checked against finite differences
 * in double precision. The same sources are compiled both ways (see cmake/KltTargets.cmake). */
#pragma once

#include <math.h>

#ifdef KLT_FP64
typedef double real;
#define REAL_EPSILON 2.220446049250313e-16
static inline real real_exp(real x) { return exp(x); }
static inline real real_log1p(real x) { return log1p(x); }
#else
typedef float real;
#define REAL_EPSILON 1.1920929e-07f
static inline real real_exp(real x) { return expf(x); }
static inline real real_log1p(real x) { return log1pf(x); }
#endif
