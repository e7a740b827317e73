/* Mixture-of-experts routing and token shuffling, the parts of a MoE layer that are not expert
 * GEMMs. The router (DeepSeek-V3 / Kimi style) scores experts with a sigmoid, chooses each token's
 * top_k experts by score + bias (the bias, moved by aux-loss-free balancing, only routes) and weights
 * them by their plain scores renormalized to sum 1 times routed_scaling. The permutation groups the
 * N * top_k (token, slot) assignments by expert, so each expert's rows are contiguous for one GEMM
 * (and for the expert-parallel all-to-all); unpermute combines the expert outputs back per token with
 * the routing weights. No token is dropped. */
#pragma once

#include "common/real.h"

// scores = sigmoid(logits); expert_index[n, :] = the top_k experts of token n by scores + bias, in
// decreasing order of that sum, ties broken by the lower expert index; expert_weight[n, j] =
// scores[n, expert_index[n, j]] / (sum of the chosen scores + 1e-20) * routed_scaling.
void moe_router_forward(int *expert_index,    // (N, top_k)
                        real *expert_weight,  // (N, top_k)
                        real *scores,         // (N, E)
                        const real *logits,   // (N, E)
                        const real *bias,     // (E) or NULL
                        int N, int E, int top_k, real routed_scaling);

// dlogits += gradient through expert_weight for the chosen experts (the choice is piecewise constant,
// so it carries no gradient; unchosen experts get none).
void moe_router_backward(real *dlogits,               // (N, E)
                         const real *dexpert_weight,  // (N, top_k)
                         const real *scores,          // (N, E)
                         const int *expert_index,     // (N, top_k)
                         int N, int E, int top_k, real routed_scaling);

// Sequence-wise auxiliary balance loss (DeepSeek-V3), per row b of T tokens:
//   L_b = coef * sum_i f_i P_i,  f_i = E / (top_k T) * (tokens of the row choosing i),
//   P_i = (1 / T) sum_t s_ti / sum_j s_tj  (s = sigmoid scores)
// Returns sum_b L_b and adds weight * dL_b / dlogits into dlogits (f is a count: no gradient).
double moe_sequence_balance_loss(real *dlogits,           // (B*T, E) or NULL
                                 const real *scores,      // (B*T, E)
                                 const int *expert_index, // (B*T, top_k)
                                 int B, int T, int E, int top_k, real coef, real weight);

// Groups the N * top_k assignments by expert, stable in (token, slot) order within an expert:
// expert e owns rows [expert_offsets[e], expert_offsets[e + 1]) of the sorted buffer, holding
// expert_counts[e] rows; assignment (n, j) lands in row row_of_assignment[n * top_k + j], and row r
// holds token token_of_row[r].
void moe_permute_plan(int *expert_counts,       // (E)
                      int *expert_offsets,      // (E + 1)
                      int *row_of_assignment,   // (N * top_k)
                      int *token_of_row,        // (N * top_k)
                      const int *expert_index,  // (N, top_k)
                      int N, int E, int top_k);

// sorted[r] = x[token_of_row[r]] for the rows = N * top_k rows of the sorted buffer.
void moe_permute_forward(real *sorted,             // (rows, C)
                         const real *x,            // (N, C)
                         const int *token_of_row,  // (rows)
                         int rows, int C);

// dx[token_of_row[r]] += dsorted[r].
void moe_permute_backward(real *dx,                 // (N, C)
                          const real *dsorted,      // (rows, C)
                          const int *token_of_row,  // (rows)
                          int rows, int C);

// out[n] = sum_j expert_weight[n, j] * expert_out[row_of_assignment[n * top_k + j]]; overwrites out.
void moe_unpermute_forward(real *out,                     // (N, C)
                           const real *expert_out,        // (N * top_k, C)
                           const real *expert_weight,     // (N, top_k)
                           const int *row_of_assignment,  // (N * top_k)
                           int N, int top_k, int C);

