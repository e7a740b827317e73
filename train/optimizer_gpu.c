// The optimizer's updates on the GPU; see optimizer_gpu.h.
#ifdef KLT_HAVE_CUDA
#include "train/optimizer_gpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "dist/comm.h"
#include "optim/grad_norm.h"
#include "optim/qk_clip.h"
#include "train/gpu_layers.h"
#include "train/model_gpu.h"

// Every owned Muon matrix of one shape and weight decay in the model (all experts of all layers, all
// layers' q projections, ...): one batched muon_step_cuda call each.
typedef struct {
  int rows, cols;
  real decay;
  int count;
  long long *offsets;  // (count) on the device: element offsets from the owned range's start (the
                       // arenas' and the range-sized momentum's alike)
} MuonGroup;

struct MuonGroups {
  int count;
  MuonGroup *groups;
};

// Groups in the registry's order of first appearance, so the plan (and the step) is deterministic.
static struct MuonGroups *muon_groups_plan(const Optimizer *opt) {
  const ParamRegistry *r = model_params(opt->model);
  struct MuonGroups *plan = klt_calloc(1, sizeof *plan);
  plan->groups = klt_calloc((size_t)r->count, sizeof(MuonGroup));
  long long *host = klt_malloc((size_t)r->count * sizeof(long long));
  int *member_of = klt_malloc((size_t)r->count * sizeof(int));
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    member_of[i] = -1;
    if (p->group == GROUP_NONE || !optimizer_uses_muon(opt, p) || !optimizer_owns(opt, p)) continue;
    const real decay = optimizer_decay_of(opt, p);
    int g = 0;
    while (g < plan->count && !(plan->groups[g].rows == (int)p->shape[0] && plan->groups[g].cols == (int)p->shape[1] &&
                                plan->groups[g].decay == decay))
      g++;
    if (g == plan->count) plan->groups[plan->count++] = (MuonGroup){(int)p->shape[0], (int)p->shape[1], decay, 0, NULL};
    plan->groups[g].count++;
    member_of[i] = g;
  }
  for (int g = 0; g < plan->count; g++) {
    int n = 0;
    for (int i = 0; i < r->count; i++)
      if (member_of[i] == g) host[n++] = (long long)(r->params[i].offset - opt->owned.begin);
    plan->groups[g].offsets = device_alloc((size_t)n * sizeof(long long));
    device_upload(plan->groups[g].offsets, host, (size_t)n * sizeof(long long));
  }
  free(host);
  free(member_of);
  return plan;
}

void optimizer_free_gpu(Optimizer *opt) {
  struct MuonGroups *plan = opt->muon_groups;
  if (!plan) return;
  for (int g = 0; g < plan->count; g++) device_free(plan->groups[g].offsets);
  free(plan->groups);
  free(plan);
  opt->muon_groups = NULL;
}

// The bf16 copy of model.layers.<layer>.<suffix> from its fp32 master.
static void refresh_bf16(const GpuParams *gp, int layer, const char *suffix) {
  char name[256];
  snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
  int i = params_find(gp->registry, name);
  CHECK(i >= 0, "%s is not registered", name);
  const ParamInfo *p = &gp->registry->params[i];
  device_float_to_bf16(gp->weights + p->offset, gp->master + p->offset, p->numel);
}

void optimizer_reduce_gradients_gpu(Optimizer *opt) {
  comm_reduce_ranges_sum(opt->world->comm, COMM_WORLD, gpu_model_params(model_gpu(opt->model))->grads, opt->plan.cuts);
}

double optimizer_grad_norm_squared_gpu(Optimizer *opt) {
  const GpuParams *gp = gpu_model_params(model_gpu(opt->model));
  grad_norm_squared_cuda(opt->device_norm, gp->grads + opt->owned.begin, opt->owned.end - opt->owned.begin, false);
  double result = 0;
  device_download(&result, opt->device_norm, sizeof result);
  return result;
}

// The owned tensor model.layers.<layer>.<suffix> on the device, or false when another rank owns it.
static bool owned_gpu_param(const Optimizer *opt, const GpuParams *gp, int layer, const char *suffix, GpuTensor *t) {
  char name[256];
  snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
  int i = params_find(gp->registry, name);
  CHECK(i >= 0, "%s is not registered", name);
  size_t begin, end;
  if (!optimizer_owned_part(opt, &gp->registry->params[i], &begin, &end)) return false;
  CHECK(optimizer_owns(opt, &gp->registry->params[i]), "QK-Clip needs %s whole on one rank, but the shard plan splits it",
        name);
  *t = gpu_param(gp, layer, suffix);
  return true;
}

