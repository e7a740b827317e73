/* NCCL collectives on DEVICE buffers (CUDA backend only; host buffers go through dist/world.h).
 * One communicator over the world (the data-parallel ranks while cp = 1), created from a unique id that
 * rank 0 broadcasts over MPI, and two splits of it:
 *   ep         the ep ranks of one expert-parallel group (ranks dp_rank / ep alike), ordered by ep_rank
 *   expert_dp  the ranks that hold the same experts (ep_rank alike), one per ep group
 * Every call is enqueued on klt's stream (device_stream()) and returns at once; a failed NCCL call stops
 * the rank with the call and NCCL's reason, and the watchdog polls the communicators' asynchronous
 * errors (a dead peer), so no rank hangs silently. With KLT_PROFILE (or only KLT_PROFILE_COMM) set, each
 * collective synchronizes before and after and its time is summed per kind (comm_profile_seconds). */
#pragma once
#ifdef KLT_HAVE_CUDA
#include <stdbool.h>
#include <stddef.h>

#include "dist/world.h"

typedef enum { COMM_WORLD, COMM_EP, COMM_EXPERT_DP, COMM_GROUPS } CommGroup;
// Profile kinds: gradient reductions (all-reduce, ranged reduce), all-to-all, the ranged weight all-gather, the rest.
typedef enum { COMM_KIND_ALL_REDUCE, COMM_KIND_ALL_TO_ALL, COMM_KIND_GATHER, COMM_KIND_OTHER, COMM_KINDS } CommKind;

typedef struct Comm Comm;

// Checks that this node has a GPU for every rank on it (a user error otherwise, on every rank) and
// selects the GPU of this rank's node-local index. Call before anything else touches CUDA.
void comm_select_device(const World *world);
// Creates the communicators (collective over the world); the result is also world->comm. NULL on one rank.
Comm *comm_create(World *world);
void comm_destroy(Comm *comm);
int comm_size(const Comm *comm, CommGroup group);  // ranks in the group (1 for a group not split off)
int comm_rank(const Comm *comm, CommGroup group);

// In place: buffer (count) fp32 = the sum over the group's ranks.
void comm_all_reduce_sum(const Comm *comm, CommGroup group, float *buffer, size_t count);
// recv (count) fp32 = the sum over ranks of send's slice [rank * count, (rank + 1) * count).
void comm_reduce_scatter_sum(const Comm *comm, CommGroup group, const float *send, float *recv, size_t count);
// recv (group size x bytes) = every rank's send (bytes), in rank order.
void comm_all_gather(const Comm *comm, CommGroup group, const void *send, void *recv, size_t bytes);
// Ranged collectives of the sharded optimizer: group rank r owns elements [cuts[r], cuts[r + 1]) of the
// buffer (cuts: group size + 1 non-decreasing element offsets, the same on every rank). The ranges are
// uneven (whole Muon matrices, balanced by cost), which ncclReduceScatter / ncclAllGather (equal counts)
// do not take: one ncclReduce (to the owner) or ncclBroadcast (from the owner) per non-empty range, in
// one NCCL group, which moves the same bytes as the equal-count collectives without padding copies.
// Reduce, in place: the owner's range = the sum over the ranks; other ranks' copies of it are untouched.
void comm_reduce_ranges_sum(const Comm *comm, CommGroup group, float *buffer, const size_t *cuts);
// All-gather, in place: every owner's range (elements of element_bytes) to every rank.
void comm_all_gather_ranges(const Comm *comm, CommGroup group, void *buffer, const size_t *cuts,
                            size_t element_bytes);
// In place from root (a rank of the group).
void comm_broadcast(const Comm *comm, CommGroup group, void *buffer, size_t bytes, int root);
// Variable-count all-to-all: send holds send_bytes[r] bytes for group rank r, one run after another in
// rank order; recv_bytes[r] bytes arrive from rank r likewise (the counts are exchanged first, by the
// caller). One ncclGroupStart / ncclSend + ncclRecv per peer / ncclGroupEnd.
void comm_all_to_all(const Comm *comm, CommGroup group, const void *send, const size_t *send_bytes, void *recv,
                     const size_t *recv_bytes);

// Asynchronous error of any of the communicators (a dead or failed peer): false and a message, or true.
// Safe to call from the watchdog's thread.
bool comm_healthy(const Comm *comm, char *message, size_t message_size);
// KLT_PROFILE: seconds spent in collectives of a kind since the last reset, and how many calls.
double comm_profile_seconds(CommKind kind, long *calls);
void comm_profile_reset(void);
#endif
