// NCCL communicators and device-buffer collectives; see comm.h.
#ifdef KLT_HAVE_CUDA
#include "dist/comm.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/check.h"
#include "kernels/device.h"

// NCCL_CHECK(ncclAllReduce(...)): a failed NCCL call stops the rank naming the call and NCCL's reason
// (and its last warning, which usually says which peer or transport failed).
#define NCCL_CHECK(call)                                                                                     \
  do {                                                                                                       \
    ncclResult_t klt_nccl_status_ = (call);                                                                  \
    CHECK(klt_nccl_status_ == ncclSuccess,                                                                   \
          "NCCL: %s (%s). If a peer died, its own message comes first; NCCL_DEBUG=WARN says more",          \
          ncclGetErrorString(klt_nccl_status_), ncclGetLastError(NULL));                                     \
  } while (0)

struct Comm {
  ncclComm_t comms[COMM_GROUPS];  // NULL where the group is this rank alone
  int size[COMM_GROUPS], rank[COMM_GROUPS];
};

static int profiling = -1;
static double profile_seconds[COMM_KINDS];
static long profile_calls[COMM_KINDS];

static double profile_begin(void) {
  if (profiling < 0) profiling = getenv("KLT_PROFILE") != NULL || getenv("KLT_PROFILE_COMM") != NULL;
  if (!profiling) return 0;
  device_synchronize();
  return klt_now_seconds();
}
static void profile_end(CommKind kind, double start) {
  if (!profiling) return;
  device_synchronize();
  profile_seconds[kind] += klt_now_seconds() - start;
  profile_calls[kind]++;
}
double comm_profile_seconds(CommKind kind, long *calls) {
  if (calls) *calls = profile_calls[kind];
  return profile_seconds[kind];
}
void comm_profile_reset(void) {
  for (int k = 0; k < COMM_KINDS; k++) profile_seconds[k] = 0, profile_calls[k] = 0;
}

void comm_select_device(const World *world) {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) count = 0;
  if (world->local_size > count)
    klt_user_error("%d ranks run on this node but it has %d GPU(s) (CUDA: %s): start at most one rank per GPU "
                   "(mpirun -np N with N <= GPUs per node, or a hostfile with slots = GPUs)",
                   world->local_size, count, status == cudaSuccess ? "ok" : cudaGetErrorString(status));
  device_select(world->local_rank);
}

Comm *comm_create(World *world) {
  world->comm = NULL;
  if (world->size == 1) return NULL;
  Comm *c = klt_calloc(1, sizeof *c);
  ncclUniqueId id;
  if (world->rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  world_broadcast_bytes(world, &id, sizeof id, 0);
  NCCL_CHECK(ncclCommInitRank(&c->comms[COMM_WORLD], world->size, id, world->rank));
  // Splits (collective over the world; every rank calls both).
  const int ep = world->ep, groups = world->size / ep;
  int colors[COMM_GROUPS] = {0, world->dp_rank / ep, world->ep_rank};
  int sizes[COMM_GROUPS] = {world->size, ep, groups};
  int ranks[COMM_GROUPS] = {world->rank, world->ep_rank, world->dp_rank / ep};
  for (int g = COMM_EP; g < COMM_GROUPS; g++) {
    ncclComm_t split = NULL;
    NCCL_CHECK(ncclCommSplit(c->comms[COMM_WORLD], sizes[g] > 1 ? colors[g] : NCCL_SPLIT_NOCOLOR, ranks[g], &split,
                             NULL));
    c->comms[g] = sizes[g] > 1 ? split : NULL;
  }
  for (int g = 0; g < COMM_GROUPS; g++) {
    c->size[g] = sizes[g];
    c->rank[g] = ranks[g];
    if (c->comms[g]) {
      int n = 0, r = 0;
      NCCL_CHECK(ncclCommCount(c->comms[g], &n));
      NCCL_CHECK(ncclCommUserRank(c->comms[g], &r));
      CHECK(n == sizes[g] && r == ranks[g], "NCCL group %d: rank %d of %d, expected %d of %d", g, r, n, ranks[g],
            sizes[g]);
    }
  }
  world->comm = c;
  return c;
}

void comm_destroy(Comm *c) {
  if (!c) return;
  device_synchronize();
  for (int g = COMM_GROUPS - 1; g >= 0; g--)
    if (c->comms[g]) NCCL_CHECK(ncclCommDestroy(c->comms[g]));
  free(c);
}

int comm_size(const Comm *c, CommGroup g) { return c ? c->size[g] : 1; }
int comm_rank(const Comm *c, CommGroup g) { return c ? c->rank[g] : 0; }

// The group's communicator, or NULL when the group is this rank alone (then a collective is a copy or nothing).
static ncclComm_t group_comm(const Comm *c, CommGroup g) { return c ? c->comms[g] : NULL; }

void comm_all_reduce_sum(const Comm *c, CommGroup g, float *buffer, size_t count) {
  ncclComm_t comm = group_comm(c, g);
  if (!comm || count == 0) return;
  double start = profile_begin();
  NCCL_CHECK(ncclAllReduce(buffer, buffer, count, ncclFloat32, ncclSum, comm, device_stream()));
  profile_end(COMM_KIND_ALL_REDUCE, start);
}

void comm_reduce_scatter_sum(const Comm *c, CommGroup g, const float *send, float *recv, size_t count) {
  ncclComm_t comm = group_comm(c, g);
  if (!comm) {
    if (send != recv) device_copy(recv, send, count * sizeof(float));
    return;
  }
  double start = profile_begin();
  NCCL_CHECK(ncclReduceScatter(send, recv, count, ncclFloat32, ncclSum, comm, device_stream()));
  profile_end(COMM_KIND_OTHER, start);
}

void comm_all_gather(const Comm *c, CommGroup g, const void *send, void *recv, size_t bytes) {
  ncclComm_t comm = group_comm(c, g);
  if (!comm) {
    if (send != recv) device_copy(recv, send, bytes);
    return;
  }
  double start = profile_begin();
  NCCL_CHECK(ncclAllGather(send, recv, bytes, ncclChar, comm, device_stream()));
  profile_end(COMM_KIND_OTHER, start);
}

void comm_reduce_ranges_sum(const Comm *c, CommGroup g, float *buffer, const size_t *cuts) {
  ncclComm_t comm = group_comm(c, g);
  if (!comm) return;
  double start = profile_begin();
  NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < c->size[g]; r++) {
    CHECK(cuts[r + 1] >= cuts[r], "ranged reduce: cut %d before cut %d", r + 1, r);
    if (cuts[r + 1] > cuts[r])
      NCCL_CHECK(ncclReduce(buffer + cuts[r], buffer + cuts[r], cuts[r + 1] - cuts[r], ncclFloat32, ncclSum, r, comm,
                            device_stream()));
  }
  NCCL_CHECK(ncclGroupEnd());
  profile_end(COMM_KIND_ALL_REDUCE, start);
}

