// The whole model's backward against finite differences in fp64: every parameter tensor sampled, on a
// tiny hybrid (KDA with several chunks and document starts, MLA, dense FFN, MoE with a shared expert).
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "tests/testing.h"
#include "train/model.h"

#define B 2
#define T 10

typedef struct {
  Model *model;
  int inputs[B * T], targets[B * T];
  unsigned char doc_start[B * T];
} ModelCase;

static double model_loss(void *p) {
  ModelCase *c = p;
  double tokens = model_forward(c->model, c->inputs, c->targets, c->doc_start, B, T, 1);
  return tokens + T * model_aux_loss(c->model);
}

static ModelConfig tiny_config(void) {
  Config config;
  config_set_defaults(&config);
  const char *overrides[] = {"model.vocab_size=11", "model.hidden_size=16", "model.num_layers=3",
                             "model.layers=kda,mla,kda", "model.first_k_dense=1", "model.dense_intermediate_size=12",
                             "model.init_std=0.3", "kda.heads=2", "kda.head_dim=4", "kda.chunk_size=4", "mla.heads=2",
                             "mla.kv_lora_rank=6", "mla.qk_nope_dim=4", "mla.qk_pe_dim=2", "mla.v_dim=3",
                             "moe.num_experts=4", "moe.experts_per_token=2", "moe.intermediate_size=8",
                             "moe.num_shared_experts=1", "moe.aux_loss_coef=0.1"};
  for (size_t i = 0; i < sizeof overrides / sizeof overrides[0]; i++) config_set_override(&config, overrides[i]);
  ModelConfig m;
  model_config_from(&m, &config);
  return m;
}

Test(model, backward_matches_finite_differences_for_every_tensor) {
  ModelConfig config = tiny_config();
  World world = {.rank = 0, .size = 1, .dp = 1, .ep = 1, .cp = 1};
  ModelCase c = {.model = model_create(&config, B, T, 7, &world)};
  uint64_t rng = 5;
  for (int i = 0; i < B * T; i++) {
    c.inputs[i] = (int)(test_rand_u64(&rng) % 11);
    c.targets[i] = (i % 7 == 3) ? -1 : (int)(test_rand_u64(&rng) % 11);  // some positions carry no loss
    c.doc_start[i] = (i % T == 0) || i == 6 || i == T + 8;               // documents inside rows and chunks
  }
  ParamRegistry *params = model_params(c.model);
  params_zero_grads(params);
  model_forward(c.model, c.inputs, c.targets, c.doc_start, B, T, 1);
  model_backward(c.model);
  real *grads = test_copy(params->grads, params->total);
  int checked = 0;
  for (int i = 0; i < params->count; i++) {
    const ParamInfo *p = &params->params[i];
    if (p->group == GROUP_NONE) continue;  // the router bias is moved by load, not by gradients
    double error = test_grad_check(model_loss, &c, params_value(params, i), grads + p->offset, p->numel, 6, 1e-6);
    cr_expect_lt(error, 1e-6, "%s: relative error %.3g", p->name, error);
    checked++;
  }
  cr_assert_gt(checked, 40);
  free(grads);
  model_free(c.model);
}

Test(model, loss_weight_scales_the_gradient_and_masked_targets_add_nothing) {
  ModelConfig config = tiny_config();
  config.aux_loss_coef = 0;  // the balance loss has a gradient of its own
  World world = {.rank = 0, .size = 1, .dp = 1, .ep = 1, .cp = 1};
  Model *model = model_create(&config, B, T, 3, &world);
  int inputs[B * T], targets[B * T];
  unsigned char doc_start[B * T] = {0};
  for (int i = 0; i < B * T; i++) {
    inputs[i] = i % 11;
    targets[i] = -1;
  }
  doc_start[0] = doc_start[T] = 1;
  ParamRegistry *params = model_params(model);
  params_zero_grads(params);
  cr_assert_eq(model_forward(model, inputs, targets, doc_start, B, T, 1), 0);
  model_backward(model);
  double norm = 0;
  for (size_t i = 0; i < params->total; i++) norm += fabs(params->grads[i]);
  cr_assert_eq(norm, 0, "no loss token, yet a gradient");
  model_free(model);
}
