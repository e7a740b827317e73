// The FFN layers on the GPU: a SwiGLU MLP (dense layers and the shared expert) and the MoE layer
// (router, top-k, permutation, grouped expert GEMMs, weighted combine); see gpu_layers.h and the CPU
// twins ffn_layer.c and moe_layer.c. With expert parallelism (ep > 1) the rows travel to their experts'
// ranks and back by NCCL all-to-alls, with dist/moe_dispatch.c's plan (see "Expert parallelism" below).
#ifdef KLT_HAVE_CUDA
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "dist/comm.h"
#include "dist/world.h"
#include "kernels/activation.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "train/gpu_layers.h"

void gpu_swiglu_init(GpuSwiglu *M, GpuTensor gate_up, GpuTensor down, int d, int F, int max_rows) {
  memset(M, 0, sizeof *M);
  M->d = d;
  M->F = F;
  M->gate_up = gate_up;
  M->down = down;
  M->gate_up_out = device_alloc((size_t)max_rows * 2 * F * sizeof(bf16));
  M->act = device_alloc((size_t)max_rows * F * sizeof(bf16));
}

void gpu_swiglu_free(GpuSwiglu *M) {
  device_free(M->gate_up_out);
  device_free(M->act);
}

void gpu_swiglu_forward(GpuSwiglu *M, bf16 *out, const bf16 *x, int N) {
  M->x = x;
  M->N = N;
  matmul_forward_cuda(M->gate_up_out, x, M->gate_up.w, N, M->d, 2 * M->F);
  swiglu_forward_cuda(M->act, M->gate_up_out, N, M->F);
  matmul_forward_cuda(out, M->act, M->down.w, N, M->F, M->d);
}

void gpu_swiglu_backward(GpuSwiglu *M, bf16 *dx, const bf16 *dout, bool accumulate, GpuScratch *s) {
  const int N = M->N, d = M->d, F = M->F;
  bf16 *dact = s->moe_rows[0], *dgate_up = s->moe_rows[1];
  matmul_backward_cuda(dact, M->down.grad, dout, M->act, M->down.w, N, F, d, false);
  swiglu_backward_cuda(dgate_up, dact, M->gate_up_out, N, F);
  matmul_backward_cuda(dx, M->gate_up.grad, dgate_up, M->x, M->gate_up.w, N, d, 2 * F, accumulate);
}

// [gate; up] of a SwiGLU whose matrices were registered as gate, up, down: adjacent in the arenas, so
// the two are one (2F, d) matrix.
GpuTensor gpu_adjacent_pair(const GpuParams *p, int layer, const char *gate, const char *up, size_t gate_numel) {
  GpuTensor a = gpu_param(p, layer, gate), b = gpu_param(p, layer, up);
  CHECK(b.master - a.master == (ptrdiff_t)gate_numel, "the registry must hold %s and %s side by side", gate, up);
  return a;
}

void gpu_moe_init(GpuMoe *L, const ModelConfig *m, const GpuParams *p, int l, int max_rows) {
  memset(L, 0, sizeof *L);
  L->d = m->hidden_size;
  L->E = m->num_experts;
  L->top_k = m->experts_per_token;
  L->F = m->expert_intermediate_size;
  L->scaling = (float)m->routed_scaling_factor;
  L->router = gpu_param(p, l, "block_sparse_moe.gate.weight");
  L->bias = gpu_param(p, l, "block_sparse_moe.gate.e_score_correction_bias");
  L->experts = gpu_param(p, l, "block_sparse_moe.experts.0.w1.weight");
  GpuTensor w3 = gpu_param(p, l, "block_sparse_moe.experts.0.w3.weight");
  GpuTensor w2 = gpu_param(p, l, "block_sparse_moe.experts.0.w2.weight");
  const long long Fd = (long long)L->F * L->d;
  CHECK(w3.master - L->experts.master == Fd && w2.master - L->experts.master == 2 * Fd,
        "expert matrices must be registered as w1, w3, w2");
  L->expert_stride = 3 * Fd;
  if (L->E > 1) {
    GpuTensor next = gpu_param(p, l, "block_sparse_moe.experts.1.w1.weight");
    CHECK(next.master - L->experts.master == L->expert_stride, "experts must be registered one after another");
  }
  L->has_shared = m->num_shared_experts > 0;
  if (L->has_shared) {
    int F = L->F * m->num_shared_experts;
    GpuTensor gate = gpu_adjacent_pair(p, l, "block_sparse_moe.shared_experts.gate_proj.weight",
                                       "block_sparse_moe.shared_experts.up_proj.weight", (size_t)F * L->d);
    gpu_swiglu_init(&L->shared, gate, gpu_param(p, l, "block_sparse_moe.shared_experts.down_proj.weight"), L->d, F,
                    max_rows);
    L->shared_out = device_alloc((size_t)max_rows * L->d * sizeof(bf16));
  }
  const size_t N = (size_t)max_rows, E = L->E, k = L->top_k, rows = N * k;
  L->logits = device_alloc(N * E * sizeof(float));
  L->scores = device_alloc(N * E * sizeof(float));
  L->expert_index = device_alloc(N * k * sizeof(int));
  L->expert_weight = device_alloc(N * k * sizeof(float));
  L->counts = device_alloc(E * sizeof(int));
  L->offsets = device_alloc((E + 1) * sizeof(int));
  L->offsets_host = klt_calloc(E + 1, sizeof(int));
  L->row_of_assignment = device_alloc(rows * sizeof(int));
  L->token_of_row = device_alloc(rows * sizeof(int));
  L->sorted = device_alloc(rows * L->d * sizeof(bf16));
  L->gate_up_out = device_alloc(rows * 2 * L->F * sizeof(bf16));
  L->act = device_alloc(rows * L->F * sizeof(bf16));
  L->expert_out = device_alloc(rows * L->d * sizeof(bf16));
  L->load = klt_calloc(E, sizeof(double));
}

