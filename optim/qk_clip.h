/* QK-Clip, the "Clip" of MuonClip (Kimi K2), for the MLA layers: after the optimizer step, every
 * head whose largest scaled attention logit of the step exceeded tau gets its query and key weights
 * shrunk so that the same inputs would now give exactly tau. With gamma = tau / max_logit the nope
 * query rows and the head's k_nope rows of kv_b_proj are each scaled by sqrt(gamma) (their product
 * by gamma), and the query "pe" rows by gamma, because the k_pe they meet is shared by all heads and
 * is left alone. Values, and heads at or below tau, are untouched. The forward and backward of the
 * step that measured the logits are not changed; only the weights for the next step are.
 * Layouts are those of the released modeling_kimi.py (weights (out, in)). */
#pragma once
#include "common/real.h"

// Returns the number of heads clipped. max_logit is the per-head maximum of
// (Dn + Dr)^-1/2 (q_nope . k_nope + q_pe . k_pe) over the step, already max-reduced over
// micro-batches and ranks; heads with max_logit <= tau (including <= 0) are skipped. q_proj or
// kv_b_proj may be NULL (another rank of the sharded optimizer owns it): only the other is scaled,
// and the count is the same.
int qk_clip_apply(real *q_proj,            // (H * (Dn + Dr), C): head h: Dn nope rows, then Dr pe rows
                  real *kv_b_proj,         // (H * (Dn + Dv), L): head h: Dn k_nope rows, then Dv v rows
                  const real *max_logit,   // (H)
                  real tau, int H, int Dn, int Dr, int Dv, int C, int L);

#ifdef KLT_HAVE_CUDA
#include "kernels/device.h"
KLT_C_BEGIN
// CUDA: qk_clip_apply on fp32 device weights; max_logit is a host array (H), already reduced.
int qk_clip_apply_cuda(float *q_proj, float *kv_b_proj, const float *max_logit, float tau, int H, int Dn, int Dr,
                       int Dv, int C, int L);
KLT_C_END
#endif
