// Model shapes, parameter registration (Hugging Face names) and counts; see model_config.h.
#include "train/model_config.h"

#include <stdio.h>
#include <string.h>

#include "common/check.h"

void model_config_from(ModelConfig *m, const Config *c) {
  memset(m, 0, sizeof *m);
  config_validate(c);
  m->vocab_size = c->model.vocab_size;
  m->hidden_size = c->model.hidden_size;
  m->num_layers = c->model.num_layers;
  if (m->num_layers > MODEL_MAX_LAYERS)
    klt_user_error("[model] num_layers = %d exceeds the supported %d", m->num_layers, MODEL_MAX_LAYERS);
  for (int l = 0; l < m->num_layers; l++) m->layer_is_mla[l] = config_layer_is_mla(c, l);
  m->first_k_dense = c->model.first_k_dense;
  m->dense_intermediate_size = c->model.dense_intermediate_size;
  m->rms_norm_eps = c->model.rms_norm_eps;
  m->init_std = c->model.init_std;
  m->kda_heads = c->kda.heads;
  m->kda_head_dim = c->kda.head_dim;
  m->conv_size = c->kda.conv_size;
  m->chunk_size = c->kda.chunk_size;
  m->gate_bounded = strcmp(c->kda.gate, "bounded") == 0;
  m->gate_lower_bound = c->kda.gate_lower_bound;
  m->mla_heads = c->mla.heads;
  m->kv_lora_rank = c->mla.kv_lora_rank;
  m->qk_nope_dim = c->mla.qk_nope_dim;
  m->qk_pe_dim = c->mla.qk_pe_dim;
  m->v_dim = c->mla.v_dim;
  m->num_experts = c->moe.num_experts;
  m->experts_per_token = c->moe.experts_per_token;
  m->num_shared_experts = c->moe.num_shared_experts;
  m->expert_intermediate_size = c->moe.intermediate_size;
  m->routed_scaling_factor = c->moe.routed_scaling_factor;
  m->aux_loss_coef = c->moe.aux_loss_coef;
}

// A matrix trained by Muon, decayed, normal init.
static void add_linear(ParamRegistry *r, const char *name, int64_t out, int64_t in, bool active) {
  params_add(r, name, out, in, 0, 0, GROUP_MUON, true, INIT_NORMAL, active);
}

static void add_swiglu(ParamRegistry *r, const char *prefix, const char *gate, const char *up, const char *down,
                       int64_t d, int64_t width, bool active) {
  char name[160];
  snprintf(name, sizeof name, "%s.%s.weight", prefix, gate);
  add_linear(r, name, width, d, active);
  snprintf(name, sizeof name, "%s.%s.weight", prefix, up);
  add_linear(r, name, width, d, active);
  snprintf(name, sizeof name, "%s.%s.weight", prefix, down);
  add_linear(r, name, d, width, active);
}

