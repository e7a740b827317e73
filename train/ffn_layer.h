/* SwiGLU feed-forward blocks: out = down( silu(gate(x)) * up(x) ). The same two functions serve the
 * dense FFN of the first layers, the shared expert and every routed expert (on its rows). */
#pragma once
#include <stddef.h>

#include "common/real.h"
#include "train/model_config.h"
#include "train/params.h"

// Saved for the backward, each (N, F): gate(x), up(x), and act = silu(gate(x)) * up(x).
typedef struct {
  real *gate, *up, *act;
} SwigluActivations;

// out (N, d) = act @ w_down^T, act = silu(x @ w_gate^T) * (x @ w_up^T); weights (F, d), (F, d), (d, F).
void swiglu_mlp_forward(real *out, SwigluActivations saved, const real *x, const real *w_gate, const real *w_up,
                        const real *w_down, int N, int d, int F);
// dx (N, d) += and weight gradients +=; scratch holds three (N, F) buffers.
void swiglu_mlp_backward(real *dx, real *dw_gate, real *dw_up, real *dw_down, const real *dout, const real *x,
                         SwigluActivations saved, const real *w_gate, const real *w_up, const real *w_down,
                         SwigluActivations scratch, int N, int d, int F);

// The dense FFN of a layer: its weights and activations.
typedef struct {
  int d, F;
  real *w_gate, *w_up, *w_down, *dw_gate, *dw_up, *dw_down;
  SwigluActivations saved, scratch;
  const real *x;
  int N;
} DenseFfn;

void dense_ffn_init(DenseFfn *ffn, const ModelConfig *config, const ParamRegistry *params, int layer, int max_rows);
void dense_ffn_free(DenseFfn *ffn);
void dense_ffn_forward(DenseFfn *ffn, real *out, const real *x, int N);  // x kept until the backward
void dense_ffn_backward(DenseFfn *ffn, real *dx, const real *dout);

// SwiGLU buffers of (rows, F) each.
SwigluActivations swiglu_activations_alloc(size_t rows, int F);
void swiglu_activations_free(SwigluActivations a);
