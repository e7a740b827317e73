// The hybrid model's forward and backward on the CPU; see model.h.
#include "train/model.h"

#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/norm.h"
#include "train/ffn_layer.h"
#include "train/kda_layer.h"
#include "train/layer_params.h"
#include "train/mla_layer.h"
#include "train/model_gpu.h"
#include "train/moe_layer.h"
#include "optim/grad_norm.h"

// Vocabulary columns per block of the fused lm head + cross-entropy.
#define LM_HEAD_VOCAB_CHUNK 4096

typedef struct {
  bool is_mla, is_moe;
  KdaLayer kda;
  MlaLayer mla;
  DenseFfn dense;
  MoeLayer moe;
  real *input_norm, *dinput_norm, *post_norm, *dpost_norm;
} Layer;

struct Model {
  ModelConfig config;
  ParamRegistry params;
  int max_rows;
  Layer *layers;
  real *embed, *dembed, *final_norm, *dfinal_norm, *lm_head, *dlm_head;
  // Activations of the last forward, rows N = B*T.
  int B, T;
  const int *inputs, *targets;
  real loss_weight;
  double aux_loss;  // balance loss of the last forward, summed over MoE layers and rows
  real **residual;  // (2L+1) x (N, d): the stream after embedding, after each mixer, after each FFN
  real **normed;    // (2L) x (N, d): input of each mixer and FFN
  real **rstd;      // (2L) x (N)
  real *final_normed, *final_rstd;  // (N, d), (N)
  real *losses, *lse, *dlosses;     // (N)
  int *predictions;                 // (N) most likely next token of the last forward
  real *branch;                     // (N, d) a mixer's or FFN's output before the residual add
  real *dresidual, *dnormed;        // (N, d)
#ifdef KLT_HAVE_CUDA
  GpuModel *gpu;             // the CUDA backend's model; then the CPU layers and activations are not built
  real **gpu_max_logits;     // (L) x (H) host copies for MLA layers
  bool gpu_max_logits_fresh;  // downloaded since the last forward: the host copies (maybe reduced over
                              // ranks by the trainer) are what the optimizer must read, not the device's
#endif
};

#ifdef KLT_HAVE_CUDA
#define ON_GPU(m) ((m)->gpu != NULL)
#else
#define ON_GPU(m) false
#endif
bool model_on_gpu(const Model *m) { return ON_GPU(m); }

static real *param_value(Model *m, const char *name, real **grad) {
  int i = params_find(&m->params, name);
  CHECK(i >= 0, "parameter %s is not registered", name);
  *grad = params_grad(&m->params, i);
  return params_value(&m->params, i);
}

Model *model_create(const ModelConfig *config, int max_batch, int seq_len, uint64_t seed, const World *world) {
  return model_create_on(config, max_batch, seq_len, seed, world, false);
}

Model *model_create_on(const ModelConfig *config, int max_batch, int seq_len, uint64_t seed, const World *world,
                       bool cuda) {
  Model *m = klt_calloc(1, sizeof *m);
  m->config = *config;
  params_init(&m->params);
  model_register_params(config, &m->params);
  params_allocate(&m->params);
  params_initialize(&m->params, config->init_std, seed);
  const int L = config->num_layers, d = config->hidden_size;
  const size_t N = (size_t)max_batch * seq_len;
  m->max_rows = (int)N;
  m->predictions = klt_calloc(N, sizeof(int));
  if (cuda) {
#ifdef KLT_HAVE_CUDA
    // Multi-GPU: data parallel over the world (the trainer all-reduces the gradient arena with NCCL),
    // experts spread over ep ranks. Context parallelism is not there on the GPU (nor on the CPU).
    if (world->cp > 1)
      klt_user_error("[train] device = cuda: context parallelism ([parallel] cp = %d) is not available; use cp = 1",
                     world->cp);
    if (world->size > 1 && !world->comm)
      klt_user_error("[train] device = cuda on %d ranks needs the NCCL communicators (dist/comm.h: comm_create "
                     "after comm_select_device)",
                     world->size);
    if (config->aux_loss_coef > 0)
      klt_user_error("[moe] aux_loss_coef > 0 is not available with device = cuda yet; use 0 (aux-loss-free "
                     "balancing)");
    m->gpu = gpu_model_create(config, &m->params, (int)N);
    if (world->ep > 1) gpu_model_enable_expert_parallel(m->gpu, world);
    m->gpu_max_logits = klt_calloc((size_t)L, sizeof(real *));
    for (int l = 0; l < L; l++)
      if (config->layer_is_mla[l]) m->gpu_max_logits[l] = klt_calloc((size_t)config->mla_heads, sizeof(real));
    return m;
#else
    klt_user_error("[train] device = cuda: this klt was built without the CUDA backend (configure with -DKLT_CUDA=ON "
                   "on a machine with nvcc)");
#endif
  }
  m->embed = param_value(m, "model.embed_tokens.weight", &m->dembed);
  m->final_norm = param_value(m, "model.norm.weight", &m->dfinal_norm);
  m->lm_head = param_value(m, "lm_head.weight", &m->dlm_head);
  m->layers = klt_calloc((size_t)L, sizeof(Layer));
  for (int l = 0; l < L; l++) {
    Layer *layer = &m->layers[l];
    layer->is_mla = config->layer_is_mla[l];
    layer->is_moe = model_layer_is_moe(config, l);
    layer_param(&m->params, l, "input_layernorm.weight", &layer->input_norm, &layer->dinput_norm);
    layer_param(&m->params, l, "post_attention_layernorm.weight", &layer->post_norm, &layer->dpost_norm);
    if (layer->is_mla) mla_layer_init(&layer->mla, config, &m->params, l, (int)N);
    else kda_layer_init(&layer->kda, config, &m->params, l, (int)N);
    if (layer->is_moe) moe_layer_init(&layer->moe, config, &m->params, l, (int)N, world);
    else dense_ffn_init(&layer->dense, config, &m->params, l, (int)N);
  }
  m->residual = klt_calloc(2 * (size_t)L + 1, sizeof(real *));
  m->normed = klt_calloc(2 * (size_t)L, sizeof(real *));
  m->rstd = klt_calloc(2 * (size_t)L, sizeof(real *));
  for (int i = 0; i < 2 * L + 1; i++) m->residual[i] = klt_calloc(N * d, sizeof(real));
  for (int i = 0; i < 2 * L; i++) {
    m->normed[i] = klt_calloc(N * d, sizeof(real));
    m->rstd[i] = klt_calloc(N, sizeof(real));
  }
  m->final_normed = klt_calloc(N * d, sizeof(real));
  m->final_rstd = klt_calloc(N, sizeof(real));
  m->losses = klt_calloc(N, sizeof(real));
  m->lse = klt_calloc(N, sizeof(real));
  m->dlosses = klt_calloc(N, sizeof(real));
  m->branch = klt_calloc(N * d, sizeof(real));
  m->dresidual = klt_calloc(N * d, sizeof(real));
  m->dnormed = klt_calloc(N * d, sizeof(real));
  model_reset_step_stats(m);
  return m;
}

