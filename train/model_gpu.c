// The model's forward and backward on one GPU; see model_gpu.h and, for the wiring, model.c.
#ifdef KLT_HAVE_CUDA
#include "train/model_gpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/norm.h"
#include "optim/grad_norm.h"

typedef struct {
  bool is_mla, is_moe;
  GpuKda kda;
  GpuMla mla;
  GpuSwiglu dense;
  GpuMoe moe;
  GpuTensor input_norm, post_norm;
} GpuLayer;

struct GpuModel {
  ModelConfig config;
  GpuParams params;
  int max_rows;
  GpuLayer *layers;
  GpuTensor embed, final_norm, lm_head;
  GpuScratch scratch;
  int B, T;
  bool has_gradient;  // the last forward ran the lm head's backward
  int *inputs, *targets;       // (N) device
  unsigned char *doc_start;    // (N) device
  float **residual;            // (2L+1) x (N, d) fp32 stream
  bf16 **normed;               // (2L) x (N, d)
  float **rstd;                // (2L) x (N)
  bf16 *final_normed;          // (N, d)
  float *final_rstd, *losses;  // (N)
  int *predictions;            // (N) device
  float *losses_host;          // (N)
  bf16 *branch, *dnormed, *dstream;  // (N, d)
  float *dresidual;            // (N, d)
  double *norm_squared;        // (1) device
};

GpuParams *gpu_model_params(GpuModel *m) { return &m->params; }

// With KLT_PROFILE set in the environment, every phase of the forward and backward synchronizes and
// its time is summed per kind, printed when the model is freed: slower, for finding where time goes.
typedef enum { PHASE_KDA, PHASE_MLA, PHASE_MOE, PHASE_DENSE, PHASE_NORMS, PHASE_HEAD, PHASE_EMBEDDING, PHASES } Phase;
static const char *phase_names[PHASES] = {"KDA mixer", "MLA mixer", "MoE FFN", "dense FFN", "norms+residual",
                                          "lm head + CE", "embedding"};
