// MPI world, layout checks and host collectives; see world.h.
#include "dist/world.h"

#include <limits.h>
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
}

void world_finalize(World *world) {
  klt_set_exit_hook(NULL);
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

void world_broadcast_bytes(const World *world, void *bytes, size_t count, int root) {
  if (world->size > 1) MPI_Bcast(bytes, checked_count(count), MPI_BYTE, root, MPI_COMM_WORLD);
}

void world_barrier(const World *world) {
  if (world->size > 1) MPI_Barrier(MPI_COMM_WORLD);
}