static void ep_free(GpuMoe *L);
static void ep_forward_experts(GpuMoe *L);
static void ep_backward_experts(GpuMoe *L, GpuScratch *s);

void gpu_moe_free(GpuMoe *L) {
  if (L->ep) ep_free(L);
  if (L->has_shared) {
    gpu_swiglu_free(&L->shared);
    device_free(L->shared_out);
  }
  void *buffers[] = {L->logits, L->scores, L->expert_index, L->expert_weight, L->counts, L->offsets,
                     L->row_of_assignment, L->token_of_row, L->sorted, L->gate_up_out, L->act, L->expert_out};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) device_free(buffers[i]);
  free(L->offsets_host);
  free(L->load);
}

void gpu_moe_forward(GpuMoe *L, bf16 *out, const bf16 *x, int N) {
  const int d = L->d, E = L->E, k = L->top_k, F = L->F;
  L->x = x;
  L->N = N;
  gemm_cuda(false, true, N, E, d, 1.0f, x, d, 0, L->router.w, d, 0, 0.0f, L->logits, E, 0, true, 1);
  moe_router_forward_cuda(L->expert_index, L->expert_weight, L->scores, L->logits, L->bias.master, N, E, k,
                          L->scaling);
  moe_permute_plan_cuda(L->counts, L->offsets, L->row_of_assignment, L->token_of_row, L->expert_index, N, E, k);
  // The grouped GEMMs need each expert's row range on the host: one small copy per layer.
  device_download(L->offsets_host, L->offsets, (size_t)(E + 1) * sizeof(int));
  for (int e = 0; e < E; e++) L->load[e] += L->offsets_host[e + 1] - L->offsets_host[e];
  const int rows = N * k;
  moe_permute_forward_cuda(L->sorted, x, L->token_of_row, rows, d);
  if (L->ep) {
    ep_forward_experts(L);  // expert_out (N*k, d): this rank's rows, back from their experts' ranks
  } else {
    moe_grouped_matmul_forward_cuda(L->gate_up_out, L->sorted, L->experts.w, L->expert_stride, L->offsets_host, E, d,
                                    2 * F);
    swiglu_forward_cuda(L->act, L->gate_up_out, rows, F);
    moe_grouped_matmul_forward_cuda(L->expert_out, L->act, L->experts.w + 2LL * F * d, L->expert_stride,
                                    L->offsets_host, E, F, d);
  }
  if (L->has_shared) gpu_swiglu_forward(&L->shared, L->shared_out, x, N);
  moe_unpermute_forward_cuda(out, L->expert_out, L->expert_weight, L->row_of_assignment,
                             L->has_shared ? L->shared_out : NULL, N, k, d);
}

