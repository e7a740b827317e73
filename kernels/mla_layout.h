/* The MLA mixer's data movement between its projections and the attention kernel (CUDA only; the CPU
 * layer does the same with memcpy). kv_b_proj gives per head [k_nope | v]; the compressed projection
 * gives [latent | k_pe] with k_pe shared by all heads. The attention kernel wants k = [k_nope | k_pe]
 * and v per head, contiguous. */
#pragma once
#ifdef KLT_HAVE_CUDA
#include "kernels/device.h"
KLT_C_BEGIN

// k (N, H, Dn+Dr), v (N, H, Dv) from kv (N, H, Dn+Dv) and compressed (N, R+Dr).
void mla_split_kv_cuda(bf16 *k, bf16 *v, const bf16 *kv, const bf16 *compressed, int N, int H, int Dn, int Dr,
                       int Dv, int R);
// The backward: dkv (N, H, Dn+Dv) from dk and dv (overwritten); dcompressed[:, R:] (N, Dr) = the sum over
// heads of dk's pe part (overwritten; the latent columns are left alone).
void mla_merge_kv_grad_cuda(bf16 *dkv, bf16 *dcompressed, const bf16 *dk, const bf16 *dv, int N, int H, int Dn,
                            int Dr, int Dv, int R);

KLT_C_END
#endif
