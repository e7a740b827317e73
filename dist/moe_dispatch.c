// Expert dispatch and combine; see moe_dispatch.h. With ep = 1 the movement is a local permutation.
#include "dist/moe_dispatch.h"

#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/moe.h"

void moe_dispatch_init(MoeDispatch *d, int num_experts, int top_k, int hidden, int max_tokens, const World *world) {
  memset(d, 0, sizeof *d);
  if (world->ep > 1)
    klt_user_error("[parallel] ep = %d: expert parallelism across ranks is not available yet; use ep = 1", world->ep);
  d->num_experts = num_experts;
  d->top_k = top_k;
  d->hidden = hidden;
  d->ep_size = world->ep;
  d->ep_rank = world->ep_rank;
  d->local_experts = num_experts / world->ep;
  d->local_expert_begin = world->ep_rank * d->local_experts;
  d->max_tokens = max_tokens;
  d->expert_counts = klt_calloc((size_t)num_experts, sizeof(int));
  d->expert_offsets = klt_calloc((size_t)num_experts + 1, sizeof(int));
  d->row_of_assignment = klt_calloc((size_t)max_tokens * top_k, sizeof(int));
  d->token_of_row = klt_calloc((size_t)max_tokens * top_k, sizeof(int));
  d->local_expert_rows = klt_calloc((size_t)d->local_experts, sizeof(int));
}

void moe_dispatch_free(MoeDispatch *d) {
  free(d->expert_counts);
  free(d->expert_offsets);
  free(d->row_of_assignment);
  free(d->token_of_row);
  free(d->local_expert_rows);
  memset(d, 0, sizeof *d);
}

int moe_dispatch_max_local_rows(const MoeDispatch *d) { return d->max_tokens * d->top_k * d->ep_size; }

void moe_dispatch_plan(MoeDispatch *d, const int *expert_index, int N) {
  CHECK(N <= d->max_tokens, "dispatch of %d tokens exceeds the planned %d", N, d->max_tokens);
  d->tokens = N;
  moe_permute_plan(d->expert_counts, d->expert_offsets, d->row_of_assignment, d->token_of_row, expert_index, N,
                   d->num_experts, d->top_k);
  for (int e = 0; e < d->local_experts; e++) d->local_expert_rows[e] = d->expert_counts[d->local_expert_begin + e];
  d->local_rows = N * d->top_k;
}

void moe_dispatch_forward(MoeDispatch *d, real *expert_rows, const real *x) {
  moe_permute_forward(expert_rows, x, d->token_of_row, d->tokens * d->top_k, d->hidden);
}

void moe_combine_forward(MoeDispatch *d, real *out, const real *expert_out, const real *expert_weight) {
  d->returned_rows = expert_out;
  moe_unpermute_forward(out, expert_out, expert_weight, d->row_of_assignment, d->tokens, d->top_k, d->hidden);
}

void moe_combine_backward(MoeDispatch *d, real *dexpert_out, real *dexpert_weight, const real *dout,
                          const real *expert_weight) {
  moe_unpermute_backward(dexpert_out, dexpert_weight, dout, d->returned_rows, expert_weight, d->row_of_assignment,
                         d->tokens, d->top_k, d->hidden);
}

void moe_dispatch_backward(MoeDispatch *d, real *dx, const real *dexpert_rows) {
  moe_permute_backward(dx, dexpert_rows, d->token_of_row, d->tokens * d->top_k, d->hidden);
}