void model_register_params(const ModelConfig *m, ParamRegistry *r) {
  const int64_t d = m->hidden_size;
  char name[160];
  params_add(r, "model.embed_tokens.weight", m->vocab_size, d, 0, 0, GROUP_ADAMW, true, INIT_NORMAL, true);
  for (int l = 0; l < m->num_layers; l++) {
#define NAME(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
    params_add(r, NAME("model.layers.%d.input_layernorm.weight", l), d, 0, 0, 0, GROUP_ADAMW, true, INIT_ONES, true);
    if (!m->layer_is_mla[l]) {
      const int64_t H = m->kda_heads, K = m->kda_head_dim, HK = H * K;
      add_linear(r, NAME("model.layers.%d.self_attn.q_proj.weight", l), HK, d, true);
      add_linear(r, NAME("model.layers.%d.self_attn.k_proj.weight", l), HK, d, true);
      add_linear(r, NAME("model.layers.%d.self_attn.v_proj.weight", l), HK, d, true);
      const char *convs[3] = {"q_conv1d", "k_conv1d", "v_conv1d"};
      for (int i = 0; i < 3; i++)
        params_add(r, NAME("model.layers.%d.self_attn.%s.weight", l, convs[i]), HK, 1, m->conv_size, 0, GROUP_ADAMW,
                   true, INIT_CONV, true);
      params_add(r, NAME("model.layers.%d.self_attn.A_log", l), 1, 1, H, 1, GROUP_ADAMW, false, INIT_A_LOG, true);
      add_linear(r, NAME("model.layers.%d.self_attn.f_a_proj.weight", l), K, d, true);
      add_linear(r, NAME("model.layers.%d.self_attn.f_b_proj.weight", l), HK, K, true);
      params_add(r, NAME("model.layers.%d.self_attn.dt_bias", l), HK, 0, 0, 0, GROUP_ADAMW, false, INIT_DT_BIAS, true);
      add_linear(r, NAME("model.layers.%d.self_attn.b_proj.weight", l), H, d, true);
      add_linear(r, NAME("model.layers.%d.self_attn.g_a_proj.weight", l), K, d, true);
      add_linear(r, NAME("model.layers.%d.self_attn.g_b_proj.weight", l), HK, K, true);
      params_add(r, NAME("model.layers.%d.self_attn.o_norm.weight", l), K, 0, 0, 0, GROUP_ADAMW, true, INIT_ONES, true);
      add_linear(r, NAME("model.layers.%d.self_attn.o_proj.weight", l), d, HK, true);
    } else {
      const int64_t H = m->mla_heads, qk = m->qk_nope_dim + m->qk_pe_dim;
      add_linear(r, NAME("model.layers.%d.self_attn.q_proj.weight", l), H * qk, d, true);
      add_linear(r, NAME("model.layers.%d.self_attn.kv_a_proj_with_mqa.weight", l), m->kv_lora_rank + m->qk_pe_dim, d,
                 true);
      params_add(r, NAME("model.layers.%d.self_attn.kv_a_layernorm.weight", l), m->kv_lora_rank, 0, 0, 0, GROUP_ADAMW,
                 true, INIT_ONES, true);
      add_linear(r, NAME("model.layers.%d.self_attn.kv_b_proj.weight", l), H * (m->qk_nope_dim + m->v_dim),
                 m->kv_lora_rank, true);
      add_linear(r, NAME("model.layers.%d.self_attn.o_proj.weight", l), d, H * m->v_dim, true);
    }
    params_add(r, NAME("model.layers.%d.post_attention_layernorm.weight", l), d, 0, 0, 0, GROUP_ADAMW, true, INIT_ONES,
               true);
    if (!model_layer_is_moe(m, l)) {
      char prefix[96];
      snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", l);
      add_swiglu(r, prefix, "gate_proj", "up_proj", "down_proj", d, m->dense_intermediate_size, true);
    } else {
      params_add(r, NAME("model.layers.%d.block_sparse_moe.gate.weight", l), m->num_experts, d, 0, 0, GROUP_MUON, true,
                 INIT_UNIFORM_FAN_IN, true);
      params_add(r, NAME("model.layers.%d.block_sparse_moe.gate.e_score_correction_bias", l), m->num_experts, 0, 0, 0,
                 GROUP_NONE, false, INIT_ZEROS, true);
      for (int e = 0; e < m->num_experts; e++) {
        char prefix[96];
        snprintf(prefix, sizeof prefix, "model.layers.%d.block_sparse_moe.experts.%d", l, e);
        add_swiglu(r, prefix, "w1", "w3", "w2", d, m->expert_intermediate_size, false);
      }
      if (m->num_shared_experts > 0) {
        char prefix[96];
        snprintf(prefix, sizeof prefix, "model.layers.%d.block_sparse_moe.shared_experts", l);
        add_swiglu(r, prefix, "gate_proj", "up_proj", "down_proj", d,
                   (int64_t)m->expert_intermediate_size * m->num_shared_experts, true);
      }
    }
#undef NAME
  }
  params_add(r, "model.norm.weight", d, 0, 0, 0, GROUP_ADAMW, true, INIT_ONES, true);
  params_add(r, "lm_head.weight", m->vocab_size, d, 0, 0, GROUP_ADAMW, true, INIT_NORMAL, true);
}

ParamCount model_count_params(const ModelConfig *m) {
  ParamRegistry r;
  params_init(&r);
  model_register_params(m, &r);
  ParamCount count = {0};
  for (int i = 0; i < r.count; i++) {
    const ParamInfo *p = &r.params[i];
    count.total += (double)p->numel;
    if (p->active_per_token) count.active += (double)p->numel;
  }
  // Of the routed experts, a token uses experts_per_token.
  double expert = 3.0 * m->hidden_size * m->expert_intermediate_size;
  int moe_layers = m->num_layers - m->first_k_dense;
  count.active += (double)moe_layers * m->experts_per_token * expert;
  count.embedding = (double)m->vocab_size * m->hidden_size;
  params_free(&r);
  return count;
}

double model_flops_per_token(const ModelConfig *m, int seq_len) {
  ParamCount count = model_count_params(m);
  double flops = 6.0 * (count.active - count.embedding);
  for (int l = 0; l < m->num_layers; l++) {
    if (!m->layer_is_mla[l]) {
      double K = m->kda_head_dim, C = m->chunk_size;
      flops += 3.0 * 2.0 * m->kda_heads * (6 * K * K + 3 * C * K + C * C);
    } else {
      flops += 3.0 * 2.0 * m->mla_heads * (seq_len / 2.0) * (m->qk_nope_dim + m->qk_pe_dim + m->v_dim);
    }
  }
  return flops;
}
