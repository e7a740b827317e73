// Activations, the KDA gate in both forms and the short convolution: forwards against the formulas,
// backwards against finite differences, document starts, and no inf/NaN at extreme inputs.
#include <criterion/criterion.h>

#include "kernels/activation.h"
#include "kernels/conv.h"
#include "tests/testing.h"

#define N 4
#define H 2
#define K 3

typedef struct {
  real *f, *A_log, *dt_bias, *g, *w;
  KdaGateForm form;
  real lower_bound;
} GateCase;

static double gate_loss(void *p) {
  GateCase *c = p;
  kda_gate_forward(c->g, c->f, c->A_log, c->dt_bias, c->form, c->lower_bound, N, H, K);
  return test_dot(c->g, c->w, N * H * K);
}

Test(activation, kda_gate_both_forms) {
  for (int form = 0; form < 2; form++) {
    uint64_t rng = 7 + form;
    GateCase c = {.f = test_alloc(N * H * K), .A_log = test_alloc(H), .dt_bias = test_alloc(H * K),
                  .g = test_alloc(N * H * K), .w = test_alloc(N * H * K), .form = (KdaGateForm)form,
                  .lower_bound = -5};
    test_fill_normal(c.f, N * H * K, 2, &rng);
    test_fill_uniform(c.A_log, H, 0, log(16), &rng);
    test_fill_normal(c.dt_bias, H * K, 1, &rng);
    test_fill_normal(c.w, N * H * K, 1, &rng);
    gate_loss(&c);
    for (int n = 0; n < N; n++)
      for (int h = 0; h < H; h++)
        for (int k = 0; k < K; k++) {
          int i = (n * H + h) * K + k;
          double u = c.f[i] + c.dt_bias[h * K + k], a = exp(c.A_log[h]);
          double expect = form == KDA_GATE_SOFTPLUS ? -a * log1p(exp(u)) : -5 / (1 + exp(-a * u));
          cr_assert_float_eq(c.g[i], expect, 1e-12);
          cr_assert_leq(c.g[i], 0);
        }
    real *df = test_alloc(N * H * K), *dA = test_alloc(H), *ddt = test_alloc(H * K);
    kda_gate_backward(df, dA, ddt, c.w, c.f, c.A_log, c.dt_bias, c.form, c.lower_bound, N, H, K);
    cr_assert_lt(test_grad_check(gate_loss, &c, c.f, df, N * H * K, 100, 1e-6), 1e-6, "form %d df", form);
    cr_assert_lt(test_grad_check(gate_loss, &c, c.A_log, dA, H, 100, 1e-6), 1e-6, "form %d dA_log", form);
    cr_assert_lt(test_grad_check(gate_loss, &c, c.dt_bias, ddt, H * K, 100, 1e-6), 1e-6, "form %d ddt_bias", form);
    // Extreme inputs give finite gates and gradients.
    for (int i = 0; i < N * H * K; i++) c.f[i] = (i % 2 ? 1e4 : -1e4);
    gate_loss(&c);
    kda_gate_backward(df, dA, ddt, c.w, c.f, c.A_log, c.dt_bias, c.form, c.lower_bound, N, H, K);
    for (int i = 0; i < N * H * K; i++) cr_assert(isfinite(c.g[i]) && isfinite(df[i]), "form %d index %d", form, i);
  }
}

typedef struct {
  real *gate, *up, *out, *w;
  size_t n;
} SwigluCase;

static double swiglu_loss(void *p) {
  SwigluCase *c = p;
  swiglu_forward(c->out, c->gate, c->up, c->n);
  return test_dot(c->out, c->w, c->n);
}

static double sigmoid_loss(void *p) {
  SwigluCase *c = p;
  sigmoid_forward(c->out, c->gate, c->n);
  return test_dot(c->out, c->w, c->n);
}

