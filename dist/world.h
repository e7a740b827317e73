/* The MPI world and klt's rank layout. world = dp x cp ranks; experts are spread over an
 * expert-parallel group of ep ranks inside each dp group. Host-buffer collectives go through MPI
 * here (device buffers through NCCL, with the CUDA backend), so every parallel path runs on a
 * CPU-only machine too. A failing rank aborts the whole world (through klt's exit hook), so no rank
 * is left waiting. */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include <mpi.h>

#include "common/real.h"

typedef struct World {
  int rank, size;          // in the world
  int local_rank;          // on this node (picks the GPU)
  int local_size;          // ranks on this node
  int dp, ep, cp;          // layout
  int dp_rank, ep_rank;    // this rank's place: dp group index, and index inside its ep group
  bool initialized_mpi;    // whether world_init called MPI_Init (and world_finalize must finalize)
  MPI_Comm ep_comm;        // the ranks of this rank's expert-parallel group (MPI_COMM_NULL alone)
  struct Comm *comm;       // NCCL communicators for device buffers (dist/comm.h; NULL on the CPU or one rank)
} World;

// Initializes MPI (if not yet) and checks that the layout divides the world; user errors exit 2.
void world_init(World *world, int *argc, char ***argv, int dp, int ep, int cp);
void world_finalize(World *world);
static inline bool world_is_main(const World *world) { return world->rank == 0; }

// Variable-count all-to-all of `real` rows of `width` values inside the expert-parallel group:
// send_rows[r] rows go to ep rank r (in rank order in send), recv_rows[r] rows arrive from it.
void world_ep_all_to_all(const World *world, const real *send, const int *send_rows, real *recv,
                         const int *recv_rows, int width);
// All-to-all of `count` ints per ep rank (counts exchanged before the rows).
void world_ep_all_to_all_ints(const World *world, const int *send, int *recv, int count);

// Host collectives over the data-parallel ranks (the whole world while cp = 1).
void world_sum_reals(const World *world, real *values, size_t count);        // in place
void world_sum_doubles(const World *world, double *values, size_t count);    // in place
void world_max_reals(const World *world, real *values, size_t count);        // in place
// Ranged collectives for the sharded optimizer: rank r owns values[cuts[r], cuts[r + 1]) (cuts: world
// size + 1 non-decreasing offsets from 0 to the array's length, the same on every rank).
// Reduce: on return this rank's own range holds the sum over the ranks (MPI_Reduce_scatter); the rest
// of values is left as it was (this rank's own contributions).
void world_reduce_ranges_reals(const World *world, real *values, const size_t *cuts);
// All-gather: every rank's own range of values goes to every rank (in place, MPI_Allgatherv).
void world_all_gather_ranges_reals(const World *world, real *values, const size_t *cuts);
void world_broadcast_bytes(const World *world, void *bytes, size_t count, int root);
void world_barrier(const World *world);
