// Which optimizer rule applies to which tensor, and the per-step QK-Clip and router-bias updates; see
// optimizer.h.
#include "train/optimizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/device.h"
#include "optim/adamw.h"
#include "optim/grad_norm.h"
#include "optim/muon.h"
#include "optim/qk_clip.h"
#include "optim/router_bias.h"
#include "train/layer_params.h"
#include "train/optimizer_gpu.h"

bool optimizer_uses_muon(const Optimizer *opt, const ParamInfo *p) {
  return p->group == GROUP_MUON && strcmp(opt->config->optim.optimizer, "muonclip") == 0;
}

bool optimizer_owned_part(const Optimizer *opt, const ParamInfo *p, size_t *begin, size_t *end) {
  *begin = p->offset > opt->owned.begin ? p->offset : opt->owned.begin;
  *end = p->offset + p->numel < opt->owned.end ? p->offset + p->numel : opt->owned.end;
  return *end > *begin;
}

bool optimizer_owns(const Optimizer *opt, const ParamInfo *p) {
  return opt->owned.begin <= p->offset && p->offset + p->numel <= opt->owned.end;
}

// The owned tensor model.layers.<layer>.<suffix> (its values), or NULL when another rank owns it.
static real *owned_layer_tensor(const Optimizer *opt, int layer, const char *suffix) {
  const ParamRegistry *r = model_params(opt->model);
  char name[160];
  snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
  int i = params_find(r, name);
  CHECK(i >= 0, "parameter %s is not registered", name);
  size_t begin, end;
  if (!optimizer_owned_part(opt, &r->params[i], &begin, &end)) return NULL;
  CHECK(optimizer_owns(opt, &r->params[i]), "QK-Clip needs %s whole on one rank, but the shard plan splits it", name);
  return params_value(r, i);
}

static bool is_embedding(const ParamInfo *p) {
  return strcmp(p->name, "model.embed_tokens.weight") == 0 || strcmp(p->name, "lm_head.weight") == 0;
}

real optimizer_decay_of(const Optimizer *opt, const ParamInfo *p) {
  const OptimSection *o = &opt->config->optim;
  if (!p->decay) return 0;
  if (p->group == GROUP_MUON && !o->decay_matrices) return 0;
  if (p->init == INIT_ONES && !o->decay_norms) return 0;
  if (is_embedding(p) && !o->decay_embeddings) return 0;
  return (real)o->weight_decay;
}

static void schedule_from_config(Schedule *s, const Config *c) {
  const StageSection *st = &c->stage;
  memset(s, 0, sizeof *s);
  int kind = schedule_parse_kind(st->schedule), shape = schedule_parse_decay_shape(st->decay_shape);
  CHECK(kind >= 0 && shape >= 0, "config accepted an unknown schedule '%s' / '%s'", st->schedule, st->decay_shape);
  s->kind = (ScheduleKind)kind;
  s->decay_shape = (DecayShape)shape;
  s->peak_lr = c->optim.lr;
  s->warmup = st->warmup;
  bool tokens = strcmp(st->schedule_unit, "tokens") == 0;
  s->total = (double)st->steps * (tokens ? (double)st->global_batch * st->seq_len : 1.0);
  s->decay_fraction = st->decay_fraction;
  s->min_lr_fraction = st->lr_floor;
  const char *problem = schedule_problem(s);
  if (problem) klt_user_error("[stage] schedule: %s", problem);
}

void optimizer_create(Optimizer *opt, Model *model, const Config *config, const World *world) {
  memset(opt, 0, sizeof *opt);
  opt->config = config;
  opt->model = model;
  opt->world = world;
  ParamRegistry *r = model_params(model);
  const int ranks = world ? world->size : 1, rank = world ? world->rank : 0;
  CHECK(!world || world->cp == 1, "the sharded optimizer covers data parallelism only (cp = %d)", world->cp);
  shard_plan_make(&opt->plan, r, ranks, strcmp(config->optim.optimizer, "muonclip") == 0, config->optim.muon_ns_steps);
  opt->owned = shard_plan_range(&opt->plan, rank);
  const size_t owned = opt->owned.end - opt->owned.begin;
  opt->state1 = klt_calloc(owned ? owned : 1, sizeof(real));
  opt->state2 = klt_calloc(owned ? owned : 1, sizeof(real));
  size_t scratch = 1;
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    if (optimizer_uses_muon(opt, p) && optimizer_owns(opt, p)) {
      size_t need = muon_scratch_elements((int)p->shape[0], (int)p->shape[1]);
      if (need > scratch) scratch = need;
    }
  }
  opt->scratch = klt_calloc(scratch, sizeof(real));
  opt->grad_scale = 1;
  schedule_from_config(&opt->schedule, config);