Test(activation, swiglu_and_sigmoid) {
  uint64_t rng = 3;
  SwigluCase c = {.gate = test_alloc(20), .up = test_alloc(20), .out = test_alloc(20), .w = test_alloc(20), .n = 20};
  test_fill_normal(c.gate, 20, 3, &rng);
  test_fill_normal(c.up, 20, 1, &rng);
  test_fill_normal(c.w, 20, 1, &rng);
  swiglu_loss(&c);
  for (int i = 0; i < 20; i++) cr_assert_float_eq(c.out[i], c.gate[i] / (1 + exp(-c.gate[i])) * c.up[i], 1e-12);
  real *dgate = test_alloc(20), *dup = test_alloc(20);
  swiglu_backward(dgate, dup, c.w, c.gate, c.up, 20);
  cr_assert_lt(test_grad_check(swiglu_loss, &c, c.gate, dgate, 20, 100, 1e-6), 1e-6);
  cr_assert_lt(test_grad_check(swiglu_loss, &c, c.up, dup, 20, 100, 1e-6), 1e-6);
  sigmoid_loss(&c);
  real *dx = test_alloc(20);
  sigmoid_backward(dx, c.w, c.out, 20);
  cr_assert_lt(test_grad_check(sigmoid_loss, &c, c.gate, dx, 20, 100, 1e-6), 1e-6);
}

#define B 2
#define T 9
#define C 3
#define W 4

typedef struct {
  real *x, *weight, *out, *pre, *w;
  unsigned char doc_start[B * T];
  int T_used;
} ConvCase;

static double conv_loss(void *p) {
  ConvCase *c = p;
  short_conv_silu_forward(c->out, c->pre, c->x, c->weight, c->doc_start, B, c->T_used, C, W);
  return test_dot(c->out, c->w, (size_t)B * c->T_used * C);
}

static ConvCase make_conv(int T_used) {
  uint64_t rng = 12;
  ConvCase c = {.x = test_alloc(B * T * C), .weight = test_alloc(C * W), .out = test_alloc(B * T * C),
                .pre = test_alloc(B * T * C), .w = test_alloc(B * T * C), .T_used = T_used};
  test_fill_normal(c.x, B * T * C, 1, &rng);
  test_fill_normal(c.weight, C * W, 1, &rng);
  test_fill_normal(c.w, B * T * C, 1, &rng);
  for (int b = 0; b < B; b++) c.doc_start[b * T_used] = 1;
  if (T_used > 5) c.doc_start[5] = 1;  // row 0: documents [0, 5) and [5, T)
  return c;
}

Test(activation, short_conv_respects_documents_and_matches_finite_differences) {
  int lengths[] = {T, 2};  // T < W too
  for (int trial = 0; trial < 2; trial++) {
    int Tu = lengths[trial];
    ConvCase c = make_conv(Tu);
    conv_loss(&c);
    for (int b = 0; b < B; b++)
      for (int t = 0; t < Tu; t++) {
        int begin = (b == 0 && Tu > 5 && t >= 5) ? 5 : 0;
        for (int ch = 0; ch < C; ch++) {
          double sum = 0;
          for (int j = 0; j < W; j++) {
            int s = t - (W - 1) + j;
            if (s >= begin) sum += c.weight[ch * W + j] * c.x[(b * Tu + s) * C + ch];
          }
          cr_assert_float_eq(c.out[(b * Tu + t) * C + ch], sum / (1 + exp(-sum)), 1e-12);
        }
      }
    real *dx = test_alloc(B * T * C), *dw = test_alloc(C * W);
    short_conv_silu_backward(dx, dw, c.w, c.x, c.weight, c.pre, c.doc_start, B, Tu, C, W);
    cr_assert_lt(test_grad_check(conv_loss, &c, c.x, dx, (size_t)B * Tu * C, 200, 1e-6), 1e-6, "T=%d dx", Tu);
    cr_assert_lt(test_grad_check(conv_loss, &c, c.weight, dw, C * W, 200, 1e-6), 1e-6, "T=%d dweight", Tu);
  }
}

Test(activation, short_conv_output_of_a_document_ignores_earlier_documents) {
  ConvCase a = make_conv(T), b = make_conv(T);
  for (int i = 0; i < 5 * C; i++) b.x[i] += 10;  // change only row 0's first document
  conv_loss(&a);
  conv_loss(&b);
  for (int i = 5 * C; i < T * C; i++) cr_assert_eq(a.out[i], b.out[i], "position %d saw the previous document", i / C);
}
