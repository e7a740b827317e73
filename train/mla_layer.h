/* The MLA mixer, NoPE, as released: per head q = [nope | pe] from q_proj; a compressed latent
 * c = kv_a_proj_with_mqa(x) = [latent | k_pe]; kv = kv_b_proj(rmsnorm(latent)) = per head [k_nope | v];
 * k_h = [k_nope_h | k_pe] (k_pe shared by all heads, never rotated); causal, document-masked softmax
 * attention with scale (nope + pe)^-1/2; o_proj back to the model width. Owns its activations. */
#pragma once
#include "common/real.h"
#include "train/model_config.h"
#include "train/params.h"

typedef struct {
  int H, Dn, Dr, Dv, R, d;  // heads, nope, pe, v dims, latent rank, model width
  double eps;
  // parameters (values, gradients)
  real *q_proj, *kv_a_proj, *kv_a_norm, *kv_b_proj, *o_proj;
  real *dq_proj, *dkv_a_proj, *dkv_a_norm, *dkv_b_proj, *do_proj;
  // activations of the last forward (rows N = B*T)
  int B, T;
  const real *x;            // (N, d) the layer's input, kept by the model
  const unsigned char *doc_start;  // (B, T)
  real *q;                  // (N, H, Dn+Dr)
  real *compressed;         // (N, R+Dr) [latent | k_pe]
  real *latent;             // (N, R)
  real *latent_normed;      // (N, R)
  real *latent_rstd;        // (N)
  real *kv;                 // (N, H, Dn+Dv)
  real *k;                  // (N, H, Dn+Dr)
  real *v;                  // (N, H, Dv)
  real *attn;               // (N, H, Dv)
  real *lse;                // (N, H)
  real *step_max_logit;     // (H) max over this step's forwards
  real *call_max_logit;     // (H)
  // backward scratch
  real *dattn, *dq, *dk, *dv, *dkv, *dlatent_normed, *dlatent, *dcompressed;
} MlaLayer;

void mla_layer_init(MlaLayer *layer, const ModelConfig *config, const ParamRegistry *params, int index, int max_rows);
void mla_layer_free(MlaLayer *layer);
// out (N, d) = mixer(x (N, d)); x must stay unchanged until the backward.
void mla_layer_forward(MlaLayer *layer, real *out, const real *x, const unsigned char *doc_start, int B, int T);
// dx (N, d) += gradient through the mixer of dout (N, d); parameter gradients added into the registry.
void mla_layer_backward(MlaLayer *layer, real *dx, const real *dout);