#ifdef KLT_HAVE_CUDA
  if (model_on_gpu(model)) {
    opt->device_state1 = device_alloc((owned ? owned : 1) * sizeof(float));
    opt->device_state2 = device_alloc((owned ? owned : 1) * sizeof(float));
    device_zero(opt->device_state1, (owned ? owned : 1) * sizeof(float));
    device_zero(opt->device_state2, (owned ? owned : 1) * sizeof(float));
    opt->device_norm = device_alloc(sizeof(double));
  }
#endif
}

// The host registry and states hold `real`; the device fp32.
static void states_transfer(Optimizer *opt, bool to_device) {
#ifdef KLT_HAVE_CUDA
  if (!opt->device_state1) return;
  size_t n = opt->owned.end - opt->owned.begin;
  float *staging = klt_malloc((n ? n : 1) * sizeof(float));
  real *host[2] = {opt->state1, opt->state2};
  float *device[2] = {opt->device_state1, opt->device_state2};
  for (int i = 0; i < 2; i++) {
    if (to_device) {
      for (size_t j = 0; j < n; j++) staging[j] = (float)host[i][j];
      device_upload(device[i], staging, n * sizeof(float));
    } else {
      device_download(staging, device[i], n * sizeof(float));
      for (size_t j = 0; j < n; j++) host[i][j] = (real)staging[j];
    }
  }
  free(staging);
#endif
  if (to_device) model_weights_to_device(opt->model);
  else model_weights_to_host(opt->model);
}
void optimizer_state_to_host(Optimizer *opt) { states_transfer(opt, false); }
void optimizer_state_to_device(Optimizer *opt) { states_transfer(opt, true); }

void optimizer_free(Optimizer *opt) {
#ifdef KLT_HAVE_CUDA
  optimizer_free_gpu(opt);
  device_free(opt->device_state1);
  device_free(opt->device_state2);
  device_free(opt->device_norm);
#endif
  shard_plan_free(&opt->plan);
  free(opt->state1);
  free(opt->state2);
  free(opt->scratch);
}

// The rate of step s is the schedule's value at the end of that step (tokens including its batch),
// so the first step of a warmup already moves the weights.
double optimizer_position(const Optimizer *opt, long step) {
  const StageSection *st = &opt->config->stage;
  bool tokens = strcmp(st->schedule_unit, "tokens") == 0;
  return (double)(step + 1) * (tokens ? (double)st->global_batch * st->seq_len : 1.0);
}

void optimizer_reduce_gradients(Optimizer *opt) {
  if (!opt->world || opt->world->size == 1) return;
#ifdef KLT_HAVE_CUDA
  if (model_on_gpu(opt->model)) return optimizer_reduce_gradients_gpu(opt);
#endif
  world_reduce_ranges_reals(opt->world, model_params(opt->model)->grads, opt->plan.cuts);
}

double optimizer_grad_norm_squared(Optimizer *opt) {
  double sum;
#ifdef KLT_HAVE_CUDA
  if (model_on_gpu(opt->model)) sum = optimizer_grad_norm_squared_gpu(opt);
  else
#endif
    sum = grad_norm_squared(model_params(opt->model)->grads + opt->owned.begin, opt->owned.end - opt->owned.begin);
  if (opt->world) world_sum_doubles(opt->world, &sum, 1);
  return sum;
}

