/* Expert dispatch and combine: moves each token's copies to the rank that holds the chosen expert,
 * grouped by expert, and brings the expert outputs back weighted by the router. The MoE layer always
 * goes through this interface; with ep = 1 it is a local permutation (kernels/moe.h), with ep > 1 a
 * variable-count all-to-all inside the expert-parallel group (per-expert counts exchanged first).
 * Dropless: every assignment is computed. One plan per forward: moe_dispatch_plan, then forward and
 * combine; the backward reuses the plan.
 *   this rank's tokens --permute--> sorted by expert --all-to-all--> received (by source, then expert)
 *   --regroup--> expert_rows (by local expert, then source): what the experts compute on. */
#pragma once
#include "common/real.h"
#include "dist/world.h"

typedef struct {
  const World *world;
  int num_experts, top_k, hidden;
  int ep_size, ep_rank;
  int local_expert_begin, local_experts;  // this rank's experts: [begin, begin + count)
  int max_tokens;                         // capacity planned for (N per forward)
  // Plan of the current forward.
  int tokens;               // N
  int *expert_counts;       // (num_experts) assignments per expert, this rank's tokens
  int *expert_offsets;      // (num_experts + 1)
  int *row_of_assignment;   // (max_tokens * top_k)
  int *token_of_row;        // (max_tokens * top_k)
  int local_rows;           // rows this rank's experts process (all ep ranks' tokens for them)
  int *local_expert_rows;   // (local_experts) rows per local expert, grouped in expert order
  // Expert parallelism (ep > 1).
  int *send_rows, *recv_rows;   // (ep) rows to / from each ep rank
  int *recv_expert_counts;      // (ep, local_experts) rows from each source for each local expert
  int *received_of_row;         // (max local rows) expert-grouped row -> its row in the received order
  real *sorted;                 // (max_tokens * top_k, hidden) this rank's rows, sorted by expert
  real *received;               // (max local rows, hidden) rows in the order they arrive
  real *returned;               // (max_tokens * top_k, hidden) expert outputs back at this rank
  real *expert_side;            // (max local rows, hidden) gradients arriving at the experts
  const real *returned_rows;    // (N * top_k, hidden) expert outputs of this rank's assignments
} MoeDispatch;

void moe_dispatch_init(MoeDispatch *d, int num_experts, int top_k, int hidden, int max_tokens, const World *world);
void moe_dispatch_free(MoeDispatch *d);
// Upper bound on local_rows for buffers: every assignment of every ep rank's tokens lands here.
int moe_dispatch_max_local_rows(const MoeDispatch *d);
// Plans the movement for this forward from the router's choices expert_index (N, top_k).
void moe_dispatch_plan(MoeDispatch *d, const int *expert_index, int N);
// x (N, hidden) -> expert_rows (local_rows, hidden), grouped by local expert.
void moe_dispatch_forward(MoeDispatch *d, real *expert_rows, const real *x);
// expert_out (local_rows, hidden) -> out (N, hidden) = sum over a token's experts of weight x output.
// expert_out must stay unchanged until moe_combine_backward (the backward reads it).
void moe_combine_forward(MoeDispatch *d, real *out, const real *expert_out, const real *expert_weight);
// Backward of combine: dexpert_out (local_rows, hidden) +=, dexpert_weight (N, top_k) +=.
void moe_combine_backward(MoeDispatch *d, real *dexpert_out, real *dexpert_weight, const real *dout,
                          const real *expert_weight);
// Backward of dispatch: dx (N, hidden) += the gradients of each token's copies.
void moe_dispatch_backward(MoeDispatch *d, real *dx, const real *dexpert_rows);
