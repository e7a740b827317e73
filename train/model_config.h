/* The model's shapes, resolved from the [model] [kda] [mla] [moe] sections of a Config: the one
 * struct the layers read. Also the registry of every parameter the model has, named as in the
 * released Hugging Face checkpoint, and the parameter and FLOP counts printed at start-up. */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "train/config.h"
#include "train/params.h"

#define MODEL_MAX_LAYERS 1024

typedef struct {
  int vocab_size, hidden_size, num_layers;
  bool layer_is_mla[MODEL_MAX_LAYERS];
  int first_k_dense, dense_intermediate_size;
  double rms_norm_eps, init_std;
  // KDA
  int kda_heads, kda_head_dim, conv_size, chunk_size;
  bool gate_bounded;
  double gate_lower_bound;
  // MLA
  int mla_heads, kv_lora_rank, qk_nope_dim, qk_pe_dim, v_dim;
  // MoE
  int num_experts, experts_per_token, num_shared_experts, expert_intermediate_size;
  double routed_scaling_factor;
  double aux_loss_coef;
} ModelConfig;

void model_config_from(ModelConfig *model, const Config *config);
static inline bool model_layer_is_moe(const ModelConfig *m, int layer) { return layer >= m->first_k_dense; }

// Adds every parameter of the model to the registry, in layer order (names as released).
void model_register_params(const ModelConfig *model, ParamRegistry *registry);

typedef struct {
  double total;          // every parameter
  double active;         // per token: without the routed experts a token does not use
  double embedding;      // embedding table (not counted in matmul FLOPs)
} ParamCount;
ParamCount model_count_params(const ModelConfig *model);

// Training FLOPs per token (forward + backward = 3x forward) at sequence length T: 6 x active matmul
// parameters (without the embedding lookup) plus the sequence mixers' own terms:
//   KDA, per layer and head, chunk C: 6*dk*dv + 3*C*dk + C^2   multiply-adds (x2 FLOPs) forward,
//   MLA attention, per layer and head, causal: T/2 * (dqk + dv) multiply-adds forward.
double model_flops_per_token(const ModelConfig *model, int seq_len);