OptimizerReport optimizer_step(Optimizer *opt, double position) {
  const OptimSection *o = &opt->config->optim;
  ParamRegistry *r = model_params(opt->model);
  const ModelConfig *mc = model_config(opt->model);
  OptimizerReport report = {0};
  report.lr = schedule_lr(&opt->schedule, position);
  real lr = (real)report.lr;
  opt->step++;
  MuonConfig muon = {.momentum = (real)o->muon_momentum, .nesterov = o->muon_nesterov, .ns_steps = o->muon_ns_steps};
  AdamWConfig adamw = {.beta1 = (real)o->adam_beta1, .beta2 = (real)o->adam_beta2, .eps = (real)o->adam_eps};
#ifdef KLT_HAVE_CUDA
  if (model_on_gpu(opt->model)) {
    report.clipped_heads = optimizer_update_gpu(opt, &muon, &adamw, lr, &report.max_logit);
    goto balance;
  }
#endif
  const ArenaRange own = opt->owned;
  if (opt->grad_scale != 1)
    for (size_t i = own.begin; i < own.end; i++) r->grads[i] *= opt->grad_scale;
  // The owned range: whole Muon matrices (the plan never splits one), any part of the others.
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    size_t begin, end;
    if (p->group == GROUP_NONE || !optimizer_owned_part(opt, p, &begin, &end)) continue;
    real *w = r->values + begin, *g = r->grads + begin;
    real *s1 = opt->state1 + (begin - own.begin), *s2 = opt->state2 + (begin - own.begin);
    if (optimizer_uses_muon(opt, p)) {
      CHECK(optimizer_owns(opt, p), "the shard plan splits the Muon matrix %s", p->name);
      muon.weight_decay = optimizer_decay_of(opt, p);
      muon_step(w, s1, g, (int)p->shape[0], (int)p->shape[1], &muon, lr, opt->scratch);
    } else {
      adamw.weight_decay = optimizer_decay_of(opt, p);
      adamw_step(w, s1, s2, g, end - begin, &adamw, lr, opt->step);
    }
  }
  // QK-Clip on every MLA layer from the step's (already reduced) maximum logits, on the owned ones of
  // q_proj and kv_b_proj (every rank counts the clipped heads alike).
  report.max_logit = -INFINITY;
  for (int l = 0; l < mc->num_layers; l++) {
    real *max_logit = model_max_logits(opt->model, l);
    if (!max_logit) continue;
    for (int h = 0; h < mc->mla_heads; h++)
      if (max_logit[h] > report.max_logit) report.max_logit = max_logit[h];
    if (o->qk_clip_tau <= 0 || strcmp(o->optimizer, "muonclip") != 0) continue;
    real *q_proj = owned_layer_tensor(opt, l, "self_attn.q_proj.weight");
    real *kv_b_proj = owned_layer_tensor(opt, l, "self_attn.kv_b_proj.weight");
    report.clipped_heads += qk_clip_apply(q_proj, kv_b_proj, max_logit, (real)o->qk_clip_tau, mc->mla_heads,
                                          mc->qk_nope_dim, mc->qk_pe_dim, mc->v_dim, mc->hidden_size,
                                          mc->kv_lora_rank);
  }
  // Every rank's new weights to every rank.
  if (opt->world) world_all_gather_ranges_reals(opt->world, r->values, opt->plan.cuts);
  // Aux-loss-free balancing from the step's (already reduced) expert loads, on every rank alike.
#ifdef KLT_HAVE_CUDA
balance:
#endif
  report.load_imbalance = 0;
  for (int l = 0; l < mc->num_layers; l++) {
    double *load = model_expert_load(opt->model, l);
    if (!load) continue;
    double imbalance = load_imbalance(load, mc->num_experts);
    if (imbalance > report.load_imbalance) report.load_imbalance = imbalance;
    real *bias, *unused;
    layer_param(r, l, "block_sparse_moe.gate.e_score_correction_bias", &bias, &unused);
    router_bias_update(bias, load, mc->num_experts, (real)opt->config->moe.bias_update_rate);
#ifdef KLT_HAVE_CUDA
    if (model_on_gpu(opt->model)) optimizer_upload_router_bias_gpu(opt, l, bias);
#endif
  }
  return report;
}
