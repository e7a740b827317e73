/* Elementwise activations and the KDA decay gate: SiLU, sigmoid, SwiGLU, and
 *   softplus form (as released): g = -exp(A_log[h]) * softplus(f + dt_bias)
 *   bounded form:                g = lower_bound * sigmoid(exp(A_log[h]) * (f + dt_bias)), lb in [-5, 0)
 * g is KDA's per-channel log decay (fp32 on the GPU). */
#pragma once
#include <stddef.h>

#include "common/real.h"

static inline real sigmoid_of(real x) { return 1 / (1 + real_exp(-x)); }
static inline real silu_of(real x) { return x * sigmoid_of(x); }
static inline real silu_derivative(real x) {
  real s = sigmoid_of(x);
  return s * (1 + x * (1 - s));
}
// log(1 + exp(x)) without overflow: for large x it is x (to within exp(-x)).
static inline real softplus_of(real x) { return x > 20 ? x : real_log1p(real_exp(x)); }

// out (n) = sigmoid(x); backward dx += dout * out * (1 - out).
void sigmoid_forward(real *out, const real *x, size_t n);
void sigmoid_backward(real *dx, const real *dout, const real *out, size_t n);

// out (n) = silu(gate) * up; backward dgate +=, dup +=.
void swiglu_forward(real *out, const real *gate, const real *up, size_t n);
void swiglu_backward(real *dgate, real *dup, const real *dout, const real *gate, const real *up, size_t n);

typedef enum { KDA_GATE_SOFTPLUS, KDA_GATE_BOUNDED } KdaGateForm;

// g (N, H, K) from f (N, H, K), A_log (H), dt_bias (H*K); lower_bound is used by the bounded form.
void kda_gate_forward(real *g, const real *f, const real *A_log, const real *dt_bias, KdaGateForm form,
                      real lower_bound, int N, int H, int K);
// df (N, H, K) +=, dA_log (H) +=, ddt_bias (H*K) +=, from dg (N, H, K).
void kda_gate_backward(real *df, real *dA_log, real *ddt_bias, const real *dg, const real *f, const real *A_log,
                       const real *dt_bias, KdaGateForm form, real lower_bound, int N, int H, int K);

#ifdef KLT_HAVE_CUDA
/* CUDA: elementwise, fp32 arithmetic. Activation gradients are overwritten; the gate's parameter
 * gradients are added (deterministic column sums). */
#include "kernels/device.h"
KLT_C_BEGIN
void sigmoid_forward_cuda(float *out, const bf16 *x, size_t n);
void sigmoid_backward_cuda(bf16 *dx, const float *dout, const float *out, size_t n);
// SwiGLU on the fused [gate | up] rows of one (2F)-wide GEMM: out[n, i] = silu(gu[n, i]) * gu[n, F + i].
void swiglu_forward_cuda(bf16 *out /*(N,F)*/, const bf16 *gate_up /*(N,2F)*/, int N, int F);
void swiglu_backward_cuda(bf16 *dgate_up /*(N,2F)*/, const bf16 *dout /*(N,F)*/, const bf16 *gate_up, int N, int F);
// g (N, H, K) fp32 from f bf16; A_log (H), dt_bias (H*K) fp32.
void kda_gate_forward_cuda(float *g, const bf16 *f, const float *A_log, const float *dt_bias, KdaGateForm form,
                           float lower_bound, int N, int H, int K);
// df overwritten (it must not overlap dg or f: the kernel reads rows ahead of its stores); dA_log (H),
// ddt_bias (H*K) +=.
void kda_gate_backward_cuda(bf16 *df, float *dA_log, float *ddt_bias, const float *dg, const bf16 *f,
                            const float *A_log, const float *dt_bias, KdaGateForm form, float lower_bound, int N,
                            int H, int K);
KLT_C_END
#endif