void gpu_moe_backward(GpuMoe *L, bf16 *dx, const bf16 *dout, GpuScratch *s) {
  const int N = L->N, d = L->d, E = L->E, k = L->top_k, F = L->F, rows = N * k;
  if (L->has_shared) gpu_swiglu_backward(&L->shared, dx, dout, false, s);
  else device_zero(dx, (size_t)N * d * sizeof(bf16));
  bf16 *dexpert_out = s->moe_rows[0], *dact = s->moe_rows[1], *dgate_up = s->moe_rows[2];
  moe_unpermute_backward_cuda(dexpert_out, s->dexpert_weight, dout, L->expert_out, L->expert_weight,
                              L->row_of_assignment, N, k, d);
  if (L->ep) {
    ep_backward_experts(L, s);  // dexpert_out (N*k, d) in, the rows' gradients (N*k, d) back in dexpert_out
  } else {
    moe_grouped_matmul_backward_cuda(dact, L->experts.grad + 2LL * F * d, dexpert_out, L->act,
                                     L->experts.w + 2LL * F * d, L->expert_stride, L->offsets_host, E, F, d);
    swiglu_backward_cuda(dgate_up, dact, L->gate_up_out, rows, F);
    bf16 *dsorted = dexpert_out;  // consumed above
    moe_grouped_matmul_backward_cuda(dsorted, L->experts.grad, dgate_up, L->sorted, L->experts.w, L->expert_stride,
                                     L->offsets_host, E, d, 2 * F);
  }
  moe_permute_backward_cuda(dx, dexpert_out, L->row_of_assignment, N, k, d, true);
  float *dlogits = s->h_float[0];
  moe_router_backward_cuda(dlogits, s->dexpert_weight, L->scores, L->expert_index, N, E, k, L->scaling);
  device_float_to_bf16(s->h_bf16, dlogits, (size_t)N * E);
  matmul_backward_cuda(dx, L->router.grad, s->h_bf16, L->x, L->router.w, N, d, E, true);
}

// ---- Expert parallelism (ep > 1) ----------------------------------------------------------------------
// The plan of dist/moe_dispatch.c on device rows: ep rank r owns experts [r Le, (r+1) Le), a contiguous
// run of this rank's expert-sorted rows, so
//   sorted (N*k, d) --all-to-all--> received (by source rank, then expert) --gather--> rows (by local
//   expert, then source): what the local experts' grouped GEMMs run on
// and the outputs go back the same way reversed. The per-expert counts are exchanged first over MPI
// (host ints; the grouped GEMMs need them on the host anyway). The backward reuses the forward's plan.
// Buffers on the experts' side hold `capacity` rows and grow when a step routes more rows here.
struct GpuMoeEp {
  const World *world;
  const Comm *comm;
  int P, rank, Le, begin;  // ep ranks, this rank's place, local experts, the first of them
  int capacity;            // rows the expert-side buffers below (and gate_up_out, act) hold
  bf16 *rows;              // (capacity, d) the local experts' input rows (kept for the backward)
  int local_rows;          // rows of the current plan
  int *recv_counts;        // (P, Le) rows from each source for each local expert
  int *local_offsets;      // (Le + 1) host: local expert e owns rows [offsets[e], offsets[e+1])
  size_t *send_bytes, *recv_bytes;  // (P)
  int *index_host;         // (2 capacity) received_of_row, then row_of_received
  int *received_of_row;    // (capacity) device: rows[r] = received[received_of_row[r]]
  int *row_of_received;    // (capacity) device: the inverse
};

// Scratch on the experts' side shared by all MoE layers (only one runs at a time).
static struct {
  int users;
  size_t rows;             // capacity
  bf16 *x, *y;             // (rows, d)
  bf16 *dact, *dgate_up;   // (rows, F), (rows, 2F)
} ep_scratch;

static void regrow(void **buffer, size_t bytes) {
  device_free(*buffer);
  *buffer = device_alloc(bytes);
}

static void ep_scratch_reserve(size_t rows, int d, int F) {
  if (rows <= ep_scratch.rows) return;
  regrow((void **)&ep_scratch.x, rows * d * sizeof(bf16));
  regrow((void **)&ep_scratch.y, rows * d * sizeof(bf16));
  regrow((void **)&ep_scratch.dact, rows * F * sizeof(bf16));
  regrow((void **)&ep_scratch.dgate_up, rows * 2 * F * sizeof(bf16));
  ep_scratch.rows = rows;
}