static int profiling = -1;  // unknown until the first forward
static double phase_seconds[2][PHASES], phase_start;
static int profiled_passes[2];  // forwards, backwards
static void phase_begin(void) {
  if (profiling < 0) profiling = getenv("KLT_PROFILE") != NULL;
  if (!profiling) return;
  device_synchronize();
  phase_start = klt_now_seconds();
}
static void phase_end(int backward, Phase phase) {
  if (!profiling) return;
  device_synchronize();
  phase_seconds[backward][phase] += klt_now_seconds() - phase_start;
}
static void print_profile(void) {
  if (profiling <= 0 || profiled_passes[0] == 0 || profiled_passes[1] == 0) return;
  double per_pass[2] = {0, 0};
  for (int b = 0; b < 2; b++)
    for (int p = 0; p < PHASES; p++) per_pass[b] += phase_seconds[b][p] / profiled_passes[b];
  printf("klt profile: milliseconds per forward (%d) / backward (%d); %.1f + %.1f ms, each phase synchronized\n",
         profiled_passes[0], profiled_passes[1], 1e3 * per_pass[0], 1e3 * per_pass[1]);
  for (int p = 0; p < PHASES; p++)
    printf("  %-16s %9.2f %9.2f\n", phase_names[p], 1e3 * phase_seconds[0][p] / profiled_passes[0],
           1e3 * phase_seconds[1][p] / profiled_passes[1]);
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

static void scratch_init(GpuScratch *s, const ModelConfig *c, size_t N) {
  size_t wide = (size_t)c->kda_heads * c->kda_head_dim;
  wide = max_size(wide, (size_t)c->mla_heads * (c->qk_nope_dim + c->qk_pe_dim));
  wide = max_size(wide, (size_t)c->mla_heads * (c->qk_nope_dim + c->v_dim));
  size_t narrow = max_size((size_t)c->kda_head_dim, (size_t)c->kv_lora_rank + c->qk_pe_dim);
  size_t heads = max_size((size_t)c->kda_heads, (size_t)c->num_experts);
  size_t k = c->experts_per_token > 0 ? (size_t)c->experts_per_token : 1;
  size_t rows = max_size(N * k * max_size((size_t)c->hidden_size, 2 * (size_t)c->expert_intermediate_size),
                         N * 2 * max_size((size_t)c->dense_intermediate_size,
                                          (size_t)c->expert_intermediate_size * c->num_shared_experts));
  for (size_t i = 0; i < sizeof s->wide / sizeof s->wide[0]; i++)
    s->wide[i] = device_alloc(N * wide * sizeof(bf16));
  for (int i = 0; i < 3; i++) s->narrow[i] = device_alloc(N * narrow * sizeof(bf16));
  s->g_wide = device_alloc(N * c->kda_heads * c->kda_head_dim * sizeof(float));
  for (int i = 0; i < 2; i++) s->h_float[i] = device_alloc(N * heads * sizeof(float));
  s->h_bf16 = device_alloc(N * heads * sizeof(bf16));
  for (int i = 0; i < 3; i++) s->moe_rows[i] = device_alloc(rows * sizeof(bf16));
  s->dexpert_weight = device_alloc(N * k * sizeof(float));
}

static void scratch_free(GpuScratch *s) {
  for (size_t i = 0; i < sizeof s->wide / sizeof s->wide[0]; i++) device_free(s->wide[i]);
  for (int i = 0; i < 3; i++) device_free(s->narrow[i]);
  device_free(s->g_wide);
  for (int i = 0; i < 2; i++) device_free(s->h_float[i]);
  device_free(s->h_bf16);
  for (int i = 0; i < 3; i++) device_free(s->moe_rows[i]);
  device_free(s->dexpert_weight);
}

GpuModel *gpu_model_create(const ModelConfig *c, ParamRegistry *registry, int max_rows) {
  GpuModel *m = klt_calloc(1, sizeof *m);
  m->config = *c;
  m->max_rows = max_rows;
  const size_t total = registry->total, N = (size_t)max_rows;
  const int L = c->num_layers, d = c->hidden_size;
  m->params.registry = registry;
  m->params.master = device_alloc(total * sizeof(float));
  m->params.weights = device_alloc(total * sizeof(bf16));
  m->params.grads = device_alloc(total * sizeof(float));
  GpuParams *p = &m->params;
  m->embed = gpu_param(p, -1, "model.embed_tokens.weight");
  m->final_norm = gpu_param(p, -1, "model.norm.weight");
  m->lm_head = gpu_param(p, -1, "lm_head.weight");
  m->layers = klt_calloc((size_t)L, sizeof(GpuLayer));
  for (int l = 0; l < L; l++) {
    GpuLayer *layer = &m->layers[l];
    layer->is_mla = c->layer_is_mla[l];
    layer->is_moe = model_layer_is_moe(c, l);
    layer->input_norm = gpu_param(p, l, "input_layernorm.weight");
    layer->post_norm = gpu_param(p, l, "post_attention_layernorm.weight");
    if (layer->is_mla) gpu_mla_init(&layer->mla, c, p, l, max_rows);
    else gpu_kda_init(&layer->kda, c, p, l, max_rows);
    if (layer->is_moe) gpu_moe_init(&layer->moe, c, p, l, max_rows);
    else {
      int F = c->dense_intermediate_size;
      GpuTensor gate_up = gpu_adjacent_pair(p, l, "mlp.gate_proj.weight", "mlp.up_proj.weight", (size_t)F * d);
      gpu_swiglu_init(&layer->dense, gate_up, gpu_param(p, l, "mlp.down_proj.weight"), d, F, max_rows);
    }
  }
  scratch_init(&m->scratch, c, N);
  m->inputs = device_alloc(N * sizeof(int));
  m->targets = device_alloc(N * sizeof(int));
  m->doc_start = device_alloc(N);
  m->residual = klt_calloc(2 * (size_t)L + 1, sizeof(float *));
  m->normed = klt_calloc(2 * (size_t)L, sizeof(bf16 *));
  m->rstd = klt_calloc(2 * (size_t)L, sizeof(float *));
  for (int i = 0; i < 2 * L + 1; i++) m->residual[i] = device_alloc(N * d * sizeof(float));
  for (int i = 0; i < 2 * L; i++) {
    m->normed[i] = device_alloc(N * d * sizeof(bf16));
    m->rstd[i] = device_alloc(N * sizeof(float));
  }
  m->final_normed = device_alloc(N * d * sizeof(bf16));
  m->final_rstd = device_alloc(N * sizeof(float));
  m->losses = device_alloc(N * sizeof(float));
  m->predictions = device_alloc(N * sizeof(int));
  m->losses_host = klt_calloc(N, sizeof(float));
  m->branch = device_alloc(N * d * sizeof(bf16));
  m->dnormed = device_alloc(N * d * sizeof(bf16));
  m->dstream = device_alloc(N * d * sizeof(bf16));
  m->dresidual = device_alloc(N * d * sizeof(float));
  m->norm_squared = device_alloc(sizeof(double));
  gpu_model_weights_to_device(m);
  gpu_model_reset_step_stats(m);
  return m;
}

void gpu_model_free(GpuModel *m) {
  print_profile();
  const int L = m->config.num_layers;
  for (int l = 0; l < L; l++) {
    GpuLayer *layer = &m->layers[l];
    if (layer->is_mla) gpu_mla_free(&layer->mla);
    else gpu_kda_free(&layer->kda);
    if (layer->is_moe) gpu_moe_free(&layer->moe);
    else gpu_swiglu_free(&layer->dense);
  }
  scratch_free(&m->scratch);
  for (int i = 0; i < 2 * L + 1; i++) device_free(m->residual[i]);
  for (int i = 0; i < 2 * L; i++) {
    device_free(m->normed[i]);
    device_free(m->rstd[i]);
  }
  void *buffers[] = {m->inputs, m->targets, m->doc_start, m->final_normed, m->final_rstd, m->losses,
                     m->predictions, m->branch, m->dnormed, m->dstream, m->dresidual, m->norm_squared,
                     m->params.master, m->params.weights, m->params.grads};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) device_free(buffers[i]);
  free(m->residual);
  free(m->normed);
  free(m->rstd);
  free(m->losses_host);
  free(m->layers);
  free(m);
}

