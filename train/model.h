/* The Kimi Linear hybrid model on the CPU: parameters (through the registry), the per-layer
 * activations planned once for the largest micro-batch, and the explicit forward and backward.
 *   x = embed(tokens); per layer: x += mixer(rmsnorm(x)); x += ffn(rmsnorm(x));
 *   loss = cross_entropy(lm_head(rmsnorm(x)), targets)
 * The mixer is KDA or MLA by layer (train/kda_layer.c, train/mla_layer.c); the FFN is a dense SwiGLU
 * for the first first_k_dense layers and a MoE after (train/ffn_layer.c, train/moe_layer.c). */
#pragma once
#include <stdint.h>

#include "common/real.h"
#include "dist/world.h"
#include "train/model_config.h"
#include "train/params.h"

typedef struct Model Model;

// Registers and allocates the parameters, initializes them from seed, and plans activations for
// micro-batches of up to max_batch rows of seq_len tokens. world places the experts (ep).
Model *model_create(const ModelConfig *config, int max_batch, int seq_len, uint64_t seed, const World *world);
// The same on one GPU (CUDA backend) when cuda: parameters on the device, the host registry kept as the
// checkpoints' copy (model_weights_to_host / _to_device move them). A user error without the backend.
Model *model_create_on(const ModelConfig *config, int max_batch, int seq_len, uint64_t seed, const World *world,
                       bool cuda);
void model_free(Model *model);
bool model_on_gpu(const Model *model);
ParamRegistry *model_params(Model *model);
const ModelConfig *model_config(const Model *model);

// Forward over B rows of T tokens (host arrays): inputs, targets (B, T) (target < 0: no loss there), doc_start (B, T).
// Every token's loss is weighted by loss_weight (1 / the number of loss tokens in the global batch for a
// mean). Returns the sum of the unweighted token losses. Keeps what the backward needs.
double model_forward(Model *model, const int *inputs, const int *targets, const unsigned char *doc_start, int B,
                     int T, real loss_weight);
// The most likely next token at each position of the last forward (B, T).
const int *model_predictions(const Model *model);
// The sequence-wise balance loss of the last forward (summed over MoE layers and rows; 0 when
// moe.aux_loss_coef = 0). The backward's objective is loss_weight x (token losses + T x this).
double model_aux_loss(const Model *model);
// Backward of the last forward: adds every parameter's gradient into the registry's gradient arena.
void model_backward(Model *model);

// Gradients: zero them (before a step's first micro-batch) and their global sum of squares.
void model_zero_grads(Model *model);
double model_grad_norm_squared(Model *model);
// On the GPU: copy the trained weights to the host registry (before a save) or the registry's values
// to the device (after a load). No-ops on the CPU.
void model_weights_to_host(Model *model);
void model_weights_to_device(Model *model);
#ifdef KLT_HAVE_CUDA
typedef struct GpuModel GpuModel;
GpuModel *model_gpu(Model *model);  // NULL on the CPU
#endif

// Per-step statistics, accumulated over forwards since the last reset.
void model_reset_step_stats(Model *model);
// Largest scaled attention logit per head of MLA layer l (heads of that layer); NULL if l is KDA.
real *model_max_logits(Model *model, int layer);
// Tokens routed to each expert (num_experts entries) in MoE layer l; NULL if l is dense.
double *model_expert_load(Model *model, int layer);