// dexpert_out[row(n, j)] += expert_weight[n, j] * dout[n];
// dexpert_weight[n, j] += dout[n] . expert_out[row(n, j)]. Either gradient may be NULL.
void moe_unpermute_backward(real *dexpert_out,             // (N * top_k, C)
                            real *dexpert_weight,          // (N, top_k)
                            const real *dout,              // (N, C)
                            const real *expert_out,        // (N * top_k, C)
                            const real *expert_weight,     // (N, top_k)
                            const int *row_of_assignment,  // (N * top_k)
                            int N, int top_k, int C);

#ifdef KLT_HAVE_CUDA
/* CUDA, same semantics as the CPU ops (gradients overwritten rather than added unless noted). Router
 * logits, scores and weights are fp32, rows bf16. The plan is a stable radix sort of the assignments
 * by expert (the CPU's plan exactly). The grouped expert GEMMs take each expert's row range on the
 * host (offsets_host, E + 1 entries: the layer copies the offsets down once per layer), and expert e's
 * (OC, C) weight at weight + e * weight_stride elements; empty experts are skipped. KLT_MOE_GEMM picks
 * their form: lt (default: one cuBLASLt call per expert over 2 side streams, cached algorithms), grouped
 * (cublasGemmGroupedBatchedEx) or loop (gemm_cuda per expert); see kernels/moe.cu for the timings. */
#include <stdbool.h>

#include "kernels/device.h"
KLT_C_BEGIN
void moe_router_forward_cuda(int *expert_index /*(N,k)*/, float *expert_weight /*(N,k)*/, float *scores /*(N,E)*/,
                             const float *logits /*(N,E)*/, const float *bias /*(E) or NULL*/, int N, int E,
                             int top_k, float routed_scaling);
// dlogits (N, E) fp32 OVERWRITTEN (zero for the experts not chosen).
void moe_router_backward_cuda(float *dlogits /*(N,E)*/, const float *dexpert_weight, const float *scores,
                              const int *expert_index, int N, int E, int top_k, float routed_scaling);
// Same plan as the CPU's (stable by (token, slot) within an expert); all outputs on the device.
void moe_permute_plan_cuda(int *expert_counts /*(E)*/, int *expert_offsets /*(E+1)*/, int *row_of_assignment /*(N*k)*/,
                           int *token_of_row /*(N*k)*/, const int *expert_index, int N, int E, int top_k);
void moe_permute_forward_cuda(bf16 *sorted /*(N*k,C)*/, const bf16 *x /*(N,C)*/, const int *token_of_row, int rows,
                              int C);
// dx[n] = (accumulate ? dx[n] : 0) + sum_j dsorted[row_of_assignment[n k + j]] (deterministic gather form).
void moe_permute_backward_cuda(bf16 *dx, const bf16 *dsorted, const int *row_of_assignment, int N, int top_k, int C,
                               bool accumulate);
// out[n] = (shared_out ? shared_out[n] : 0) + sum_j expert_weight[n, j] expert_out[row(n, j)]; overwrites out.
void moe_unpermute_forward_cuda(bf16 *out, const bf16 *expert_out, const float *expert_weight,
                                const int *row_of_assignment, const bf16 *shared_out, int N, int top_k, int C);
// dexpert_out (N*k, C) bf16 and dexpert_weight (N, k) fp32 OVERWRITTEN (either may be NULL).
void moe_unpermute_backward_cuda(bf16 *dexpert_out, float *dexpert_weight, const bf16 *dout, const bf16 *expert_out,
                                 const float *expert_weight, const int *row_of_assignment, int N, int top_k, int C);
// out rows [offsets[e], offsets[e+1]) (rows, OC) = inp rows (rows, C) @ weight_e^T, weight_e (OC, C).
void moe_grouped_matmul_forward_cuda(bf16 *out, const bf16 *inp, const bf16 *weight, long long weight_stride,
                                     const int *offsets_host, int E, int C, int OC);
// dinp (rows, C) OVERWRITTEN; dweight_e (OC, C) fp32 += (at dweight + e * weight_stride). Either may be NULL.
void moe_grouped_matmul_backward_cuda(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp,
                                      const bf16 *weight, long long weight_stride, const int *offsets_host, int E,
                                      int C, int OC);
KLT_C_END
#endif
