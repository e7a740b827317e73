/* The model's layers on the GPU (CUDA backend): the same wiring as the CPU layer files
 * (kda_layer.c, mla_layer.c, ffn_layer.c, moe_layer.c), on device buffers in the backend's precision:
 * bf16 activations and GEMM weights, fp32 master weights and weight gradients, fp32 KDA gates and
 * states, an fp32 residual stream. Activation gradients are overwritten (not accumulated) by each
 * backward. Only built with the CUDA backend. */
#pragma once
#ifdef KLT_HAVE_CUDA
#include <stdbool.h>

#include "kernels/device.h"
#include "train/model_config.h"
#include "train/params.h"

// The parameter arenas on the device, in registry order (same offsets as the host arenas).
typedef struct {
  const ParamRegistry *registry;
  float *master;  // (total) fp32 master weights
  bf16 *weights;  // (total) bf16 copies the forward and backward read
  float *grads;   // (total) fp32 gradients, accumulated over micro-batches
} GpuParams;

// One tensor's three views.
typedef struct {
  bf16 *w;
  float *master, *grad;
} GpuTensor;
// model.layers.<layer>.<suffix> (a bug if not registered); layer < 0: suffix is the whole name.
GpuTensor gpu_param(const GpuParams *params, int layer, const char *suffix);

typedef struct {
  int H, K, d, W;
  bool gate_bounded;
  float gate_lower_bound, eps;
  GpuTensor q_proj, k_proj, v_proj, q_conv, k_conv, v_conv, A_log, f_a, f_b, dt_bias, b_proj, g_a, g_b, o_norm,
      o_proj;
  int B, T;
  const bf16 *x;                   // (N, d) the layer's input, kept by the model
  const unsigned char *doc_start;  // (B, T) on the device
  bf16 *qp, *kp, *vp;              // (N, H*K) projections before the convolution
  bf16 *q_act, *k_act;             // (N, H*K) after conv + SiLU: the KDA op's q, k (it L2-normalizes them)
  bf16 *v;                         // (N, H, K)
  bf16 *f_low, *f;                 // (N, K), (N, H*K)
  float *g;                        // (N, H, K) log decay
  bf16 *b_logit;                   // (N, H)
  float *beta;                     // (N, H)
  bf16 *o;                         // (N, H, K) KDA output
  bf16 *g_low, *gate;              // (N, K), (N, H*K)
  float *o_rstd;                   // (N, H)
  bf16 *y;                         // (N, H*K)
  float *kda_saved;                // the KDA forward's per-chunk results for the backward (kda.h)
  size_t kda_saved_floats;         // its capacity, grown by the first forward that needs more
} GpuKda;

typedef struct {
  int H, Dn, Dr, Dv, R, d;
  float eps;
  GpuTensor q_proj, kv_a_proj, kv_a_norm, kv_b_proj, o_proj;
  int B, T;
  const bf16 *x;
  const unsigned char *doc_start;
  bf16 *q;              // (N, H, Dn+Dr)
  bf16 *compressed;     // (N, R+Dr)
  bf16 *latent;         // (N, R)
  bf16 *latent_normed;  // (N, R)
  float *latent_rstd;   // (N)
  bf16 *kv;             // (N, H, Dn+Dv)
  bf16 *k;              // (N, H, Dn+Dr)
  bf16 *v;              // (N, H, Dv)
  bf16 *attn;           // (N, H, Dv)
  float *lse;           // (N, H)
  float *max_logit;     // (H) max over the step's forwards (device)
} GpuMla;

// A SwiGLU MLP whose gate and up matrices are adjacent in the registry: [gate; up] is one (2F, d) GEMM.
typedef struct {
  int d, F;
  GpuTensor gate_up, down;  // gate_up.w points at gate (2F, d); down (d, F)
  const bf16 *x;
  int N;
  bf16 *gate_up_out;  // (N, 2F)
  bf16 *act;          // (N, F)
} GpuSwiglu;