int optimizer_update_gpu(Optimizer *opt, MuonConfig *muon, AdamWConfig *adamw, real lr, double *max_logit) {
  const OptimSection *o = &opt->config->optim;
  ParamRegistry *r = model_params(opt->model);
  const ModelConfig *mc = model_config(opt->model);
  GpuParams *gp = gpu_model_params(model_gpu(opt->model));
  const float scale = (float)opt->grad_scale;
  const ArenaRange own = opt->owned;
  if (!opt->muon_groups) opt->muon_groups = muon_groups_plan(opt);
  // The owned range: whole Muon matrices batched by shape (offsets from own.begin), any part of the others.
  for (int g = 0; g < opt->muon_groups->count; g++) {
    const MuonGroup *group = &opt->muon_groups->groups[g];
    muon->weight_decay = group->decay;
    muon_step_cuda(gp->master + own.begin, gp->weights + own.begin, opt->device_state1, gp->grads + own.begin,
                   group->offsets, group->rows, group->cols, group->count, muon, (float)lr, scale);
  }
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    size_t begin, end;
    if (p->group == GROUP_NONE || optimizer_uses_muon(opt, p) || !optimizer_owned_part(opt, p, &begin, &end)) continue;
    adamw->weight_decay = optimizer_decay_of(opt, p);
    adamw_step_cuda(gp->master + begin, gp->weights + begin, opt->device_state1 + (begin - own.begin),
                    opt->device_state2 + (begin - own.begin), gp->grads + begin, end - begin, adamw, (float)lr,
                    opt->step, scale);
  }
  int clipped = 0;
  *max_logit = -INFINITY;
  for (int l = 0; l < mc->num_layers; l++) {
    real *layer_max = model_max_logits(opt->model, l);
    if (!layer_max) continue;
    float host_max[256];
    for (int h = 0; h < mc->mla_heads; h++) {
      host_max[h] = (float)layer_max[h];
      if (layer_max[h] > *max_logit) *max_logit = layer_max[h];
    }
    if (o->qk_clip_tau <= 0 || strcmp(o->optimizer, "muonclip") != 0) continue;
    GpuTensor q_proj, kv_b_proj;
    bool own_q = owned_gpu_param(opt, gp, l, "self_attn.q_proj.weight", &q_proj);
    bool own_kv = owned_gpu_param(opt, gp, l, "self_attn.kv_b_proj.weight", &kv_b_proj);
    int heads = qk_clip_apply_cuda(own_q ? q_proj.master : NULL, own_kv ? kv_b_proj.master : NULL, host_max,
                                   (float)o->qk_clip_tau, mc->mla_heads, mc->qk_nope_dim, mc->qk_pe_dim, mc->v_dim,
                                   mc->hidden_size, mc->kv_lora_rank);
    if (heads > 0) {  // the clipped masters' bf16 copies (the updates above wrote all others)
      if (own_q) refresh_bf16(gp, l, "self_attn.q_proj.weight");
      if (own_kv) refresh_bf16(gp, l, "self_attn.kv_b_proj.weight");
    }
    clipped += heads;
  }
  // Every rank's new fp32 masters to every rank (the norms, gates and biases are read from the masters),
  // then the bf16 copies of the other ranks' ranges from them: the updates round the same way
  // (__float2bfloat16), so this equals gathering the bf16 copies too, for 4 bytes per weight instead of 6.
  if (opt->world && opt->world->size > 1) {
    comm_all_gather_ranges(opt->world->comm, COMM_WORLD, gp->master, opt->plan.cuts, sizeof(float));
    device_float_to_bf16(gp->weights, gp->master, own.begin);
    device_float_to_bf16(gp->weights + own.end, gp->master + own.end, r->total - own.end);
  }
  return clipped;
}

void optimizer_upload_router_bias_gpu(Optimizer *opt, int layer, const real *bias) {
  const ModelConfig *mc = model_config(opt->model);
  GpuTensor t = gpu_param(gpu_model_params(model_gpu(opt->model)), layer,
                          "block_sparse_moe.gate.e_score_correction_bias");
  float values[4096];
  CHECK(mc->num_experts <= 4096, "more than 4096 experts");
  for (int e = 0; e < mc->num_experts; e++) values[e] = (float)bias[e];
  device_upload(t.master, values, (size_t)mc->num_experts * sizeof(float));
}
#endif
