// Expert dispatch and combine; see moe_dispatch.h.
#include "dist/moe_dispatch.h"

#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/moe.h"

void moe_dispatch_init(MoeDispatch *d, int num_experts, int top_k, int hidden, int max_tokens, const World *world) {
  memset(d, 0, sizeof *d);
  if (num_experts % world->ep != 0)
    klt_user_error("[parallel] ep = %d must divide [moe] num_experts = %d", world->ep, num_experts);
  d->world = world;
  d->num_experts = num_experts;
  d->top_k = top_k;
  d->hidden = hidden;
  d->ep_size = world->ep;
  d->ep_rank = world->ep_rank;
  d->local_experts = num_experts / world->ep;
  d->local_expert_begin = world->ep_rank * d->local_experts;
  d->max_tokens = max_tokens;
  size_t assignments = (size_t)max_tokens * top_k;
  d->expert_counts = klt_calloc((size_t)num_experts, sizeof(int));
  d->expert_offsets = klt_calloc((size_t)num_experts + 1, sizeof(int));
  d->row_of_assignment = klt_calloc(assignments, sizeof(int));
  d->token_of_row = klt_calloc(assignments, sizeof(int));
  d->local_expert_rows = klt_calloc((size_t)d->local_experts, sizeof(int));
  if (d->ep_size > 1) {
    size_t local = (size_t)moe_dispatch_max_local_rows(d);
    d->send_rows = klt_calloc((size_t)d->ep_size, sizeof(int));
    d->recv_rows = klt_calloc((size_t)d->ep_size, sizeof(int));
    d->recv_expert_counts = klt_calloc((size_t)d->ep_size * d->local_experts, sizeof(int));
    d->received_of_row = klt_calloc(local, sizeof(int));
    d->sorted = klt_calloc(assignments * hidden, sizeof(real));
    d->received = klt_calloc(local * hidden, sizeof(real));
    d->returned = klt_calloc(assignments * hidden, sizeof(real));
    d->expert_side = klt_calloc(local * hidden, sizeof(real));
  }
}

void moe_dispatch_free(MoeDispatch *d) {
  free(d->expert_counts);
  free(d->expert_offsets);
  free(d->row_of_assignment);
  free(d->token_of_row);
  free(d->local_expert_rows);
  free(d->send_rows);
  free(d->recv_rows);
  free(d->recv_expert_counts);
  free(d->received_of_row);
  free(d->sorted);
  free(d->received);
  free(d->returned);
  free(d->expert_side);
  memset(d, 0, sizeof *d);
}

int moe_dispatch_max_local_rows(const MoeDispatch *d) { return d->max_tokens * d->top_k * d->ep_size; }

void moe_dispatch_plan(MoeDispatch *d, const int *expert_index, int N) {
  CHECK(N <= d->max_tokens, "dispatch of %d tokens exceeds the planned %d", N, d->max_tokens);
  d->tokens = N;
  moe_permute_plan(d->expert_counts, d->expert_offsets, d->row_of_assignment, d->token_of_row, expert_index, N,
                   d->num_experts, d->top_k);
  const int P = d->ep_size, Le = d->local_experts;
  if (P == 1) {
    memcpy(d->local_expert_rows, d->expert_counts, sizeof(int) * Le);
    d->local_rows = N * d->top_k;
    return;
  }
  // Each ep rank r holds experts [r*Le, (r+1)*Le): a contiguous run of the expert-sorted rows.
  for (int r = 0; r < P; r++) d->send_rows[r] = d->expert_offsets[(r + 1) * Le] - d->expert_offsets[r * Le];
  world_ep_all_to_all_ints(d->world, d->expert_counts, d->recv_expert_counts, Le);
  d->local_rows = 0;
  memset(d->local_expert_rows, 0, sizeof(int) * Le);
  for (int s = 0; s < P; s++) {
    d->recv_rows[s] = 0;
    for (int e = 0; e < Le; e++) {
      d->recv_rows[s] += d->recv_expert_counts[s * Le + e];
      d->local_expert_rows[e] += d->recv_expert_counts[s * Le + e];
    }
    d->local_rows += d->recv_rows[s];
  }
  // Received rows come by source, then expert; the experts want them by expert, then source.
  int row = 0;
  for (int e = 0; e < Le; e++) {
    int source_begin = 0;
    for (int s = 0; s < P; s++) {
      int begin = source_begin;
      for (int f = 0; f < e; f++) begin += d->recv_expert_counts[s * Le + f];
      for (int i = 0; i < d->recv_expert_counts[s * Le + e]; i++) d->received_of_row[row++] = begin + i;
      source_begin += d->recv_rows[s];
    }
  }
}

