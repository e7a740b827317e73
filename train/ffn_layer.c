// SwiGLU feed-forward blocks; see ffn_layer.h.
#include "train/ffn_layer.h"

#include <stdlib.h>
#include <string.h>

#include "common/check.h"

#include "kernels/activation.h"
#include "kernels/gemm.h"
#include "train/layer_params.h"

void swiglu_mlp_forward(real *out, SwigluActivations s, const real *x, const real *w_gate, const real *w_up,
                        const real *w_down, int N, int d, int F) {
  matmul_forward(s.gate, x, w_gate, N, d, F);
  matmul_forward(s.up, x, w_up, N, d, F);
  swiglu_forward(s.act, s.gate, s.up, (size_t)N * F);
  matmul_forward(out, s.act, w_down, N, F, d);
}

void swiglu_mlp_backward(real *dx, real *dw_gate, real *dw_up, real *dw_down, const real *dout, const real *x,
                         SwigluActivations s, const real *w_gate, const real *w_up, const real *w_down,
                         SwigluActivations scratch, int N, int d, int F) {
  size_t n = (size_t)N * F;
  memset(scratch.act, 0, n * sizeof(real));
  memset(scratch.gate, 0, n * sizeof(real));
  memset(scratch.up, 0, n * sizeof(real));
  matmul_backward(scratch.act, dw_down, dout, s.act, w_down, N, F, d);
  swiglu_backward(scratch.gate, scratch.up, scratch.act, s.gate, s.up, n);
  matmul_backward(dx, dw_gate, scratch.gate, x, w_gate, N, d, F);
  matmul_backward(dx, dw_up, scratch.up, x, w_up, N, d, F);
}

SwigluActivations swiglu_activations_alloc(size_t rows, int F) {
  SwigluActivations a = {klt_calloc(rows * F, sizeof(real)), klt_calloc(rows * F, sizeof(real)),
                         klt_calloc(rows * F, sizeof(real))};
  return a;
}

void swiglu_activations_free(SwigluActivations a) {
  free(a.gate);
  free(a.up);
  free(a.act);
}

void dense_ffn_init(DenseFfn *f, const ModelConfig *m, const ParamRegistry *params, int layer, int max_rows) {
  memset(f, 0, sizeof *f);
  f->d = m->hidden_size;
  f->F = m->dense_intermediate_size;
  layer_param(params, layer, "mlp.gate_proj.weight", &f->w_gate, &f->dw_gate);
  layer_param(params, layer, "mlp.up_proj.weight", &f->w_up, &f->dw_up);
  layer_param(params, layer, "mlp.down_proj.weight", &f->w_down, &f->dw_down);
  f->saved = swiglu_activations_alloc((size_t)max_rows, f->F);
  f->scratch = swiglu_activations_alloc((size_t)max_rows, f->F);
}

void dense_ffn_free(DenseFfn *f) {
  swiglu_activations_free(f->saved);
  swiglu_activations_free(f->scratch);
}

void dense_ffn_forward(DenseFfn *f, real *out, const real *x, int N) {
  f->x = x;
  f->N = N;
  swiglu_mlp_forward(out, f->saved, x, f->w_gate, f->w_up, f->w_down, N, f->d, f->F);
}

void dense_ffn_backward(DenseFfn *f, real *dx, const real *dout) {
  swiglu_mlp_backward(dx, f->dw_gate, f->dw_up, f->dw_down, dout, f->x, f->saved, f->w_gate, f->w_up, f->w_down,
                      f->scratch, f->N, f->d, f->F);
}