// The layer's expert-side buffers for at least `rows` rows (with a quarter of headroom when they grow).
static void ep_reserve(GpuMoe *L, int rows) {
  struct GpuMoeEp *ep = L->ep;
  if (rows > ep->capacity) {
    size_t capacity = (size_t)rows + rows / 4;
    CHECK(capacity <= (size_t)1 << 30, "expert-parallel capacity of %zu rows", capacity);
    ep->capacity = (int)capacity;
    regrow((void **)&ep->rows, capacity * L->d * sizeof(bf16));
    regrow((void **)&L->gate_up_out, capacity * 2 * L->F * sizeof(bf16));
    regrow((void **)&L->act, capacity * L->F * sizeof(bf16));
    regrow((void **)&ep->received_of_row, capacity * sizeof(int));
    regrow((void **)&ep->row_of_received, capacity * sizeof(int));
    ep->index_host = klt_realloc(ep->index_host, 2 * capacity * sizeof(int));
  }
  ep_scratch_reserve((size_t)ep->capacity, L->d, L->F);
}

void gpu_moe_enable_expert_parallel(GpuMoe *L, const World *world, int max_rows) {
  CHECK(world->ep > 1 && world->comm, "expert parallelism needs ep > 1 and the NCCL communicators");
  if (L->E % world->ep != 0)
    klt_user_error("[parallel] ep = %d must divide [moe] num_experts = %d", world->ep, L->E);
  struct GpuMoeEp *ep = klt_calloc(1, sizeof *ep);
  L->ep = ep;
  ep->world = world;
  ep->comm = world->comm;
  ep->P = world->ep;
  ep->rank = world->ep_rank;
  ep->Le = L->E / world->ep;
  ep->begin = ep->rank * ep->Le;
  CHECK(comm_size(ep->comm, COMM_EP) == ep->P && comm_rank(ep->comm, COMM_EP) == ep->rank,
        "the NCCL ep group does not match the MPI layout");
  ep->recv_counts = klt_calloc((size_t)ep->P * ep->Le, sizeof(int));
  ep->local_offsets = klt_calloc((size_t)ep->Le + 1, sizeof(int));
  ep->send_bytes = klt_calloc((size_t)ep->P, sizeof(size_t));
  ep->recv_bytes = klt_calloc((size_t)ep->P, sizeof(size_t));
  // The ep = 1 buffers of the experts' side are replaced by capacity-sized ones (balanced routing puts
  // N*k rows on every rank; more rows grow them).
  device_free(L->gate_up_out);
  device_free(L->act);
  L->gate_up_out = L->act = NULL;
  ep_reserve(L, max_rows * L->top_k);
  ep_scratch.users++;
}

static void ep_free(GpuMoe *L) {
  struct GpuMoeEp *ep = L->ep;
  device_free(ep->rows);
  device_free(ep->received_of_row);
  device_free(ep->row_of_received);
  free(ep->index_host);
  free(ep->recv_counts);
  free(ep->local_offsets);
  free(ep->send_bytes);
  free(ep->recv_bytes);
  free(ep);
  L->ep = NULL;
  if (--ep_scratch.users == 0) {
    void *buffers[] = {ep_scratch.x, ep_scratch.y, ep_scratch.dact, ep_scratch.dgate_up};
    for (int i = 0; i < 4; i++) device_free(buffers[i]);
    memset(&ep_scratch, 0, sizeof ep_scratch);
  }
}

// From the forward's expert offsets (L->offsets_host): counts exchanged, then the rows' movement.
static void ep_plan(GpuMoe *L) {
  struct GpuMoeEp *ep = L->ep;
  const int P = ep->P, Le = ep->Le;
  const size_t row_bytes = (size_t)L->d * sizeof(bf16);
  int *counts = klt_malloc((size_t)L->E * sizeof(int));
  for (int e = 0; e < L->E; e++) counts[e] = L->offsets_host[e + 1] - L->offsets_host[e];
  world_ep_all_to_all_ints(ep->world, counts, ep->recv_counts, Le);
  free(counts);
  int local_rows = 0;
  for (int e = 0; e <= Le; e++) ep->local_offsets[e] = 0;
  for (int r = 0; r < P; r++) {
    int send = L->offsets_host[(r + 1) * Le] - L->offsets_host[r * Le], recv = 0;
    for (int e = 0; e < Le; e++) {
      recv += ep->recv_counts[r * Le + e];
      ep->local_offsets[e + 1] += ep->recv_counts[r * Le + e];
    }
    ep->send_bytes[r] = (size_t)send * row_bytes;
    ep->recv_bytes[r] = (size_t)recv * row_bytes;
    local_rows += recv;
  }
  for (int e = 0; e < Le; e++) ep->local_offsets[e + 1] += ep->local_offsets[e];
  ep->local_rows = local_rows;
  ep_reserve(L, local_rows);
  // Received rows come by source, then expert; the experts want them by expert, then source.
  int *received_of_row = ep->index_host, *row_of_received = ep->index_host + ep->capacity;
  int row = 0;
  for (int e = 0; e < Le; e++) {
    int source_begin = 0;
    for (int r = 0; r < P; r++) {
      int begin = source_begin;
      for (int f = 0; f < e; f++) begin += ep->recv_counts[r * Le + f];
      for (int i = 0; i < ep->recv_counts[r * Le + e]; i++) received_of_row[row++] = begin + i;
      source_begin += (int)(ep->recv_bytes[r] / row_bytes);
    }
  }
  for (int r = 0; r < local_rows; r++) row_of_received[received_of_row[r]] = r;
  if (local_rows > 0) {
    device_upload(ep->received_of_row, received_of_row, (size_t)local_rows * sizeof(int));
    device_upload(ep->row_of_received, row_of_received, (size_t)local_rows * sizeof(int));
  }
}

