// The optimizer's updates on the GPU; see optimizer_gpu.h.
#ifdef KLT_HAVE_CUDA
#include "train/optimizer_gpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "optim/qk_clip.h"
#include "train/gpu_layers.h"
#include "train/model_gpu.h"

// Expert e's tensor of a MoE layer: "model.layers.L.block_sparse_moe.experts.E.<rest>". Sets *expert.
static bool expert_of(const char *name, int *expert, const char **rest) {
  const char *p = strstr(name, ".experts.");
  if (!p) return false;
  p += strlen(".experts.");
  char *end;
  long e = strtol(p, &end, 10);
  if (end == p || *end != '.') return false;
  *expert = (int)e;
  *rest = end;
  return true;
}

int optimizer_update_gpu(Optimizer *opt, MuonConfig *muon, AdamWConfig *adamw, real lr, double *max_logit) {
  const OptimSection *o = &opt->config->optim;
  ParamRegistry *r = model_params(opt->model);
  const ModelConfig *mc = model_config(opt->model);
  GpuModel *gm = model_gpu(opt->model);
  GpuParams *gp = gpu_model_params(gm);
  const float scale = (float)opt->grad_scale;
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    if (p->group == GROUP_NONE) continue;
    float *w = gp->master + p->offset, *g = gp->grads + p->offset;
    float *s1 = opt->device_state1 + p->offset, *s2 = opt->device_state2 + p->offset;
    if (optimizer_uses_muon(opt, p)) {
      // A layer's experts have equal shapes at a fixed stride: one batched call from expert 0.
      int expert, batch = 1;
      long long stride = 0;
      const char *rest;
      if (expert_of(p->name, &expert, &rest)) {
        if (expert > 0) continue;
        batch = mc->num_experts;
        if (batch > 1) {
          char next[160];
          snprintf(next, sizeof next, "%.*s1%s", (int)(strstr(p->name, ".experts.") - p->name + 9), p->name, rest);
          int j = params_find(r, next);
          CHECK(j >= 0, "expert tensor %s is not registered", next);
          stride = (long long)(r->params[j].offset - p->offset);
        }
      }
      muon->weight_decay = optimizer_decay_of(opt, p);
      muon_step_cuda(w, s1, g, (int)p->shape[0], (int)p->shape[1], stride, batch, muon, (float)lr, scale);
    } else {
      adamw->weight_decay = optimizer_decay_of(opt, p);
      adamw_step_cuda(w, s1, s2, g, p->numel, adamw, (float)lr, opt->step, scale);
    }
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
    GpuTensor q_proj = gpu_param(gp, l, "self_attn.q_proj.weight");
    GpuTensor kv_b_proj = gpu_param(gp, l, "self_attn.kv_b_proj.weight");
    clipped += qk_clip_apply_cuda(q_proj.master, kv_b_proj.master, host_max, (float)o->qk_clip_tau, mc->mla_heads,
                                  mc->qk_nope_dim, mc->qk_pe_dim, mc->v_dim, mc->hidden_size, mc->kv_lora_rank);
  }
  gpu_model_refresh_bf16(gm);
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