static void copy_row(real *to, const real *from, int hidden) { memcpy(to, from, sizeof(real) * hidden); }

// Sorted rows of this rank -> expert-grouped rows at the experts' ranks (forward of dispatch, and the
// backward of combine: both move rows from the tokens' side to the experts' side).
static void to_experts(MoeDispatch *d, real *expert_rows, const real *sorted) {
  world_ep_all_to_all(d->world, sorted, d->send_rows, d->received, d->recv_rows, d->hidden);
  for (int r = 0; r < d->local_rows; r++)
    copy_row(expert_rows + (size_t)r * d->hidden, d->received + (size_t)d->received_of_row[r] * d->hidden, d->hidden);
}

// Expert-grouped rows -> back to their tokens' ranks, in each rank's sorted order.
static void to_tokens(MoeDispatch *d, real *sorted, const real *expert_rows) {
  for (int r = 0; r < d->local_rows; r++)
    copy_row(d->received + (size_t)d->received_of_row[r] * d->hidden, expert_rows + (size_t)r * d->hidden, d->hidden);
  world_ep_all_to_all(d->world, d->received, d->recv_rows, sorted, d->send_rows, d->hidden);
}

void moe_dispatch_forward(MoeDispatch *d, real *expert_rows, const real *x) {
  int rows = d->tokens * d->top_k;
  if (d->ep_size == 1) {
    moe_permute_forward(expert_rows, x, d->token_of_row, rows, d->hidden);
    return;
  }
  moe_permute_forward(d->sorted, x, d->token_of_row, rows, d->hidden);
  to_experts(d, expert_rows, d->sorted);
}

void moe_combine_forward(MoeDispatch *d, real *out, const real *expert_out, const real *expert_weight) {
  if (d->ep_size == 1) {
    d->returned_rows = expert_out;
  } else {
    to_tokens(d, d->returned, expert_out);
    d->returned_rows = d->returned;
  }
  moe_unpermute_forward(out, d->returned_rows, expert_weight, d->row_of_assignment, d->tokens, d->top_k, d->hidden);
}

void moe_combine_backward(MoeDispatch *d, real *dexpert_out, real *dexpert_weight, const real *dout,
                          const real *expert_weight) {
  size_t rows = (size_t)d->tokens * d->top_k;
  if (d->ep_size == 1) {
    moe_unpermute_backward(dexpert_out, dexpert_weight, dout, d->returned_rows, expert_weight, d->row_of_assignment,
                           d->tokens, d->top_k, d->hidden);
    return;
  }
  memset(d->sorted, 0, sizeof(real) * rows * d->hidden);
  moe_unpermute_backward(d->sorted, dexpert_weight, dout, d->returned_rows, expert_weight, d->row_of_assignment,
                         d->tokens, d->top_k, d->hidden);
  // dexpert_out is added into: route the row gradients to the experts, then add.
  to_experts(d, d->expert_side, d->sorted);
  for (size_t i = 0; i < (size_t)d->local_rows * d->hidden; i++) dexpert_out[i] += d->expert_side[i];
}

void moe_dispatch_backward(MoeDispatch *d, real *dx, const real *dexpert_rows) {
  int rows = d->tokens * d->top_k;
  if (d->ep_size == 1) {
    moe_permute_backward(dx, dexpert_rows, d->token_of_row, rows, d->hidden);
    return;
  }
  to_tokens(d, d->sorted, dexpert_rows);
  moe_permute_backward(dx, d->sorted, d->token_of_row, rows, d->hidden);
}