void comm_all_gather_ranges(const Comm *c, CommGroup g, void *buffer, const size_t *cuts, size_t element_bytes) {
  ncclComm_t comm = group_comm(c, g);
  if (!comm) return;
  double start = profile_begin();
  char *bytes = buffer;
  NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < c->size[g]; r++) {
    CHECK(cuts[r + 1] >= cuts[r], "ranged all-gather: cut %d before cut %d", r + 1, r);
    if (cuts[r + 1] > cuts[r])
      NCCL_CHECK(ncclBroadcast(bytes + cuts[r] * element_bytes, bytes + cuts[r] * element_bytes,
                               (cuts[r + 1] - cuts[r]) * element_bytes, ncclChar, r, comm, device_stream()));
  }
  NCCL_CHECK(ncclGroupEnd());
  profile_end(COMM_KIND_GATHER, start);
}

void comm_broadcast(const Comm *c, CommGroup g, void *buffer, size_t bytes, int root) {
  ncclComm_t comm = group_comm(c, g);
  if (!comm) return;
  double start = profile_begin();
  NCCL_CHECK(ncclBroadcast(buffer, buffer, bytes, ncclChar, root, comm, device_stream()));
  profile_end(COMM_KIND_OTHER, start);
}

void comm_all_to_all(const Comm *c, CommGroup g, const void *send, const size_t *send_bytes, void *recv,
                     const size_t *recv_bytes) {
  ncclComm_t comm = group_comm(c, g);
  if (!comm) {
    if (send_bytes[0] > 0) device_copy(recv, send, send_bytes[0]);
    return;
  }
  const int n = c->size[g];
  double start = profile_begin();
  size_t send_at = 0, recv_at = 0;
  NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < n; r++) {
    if (send_bytes[r] > 0)
      NCCL_CHECK(ncclSend((const char *)send + send_at, send_bytes[r], ncclChar, r, comm, device_stream()));
    if (recv_bytes[r] > 0)
      NCCL_CHECK(ncclRecv((char *)recv + recv_at, recv_bytes[r], ncclChar, r, comm, device_stream()));
    send_at += send_bytes[r];
    recv_at += recv_bytes[r];
  }
  NCCL_CHECK(ncclGroupEnd());
  profile_end(COMM_KIND_ALL_TO_ALL, start);
}

bool comm_healthy(const Comm *c, char *message, size_t message_size) {
  if (!c) return true;
  static const char *names[COMM_GROUPS] = {"world", "expert-parallel", "expert-data-parallel"};
  for (int g = 0; g < COMM_GROUPS; g++) {
    if (!c->comms[g]) continue;
    ncclResult_t async = ncclSuccess;
    ncclResult_t status = ncclCommGetAsyncError(c->comms[g], &async);
    if (status != ncclSuccess) async = status;
    if (async != ncclSuccess && async != ncclInProgress) {
      snprintf(message, message_size, "NCCL %s communicator failed: %s (%s)", names[g], ncclGetErrorString(async),
               ncclGetLastError(c->comms[g]));
      return false;
    }
  }
  return true;
}
#endif