// The host registry holds `real` (double in the test build): convert through an fp32 staging copy.
void gpu_model_weights_to_device(GpuModel *m) {
  const ParamRegistry *r = m->params.registry;
  float *staging = klt_malloc(r->total * sizeof(float));
  for (size_t i = 0; i < r->total; i++) staging[i] = (float)r->values[i];
  device_upload(m->params.master, staging, r->total * sizeof(float));
  free(staging);
  gpu_model_refresh_bf16(m);
}

void gpu_model_weights_to_host(GpuModel *m) {
  const ParamRegistry *r = m->params.registry;
  float *staging = klt_malloc(r->total * sizeof(float));
  device_download(staging, m->params.master, r->total * sizeof(float));
  for (size_t i = 0; i < r->total; i++) r->values[i] = (real)staging[i];
  free(staging);
}

void gpu_model_refresh_bf16(GpuModel *m) {
  device_float_to_bf16(m->params.weights, m->params.master, m->params.registry->total);
}

void gpu_model_zero_grads(GpuModel *m) { device_zero(m->params.grads, m->params.registry->total * sizeof(float)); }

double gpu_model_grad_norm_squared(GpuModel *m) {
  grad_norm_squared_cuda(m->norm_squared, m->params.grads, m->params.registry->total, false);
  double result = 0;
  device_download(&result, m->norm_squared, sizeof result);
  return result;
}

void gpu_model_reset_step_stats(GpuModel *m) {
  float lowest[256];
  for (int i = 0; i < 256; i++) lowest[i] = -INFINITY;
  for (int l = 0; l < m->config.num_layers; l++) {
    GpuLayer *layer = &m->layers[l];
    if (layer->is_mla) {
      CHECK(layer->mla.H <= 256, "more than 256 MLA heads");
      device_upload(layer->mla.max_logit, lowest, (size_t)layer->mla.H * sizeof(float));
    }
    if (layer->is_moe) memset(layer->moe.load, 0, (size_t)layer->moe.E * sizeof(double));
  }
}

void gpu_model_max_logits(GpuModel *m, int l, real *out) {
  float values[256];
  const GpuMla *mla = &m->layers[l].mla;
  device_download(values, mla->max_logit, (size_t)mla->H * sizeof(float));
  for (int h = 0; h < mla->H; h++) out[h] = (real)values[h];
}

double *gpu_model_expert_load(GpuModel *m, int l) { return m->layers[l].is_moe ? m->layers[l].moe.load : NULL; }