typedef struct {
  int d, E, top_k, F;
  float scaling;
  GpuTensor router, bias, experts;  // experts: expert 0's w1; w1, w3, w2 of expert e at e * expert_stride
  long long expert_stride;
  bool has_shared;
  GpuSwiglu shared;
  int N;
  const bf16 *x;
  float *logits, *scores;          // (N, E)
  int *expert_index;               // (N, k)
  float *expert_weight;            // (N, k)
  int *counts, *offsets;           // (E), (E+1) device
  int *offsets_host;               // (E+1)
  int *row_of_assignment, *token_of_row;  // (N*k)
  bf16 *sorted;                    // (N*k, d)
  bf16 *gate_up_out;               // (N*k, 2F)
  bf16 *act;                       // (N*k, F)
  bf16 *expert_out;                // (N*k, d)
  bf16 *shared_out;                // (N, d)
  double *load;                    // (E) host: tokens per expert over the step
  struct GpuMoeEp *ep;             // expert parallelism (ffn_layer_gpu.c), NULL with ep = 1
} GpuMoe;

// Backward scratch shared by all layers (sized for the largest layer).
typedef struct {
  bf16 *wide[7];      // (N, max(H*K, H*(Dn+Dr), H*(Dn+Dv))) each
  bf16 *narrow[3];    // (N, max(K, R+Dr))
  float *g_wide;      // (N, H*K) fp32
  float *h_float[2];  // (N, max(H, E)) fp32
  bf16 *h_bf16;       // (N, max(H, E))
  bf16 *moe_rows[3];  // (N*k, max(d, 2F)) each
  float *dexpert_weight;  // (N, k)
} GpuScratch;

void gpu_kda_init(GpuKda *layer, const ModelConfig *config, const GpuParams *params, int index, int max_rows);
void gpu_kda_free(GpuKda *layer);
void gpu_kda_forward(GpuKda *layer, bf16 *out, const bf16 *x, const unsigned char *doc_start, int B, int T);
// dx (N, d) overwritten; parameter gradients added.
void gpu_kda_backward(GpuKda *layer, bf16 *dx, const bf16 *dout, GpuScratch *scratch);

void gpu_mla_init(GpuMla *layer, const ModelConfig *config, const GpuParams *params, int index, int max_rows);
void gpu_mla_free(GpuMla *layer);
void gpu_mla_forward(GpuMla *layer, bf16 *out, const bf16 *x, const unsigned char *doc_start, int B, int T);
void gpu_mla_backward(GpuMla *layer, bf16 *dx, const bf16 *dout, GpuScratch *scratch);

// gate and up of a SwiGLU (registered side by side) as one tensor; gate_numel = F * d.
GpuTensor gpu_adjacent_pair(const GpuParams *params, int layer, const char *gate, const char *up, size_t gate_numel);
void gpu_swiglu_init(GpuSwiglu *mlp, GpuTensor gate_up, GpuTensor down, int d, int F, int max_rows);
void gpu_swiglu_free(GpuSwiglu *mlp);
void gpu_swiglu_forward(GpuSwiglu *mlp, bf16 *out, const bf16 *x, int N);
// dx (N, d) overwritten, or accumulated into when accumulate.
void gpu_swiglu_backward(GpuSwiglu *mlp, bf16 *dx, const bf16 *dout, bool accumulate, GpuScratch *scratch);

void gpu_moe_init(GpuMoe *layer, const ModelConfig *config, const GpuParams *params, int index, int max_rows);
void gpu_moe_free(GpuMoe *layer);
void gpu_moe_forward(GpuMoe *layer, bf16 *out, const bf16 *x, int N);
void gpu_moe_backward(GpuMoe *layer, bf16 *dx, const bf16 *dout, GpuScratch *scratch);

// Expert parallelism (world->ep > 1, world->comm set): from now on the layer computes only its ep rank's
// experts, on the rows of every rank of its ep group, moved by NCCL all-to-alls (dist/comm.h). The other
// experts' weights stay in the arenas (their gradients stay zero here; the world sum fills them in).
struct World;
void gpu_moe_enable_expert_parallel(GpuMoe *layer, const struct World *world, int max_rows);
#endif
