/* The whole model on one GPU (CUDA backend), behind model.h: model.c hands a forward, backward or
 * state transfer to these when the model was created for CUDA. The host registry stays the copy that
 * checkpoints read and write; the device holds the arenas that train. */
#pragma once
#ifdef KLT_HAVE_CUDA
#include "train/gpu_layers.h"

typedef struct GpuModel GpuModel;

GpuModel *gpu_model_create(const ModelConfig *config, ParamRegistry *registry, int max_rows);
void gpu_model_free(GpuModel *model);
GpuParams *gpu_model_params(GpuModel *model);
void gpu_model_weights_to_device(GpuModel *model);  // host registry values -> fp32 master and bf16 copies
void gpu_model_weights_to_host(GpuModel *model);    // fp32 master -> host registry values
void gpu_model_refresh_bf16(GpuModel *model);       // bf16 copies from the master after an update
// As model_forward; with loss_weight > 0 the lm head's backward runs here too (fused cross-entropy),
// so the next gpu_model_backward starts from the final norm. predictions (N) receives the argmax.
double gpu_model_forward(GpuModel *model, const int *inputs, const int *targets, const unsigned char *doc_start,
                         int B, int T, float loss_weight, int *predictions);
void gpu_model_backward(GpuModel *model);
void gpu_model_zero_grads(GpuModel *model);
double gpu_model_grad_norm_squared(GpuModel *model);
void gpu_model_reset_step_stats(GpuModel *model);
// Host copies of the step's statistics: the max logits of MLA layer l (H), NULL for KDA layers; the
// expert loads of MoE layer l (E), NULL for dense layers.
void gpu_model_max_logits(GpuModel *model, int layer, real *out);
double *gpu_model_expert_load(GpuModel *model, int layer);

// ---- Multi-GPU hook (dist helper): expert parallelism over world's ep group for every MoE layer
// (train/ffn_layer_gpu.c). Called once, right after gpu_model_create, when world->ep > 1.
void gpu_model_enable_expert_parallel(GpuModel *model, const struct World *world);
#endif