double gpu_model_forward(GpuModel *m, const int *inputs, const int *targets, const unsigned char *doc_start, int B,
                         int T, float loss_weight, int *predictions) {
  const ModelConfig *c = &m->config;
  const int N = B * T, d = c->hidden_size, L = c->num_layers;
  CHECK(N <= m->max_rows, "forward over %d rows exceeds the planned %d", N, m->max_rows);
  m->B = B;
  m->T = T;
  const float eps = (float)c->rms_norm_eps;
  device_upload(m->inputs, inputs, (size_t)N * sizeof(int));
  device_upload(m->targets, targets, (size_t)N * sizeof(int));
  device_upload(m->doc_start, doc_start, (size_t)N);
  phase_begin();
  embedding_forward_cuda(m->branch, m->inputs, m->embed.w, N, d);
  device_bf16_to_float(m->residual[0], m->branch, (size_t)N * d);
  residual_rmsnorm_forward_cuda(m->residual[0], m->normed[0], m->rstd[0], m->residual[0], NULL,
                                m->layers[0].input_norm.master, eps, N, d);
  phase_end(0, PHASE_EMBEDDING);
  for (int l = 0; l < L; l++) {
    GpuLayer *layer = &m->layers[l];
    phase_begin();
    if (layer->is_mla) gpu_mla_forward(&layer->mla, m->branch, m->normed[2 * l], m->doc_start, B, T);
    else gpu_kda_forward(&layer->kda, m->branch, m->normed[2 * l], m->doc_start, B, T);
    phase_end(0, layer->is_mla ? PHASE_MLA : PHASE_KDA);
    phase_begin();
    residual_rmsnorm_forward_cuda(m->residual[2 * l + 1], m->normed[2 * l + 1], m->rstd[2 * l + 1],
                                  m->residual[2 * l], m->branch, layer->post_norm.master, eps, N, d);
    phase_end(0, PHASE_NORMS);
    phase_begin();
    if (layer->is_moe) gpu_moe_forward(&layer->moe, m->branch, m->normed[2 * l + 1], N);
    else gpu_swiglu_forward(&layer->dense, m->branch, m->normed[2 * l + 1], N);
    phase_end(0, layer->is_moe ? PHASE_MOE : PHASE_DENSE);
    phase_begin();
    bool last = l + 1 == L;
    residual_rmsnorm_forward_cuda(m->residual[2 * l + 2], last ? m->final_normed : m->normed[2 * l + 2],
                                  last ? m->final_rstd : m->rstd[2 * l + 2], m->residual[2 * l + 1], m->branch,
                                  last ? m->final_norm.master : m->layers[l + 1].input_norm.master, eps, N, d);
    phase_end(0, PHASE_NORMS);
  }
  m->has_gradient = loss_weight > 0;
  profiled_passes[0]++;
  phase_begin();
  lm_head_cross_entropy_cuda(m->losses, m->predictions, m->has_gradient ? m->dnormed : NULL,
                             m->has_gradient ? m->lm_head.grad : NULL, m->final_normed, m->lm_head.w, m->targets,
                             loss_weight, N, d, c->vocab_size);
  phase_end(0, PHASE_HEAD);
  device_download(m->losses_host, m->losses, (size_t)N * sizeof(float));
  if (predictions) device_download(predictions, m->predictions, (size_t)N * sizeof(int));
  double total = 0;
  for (int n = 0; n < N; n++)
    if (targets[n] >= 0) total += m->losses_host[n];
  return total;
}

void gpu_model_backward(GpuModel *m) {
  const ModelConfig *c = &m->config;
  const int N = m->B * m->T, d = c->hidden_size, L = c->num_layers;
  const size_t width = (size_t)N * d;
  CHECK(m->has_gradient, "backward after a forward without gradient (loss_weight 0)");
  profiled_passes[1]++;
  phase_begin();
  device_zero(m->dresidual, width * sizeof(float));
  residual_rmsnorm_backward_cuda(m->dresidual, m->final_norm.grad, m->dnormed, m->residual[2 * L],
                                 m->final_norm.master, m->final_rstd, N, d);
  phase_end(1, PHASE_NORMS);
  // dresidual (fp32) is the gradient of the stream; each branch reads a bf16 copy and adds its path back.
  for (int l = L - 1; l >= 0; l--) {
    GpuLayer *layer = &m->layers[l];
    phase_begin();
    device_float_to_bf16(m->dstream, m->dresidual, width);
    if (layer->is_moe) gpu_moe_backward(&layer->moe, m->dnormed, m->dstream, &m->scratch);
    else gpu_swiglu_backward(&layer->dense, m->dnormed, m->dstream, false, &m->scratch);
    phase_end(1, layer->is_moe ? PHASE_MOE : PHASE_DENSE);
    phase_begin();
    residual_rmsnorm_backward_cuda(m->dresidual, layer->post_norm.grad, m->dnormed, m->residual[2 * l + 1],
                                   layer->post_norm.master, m->rstd[2 * l + 1], N, d);
    device_float_to_bf16(m->dstream, m->dresidual, width);
    phase_end(1, PHASE_NORMS);
    phase_begin();
    if (layer->is_mla) gpu_mla_backward(&layer->mla, m->dnormed, m->dstream, &m->scratch);
    else gpu_kda_backward(&layer->kda, m->dnormed, m->dstream, &m->scratch);
    phase_end(1, layer->is_mla ? PHASE_MLA : PHASE_KDA);
    phase_begin();
    residual_rmsnorm_backward_cuda(m->dresidual, layer->input_norm.grad, m->dnormed, m->residual[2 * l],
                                   layer->input_norm.master, m->rstd[2 * l], N, d);
    phase_end(1, PHASE_NORMS);
  }
  phase_begin();
  device_float_to_bf16(m->dstream, m->dresidual, width);
  embedding_backward_cuda(m->embed.grad, m->dstream, m->inputs, N, d, c->vocab_size);
  phase_end(1, PHASE_EMBEDDING);
}

// ---- Multi-GPU hook (dist helper): see model_gpu.h.
void gpu_model_enable_expert_parallel(GpuModel *m, const struct World *world) {
  for (int l = 0; l < m->config.num_layers; l++)
    if (m->layers[l].is_moe) gpu_moe_enable_expert_parallel(&m->layers[l].moe, world, m->max_rows);
}
#endif
