// MPI world, layout checks and host collectives; see world.h.
#include "dist/world.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <mpi.h>

#include "common/check.h"

#ifdef KLT_FP64
#define MPI_REAL_TYPE MPI_DOUBLE
#else
#define MPI_REAL_TYPE MPI_FLOAT
#endif

static void abort_world(int code) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  int size = 1;
  if (initialized && !finalized) MPI_Comm_size(MPI_COMM_WORLD, &size);
  // A single rank exits normally (so test harnesses see the real exit code); more ranks must all stop.
  if (initialized && !finalized && size > 1) MPI_Abort(MPI_COMM_WORLD, code);
}

void world_init(World *world, int *argc, char ***argv, int dp, int ep, int cp) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  world->initialized_mpi = !initialized;
  if (!initialized) MPI_Init(argc, argv);
  klt_set_exit_hook(abort_world);
  MPI_Comm_rank(MPI_COMM_WORLD, &world->rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world->size);
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world->rank, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &world->local_rank);
  MPI_Comm_size(node, &world->local_size);
  MPI_Comm_free(&node);
  if (dp * cp != world->size)
    klt_user_error("the layout [parallel] dp = %d x cp = %d needs %d ranks, but mpirun started %d; "
                   "set dp and cp so that dp x cp equals the number of ranks",
                   dp, cp, dp * cp, world->size);
  if (dp % ep != 0) klt_user_error("[parallel] ep = %d must divide dp = %d", ep, dp);
  world->dp = dp;
  world->ep = ep;
  world->cp = cp;
  world->dp_rank = world->rank / cp;
  world->ep_rank = world->dp_rank % ep;
  world->ep_comm = MPI_COMM_NULL;
  world->comm = NULL;
  if (ep > 1) MPI_Comm_split(MPI_COMM_WORLD, world->dp_rank / ep, world->ep_rank, &world->ep_comm);
}

void world_finalize(World *world) {
  klt_set_exit_hook(NULL);
  if (world->ep_comm != MPI_COMM_NULL) MPI_Comm_free(&world->ep_comm);
  if (world->initialized_mpi) MPI_Finalize();
}

static int checked_count(size_t count) {
  CHECK(count <= INT_MAX, "collective of %zu elements exceeds MPI's int count", count);
  return (int)count;
}

void world_sum_reals(const World *world, real *values, size_t count) {
  if (world->size > 1) MPI_Allreduce(MPI_IN_PLACE, values, checked_count(count), MPI_REAL_TYPE, MPI_SUM, MPI_COMM_WORLD);
}

void world_sum_doubles(const World *world, double *values, size_t count) {
  if (world->size > 1) MPI_Allreduce(MPI_IN_PLACE, values, checked_count(count), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

void world_max_reals(const World *world, real *values, size_t count) {
  if (world->size > 1) MPI_Allreduce(MPI_IN_PLACE, values, checked_count(count), MPI_REAL_TYPE, MPI_MAX, MPI_COMM_WORLD);
}

// The per-rank counts and displacements of a ranged collective, as MPI's ints (caller frees counts).
static int *range_counts(const World *world, const size_t *cuts, int **displacements) {
  int *counts = klt_malloc(2 * sizeof(int) * (size_t)world->size);
  *displacements = counts + world->size;
  for (int r = 0; r < world->size; r++) {
    CHECK(cuts[r + 1] >= cuts[r], "ranged collective: cut %d (%zu) before cut %d (%zu)", r + 1, cuts[r + 1], r, cuts[r]);
    counts[r] = checked_count(cuts[r + 1] - cuts[r]);
    (*displacements)[r] = checked_count(cuts[r]);
  }
  return counts;
}

void world_reduce_ranges_reals(const World *world, real *values, const size_t *cuts) {
  if (world->size == 1) return;
  int *displacements, *counts = range_counts(world, cuts, &displacements);
  const int mine = counts[world->rank];
  real *sum = klt_malloc((size_t)(mine > 0 ? mine : 1) * sizeof(real));
  MPI_Reduce_scatter(values, sum, counts, MPI_REAL_TYPE, MPI_SUM, MPI_COMM_WORLD);
  memcpy(values + cuts[world->rank], sum, (size_t)mine * sizeof(real));
  free(sum);
  free(counts);
}

void world_all_gather_ranges_reals(const World *world, real *values, const size_t *cuts) {
  if (world->size == 1) return;
  int *displacements, *counts = range_counts(world, cuts, &displacements);
  MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, values, counts, displacements, MPI_REAL_TYPE, MPI_COMM_WORLD);
  free(counts);
}

void world_broadcast_bytes(const World *world, void *bytes, size_t count, int root) {
  if (world->size > 1) MPI_Bcast(bytes, checked_count(count), MPI_BYTE, root, MPI_COMM_WORLD);
}

void world_barrier(const World *world) {
  if (world->size > 1) MPI_Barrier(MPI_COMM_WORLD);
}

void world_ep_all_to_all(const World *world, const real *send, const int *send_rows, real *recv,
                         const int *recv_rows, int width) {
  int n = world->ep;
  int *counts = klt_malloc(sizeof(int) * 4 * n), *send_displs = counts + n, *recv_counts = counts + 2 * n,
      *recv_displs = counts + 3 * n;
  size_t send_total = 0, recv_total = 0;
  for (int r = 0; r < n; r++) {
    CHECK(send_total + (size_t)send_rows[r] * width <= INT_MAX && recv_total + (size_t)recv_rows[r] * width <= INT_MAX,
          "all-to-all exceeds MPI's int displacements");
    counts[r] = send_rows[r] * width;
    send_displs[r] = (int)send_total;
    recv_counts[r] = recv_rows[r] * width;
    recv_displs[r] = (int)recv_total;
    send_total += (size_t)counts[r];
    recv_total += (size_t)recv_counts[r];
  }
  MPI_Alltoallv(send, counts, send_displs, MPI_REAL_TYPE, recv, recv_counts, recv_displs, MPI_REAL_TYPE,
                world->ep_comm);
  free(counts);
}

void world_ep_all_to_all_ints(const World *world, const int *send, int *recv, int count) {
  MPI_Alltoall(send, count, MPI_INT, recv, count, MPI_INT, world->ep_comm);
}