void model_free(Model *m) {
  const int L = m->config.num_layers;
#ifdef KLT_HAVE_CUDA
  if (m->gpu) {
    gpu_model_free(m->gpu);
    for (int l = 0; l < L; l++) free(m->gpu_max_logits[l]);
    free(m->gpu_max_logits);
    free(m->predictions);
    params_free(&m->params);
    free(m);
    return;
  }
#endif
  for (int l = 0; l < L; l++) {
    Layer *layer = &m->layers[l];
    if (layer->is_mla) mla_layer_free(&layer->mla);
    else kda_layer_free(&layer->kda);
    if (layer->is_moe) moe_layer_free(&layer->moe);
    else dense_ffn_free(&layer->dense);
  }
  for (int i = 0; i < 2 * L + 1; i++) free(m->residual[i]);
  for (int i = 0; i < 2 * L; i++) {
    free(m->normed[i]);
    free(m->rstd[i]);
  }
  free(m->residual); free(m->normed); free(m->rstd);
  free(m->final_normed); free(m->final_rstd); free(m->losses); free(m->lse); free(m->dlosses); free(m->predictions);
  free(m->branch); free(m->dresidual); free(m->dnormed);
  free(m->layers);
  params_free(&m->params);
  free(m);
}

ParamRegistry *model_params(Model *m) { return &m->params; }
const ModelConfig *model_config(const Model *m) { return &m->config; }

void model_reset_step_stats(Model *m) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) {
    m->gpu_max_logits_fresh = false;
    return gpu_model_reset_step_stats(m->gpu);
  }
#endif
  for (int l = 0; l < m->config.num_layers; l++) {
    Layer *layer = &m->layers[l];
    if (layer->is_mla)
      for (int h = 0; h < layer->mla.H; h++) layer->mla.step_max_logit[h] = -(real)1e30;
    if (layer->is_moe) memset(layer->moe.load, 0, (size_t)layer->moe.E * sizeof(double));
  }
}

const int *model_predictions(const Model *m) { return m->predictions; }
double model_aux_loss(const Model *m) { return m->aux_loss; }

real *model_max_logits(Model *m, int l) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) {
    if (!m->gpu_max_logits_fresh)
      for (int i = 0; i < m->config.num_layers; i++)
        if (m->gpu_max_logits[i]) gpu_model_max_logits(m->gpu, i, m->gpu_max_logits[i]);
    m->gpu_max_logits_fresh = true;
    return m->gpu_max_logits[l];
  }
#endif
  return m->layers[l].is_mla ? m->layers[l].mla.step_max_logit : NULL;
}
double *model_expert_load(Model *m, int l) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) return gpu_model_expert_load(m->gpu, l);
#endif
  return m->layers[l].is_moe ? m->layers[l].moe.load : NULL;
}

void model_zero_grads(Model *m) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) return gpu_model_zero_grads(m->gpu);
#endif
  params_zero_grads(&m->params);
}

double model_grad_norm_squared(Model *m) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) return gpu_model_grad_norm_squared(m->gpu);
#endif
  return grad_norm_squared(m->params.grads, m->params.total);
}