// This rank's expert-sorted rows (N*k, d) -> rows (local_rows, d) grouped by local expert.
static void ep_to_experts(struct GpuMoeEp *ep, bf16 *rows, const bf16 *sorted, int d) {
  comm_all_to_all(ep->comm, COMM_EP, sorted, ep->send_bytes, ep_scratch.x, ep->recv_bytes);
  moe_permute_forward_cuda(rows, ep_scratch.x, ep->received_of_row, ep->local_rows, d);
}

// rows (local_rows, d) grouped by local expert -> back to their ranks, in each rank's sorted order.
static void ep_to_tokens(struct GpuMoeEp *ep, bf16 *sorted, const bf16 *rows, int d) {
  moe_permute_forward_cuda(ep_scratch.x, rows, ep->row_of_received, ep->local_rows, d);
  comm_all_to_all(ep->comm, COMM_EP, ep_scratch.x, ep->recv_bytes, sorted, ep->send_bytes);
}

static void ep_forward_experts(GpuMoe *L) {
  struct GpuMoeEp *ep = L->ep;
  const int d = L->d, F = L->F;
  ep_plan(L);
  const bf16 *w = L->experts.w + ep->begin * L->expert_stride;  // the first local expert's w1
  ep_to_experts(ep, ep->rows, L->sorted, d);
  if (ep->local_rows > 0) {
    moe_grouped_matmul_forward_cuda(L->gate_up_out, ep->rows, w, L->expert_stride, ep->local_offsets, ep->Le, d,
                                    2 * F);
    swiglu_forward_cuda(L->act, L->gate_up_out, ep->local_rows, F);
    moe_grouped_matmul_forward_cuda(ep_scratch.y, L->act, w + 2LL * F * d, L->expert_stride, ep->local_offsets,
                                    ep->Le, F, d);
  }
  ep_to_tokens(ep, L->expert_out, ep_scratch.y, d);
}

// d (N*k, d): the gradient of this rank's returned rows in, the gradient of its sorted input rows out.
static void ep_backward_experts(GpuMoe *L, GpuScratch *s) {
  struct GpuMoeEp *ep = L->ep;
  const int d = L->d, F = L->F;
  bf16 *d_rows = s->moe_rows[0];
  const bf16 *w = L->experts.w + ep->begin * L->expert_stride;
  float *dw = L->experts.grad + ep->begin * L->expert_stride;
  ep_to_experts(ep, ep_scratch.y, d_rows, d);  // dexpert_out on the experts' side
  if (ep->local_rows > 0) {
    moe_grouped_matmul_backward_cuda(ep_scratch.dact, dw + 2LL * F * d, ep_scratch.y, L->act, w + 2LL * F * d,
                                     L->expert_stride, ep->local_offsets, ep->Le, F, d);
    swiglu_backward_cuda(ep_scratch.dgate_up, ep_scratch.dact, L->gate_up_out, ep->local_rows, F);
    moe_grouped_matmul_backward_cuda(ep_scratch.y, dw, ep_scratch.dgate_up, ep->rows, w, L->expert_stride,
                                     ep->local_offsets, ep->Le, d, 2 * F);
  }
  ep_to_tokens(ep, d_rows, ep_scratch.y, d);
}
#endif