void model_weights_to_host(Model *m) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) gpu_model_weights_to_host(m->gpu);
#endif
}

void model_weights_to_device(Model *m) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) gpu_model_weights_to_device(m->gpu);
#endif
}

#ifdef KLT_HAVE_CUDA
GpuModel *model_gpu(Model *m) { return m->gpu; }
#endif

double model_forward(Model *m, const int *inputs, const int *targets, const unsigned char *doc_start, int B, int T,
                     real loss_weight) {
  const ModelConfig *c = &m->config;
  const int N = B * T, d = c->hidden_size, L = c->num_layers;
  CHECK(N <= m->max_rows, "forward over %d rows exceeds the planned %d", N, m->max_rows);
#ifdef KLT_HAVE_CUDA
  if (m->gpu) {
    m->gpu_max_logits_fresh = false;
    return gpu_model_forward(m->gpu, inputs, targets, doc_start, B, T, (float)loss_weight, m->predictions);
  }
#endif
  m->B = B;
  m->T = T;
  m->inputs = inputs;
  m->targets = targets;
  m->loss_weight = loss_weight;
  const real eps = (real)c->rms_norm_eps;
  m->aux_loss = 0;
  embedding_forward(m->residual[0], inputs, m->embed, N, d);
  for (int l = 0; l < L; l++) {
    Layer *layer = &m->layers[l];
    real *in = m->residual[2 * l], *mid = m->residual[2 * l + 1], *out = m->residual[2 * l + 2];
    rmsnorm_forward(m->normed[2 * l], m->rstd[2 * l], in, layer->input_norm, eps, N, d);
    if (layer->is_mla) mla_layer_forward(&layer->mla, m->branch, m->normed[2 * l], doc_start, B, T);
    else kda_layer_forward(&layer->kda, m->branch, m->normed[2 * l], doc_start, B, T);
    for (size_t i = 0; i < (size_t)N * d; i++) mid[i] = in[i] + m->branch[i];
    rmsnorm_forward(m->normed[2 * l + 1], m->rstd[2 * l + 1], mid, layer->post_norm, eps, N, d);
    if (layer->is_moe) {
      moe_layer_forward(&layer->moe, m->branch, m->normed[2 * l + 1], B, T);
      m->aux_loss += layer->moe.aux_loss;
    }
    else dense_ffn_forward(&layer->dense, m->branch, m->normed[2 * l + 1], N);
    for (size_t i = 0; i < (size_t)N * d; i++) out[i] = mid[i] + m->branch[i];
  }
  rmsnorm_forward(m->final_normed, m->final_rstd, m->residual[2 * L], m->final_norm, eps, N, d);
  lm_head_cross_entropy_forward(m->losses, m->lse, m->predictions, m->final_normed, m->lm_head, targets, N, d, c->vocab_size,
                                LM_HEAD_VOCAB_CHUNK);
  double total = 0;
  for (int n = 0; n < N; n++)
    if (targets[n] >= 0) total += m->losses[n];
  return total;
}

void model_backward(Model *m) {
#ifdef KLT_HAVE_CUDA
  if (m->gpu) return gpu_model_backward(m->gpu);
#endif
  const ModelConfig *c = &m->config;
  const int N = m->B * m->T, d = c->hidden_size, L = c->num_layers;
  const size_t width = (size_t)N * d;
  for (int n = 0; n < N; n++) m->dlosses[n] = m->targets[n] >= 0 ? m->loss_weight : 0;
  memset(m->dnormed, 0, width * sizeof(real));
  lm_head_cross_entropy_backward(m->dnormed, m->dlm_head, m->dlosses, m->final_normed, m->lm_head, m->targets, m->lse,
                                 N, d, c->vocab_size, LM_HEAD_VOCAB_CHUNK);
  memset(m->dresidual, 0, width * sizeof(real));
  rmsnorm_backward(m->dresidual, m->dfinal_norm, m->dnormed, m->residual[2 * L], m->final_norm, m->final_rstd, N, d);
  // dresidual holds the gradient of the stream; each branch adds its path back into it.
  for (int l = L - 1; l >= 0; l--) {
    Layer *layer = &m->layers[l];
    memset(m->dnormed, 0, width * sizeof(real));
    if (layer->is_moe) moe_layer_backward(&layer->moe, m->dnormed, m->dresidual, m->loss_weight * m->T);
    else dense_ffn_backward(&layer->dense, m->dnormed, m->dresidual);
    rmsnorm_backward(m->dresidual, layer->dpost_norm, m->dnormed, m->residual[2 * l + 1], layer->post_norm,
                     m->rstd[2 * l + 1], N, d);
    memset(m->dnormed, 0, width * sizeof(real));
    if (layer->is_mla) mla_layer_backward(&layer->mla, m->dnormed, m->dresidual);
    else kda_layer_backward(&layer->kda, m->dnormed, m->dresidual);
    rmsnorm_backward(m->dresidual, layer->dinput_norm, m->dnormed, m->residual[2 * l], layer->input_norm,
                     m->rstd[2 * l], N, d);
  }
  embedding_backward(m->dembed, m->dresidual, m->inputs, N, d);
}
