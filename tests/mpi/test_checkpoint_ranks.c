// Sharded checkpoints (run under mpirun -np 2 and -np 4): every rank saves exactly its range of the
// shard plan (weights and optimizer state, rows of each tensor), rank 0 writes the manifest; the
// checkpoint then passes klt-ckpt's check (every tensor covered once), no rank file holds the whole
// model, and loading it gives back every weight and the states of any range bit for bit: the whole
// arena (one rank), the same plan, and the plans of other rank counts (resuming on more or fewer ranks).
#include <hdf5.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dist/world.h"
#include "tests/testing.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/model_config.h"
#include "train/shard_plan.h"

static int failures = 0;

static void expect(bool ok, const char *what, int rank) {
  if (!ok) {
    fprintf(stderr, "rank %d: %s\n", rank, what);
    failures++;
  }
}

// The tiny model's registry with the same random weights on every rank.
static ParamRegistry registry_make(uint64_t seed) {
  Config config;
  config_set_defaults(&config);
  char path[1024];
  snprintf(path, sizeof path, "%s/configs/models/tiny.ini", getenv("KLT_SOURCE_DIR"));
  config_load_file(&config, path);
  ModelConfig model;
  model_config_from(&model, &config);
  ParamRegistry r;
  params_init(&r);
  model_register_params(&model, &r);
  params_allocate(&r);
  test_fill_normal(r.values, r.total, 1.0, &seed);
  return r;
}

// Whether rank file `file` of checkpoint `path` has dataset `name`.
static bool file_has(const char *path, int file, const char *name) {
  char file_path[1200];
  snprintf(file_path, sizeof file_path, "%s/rank_%05d.h5", path, file);
  hid_t f = H5Fopen(file_path, H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return false;
  bool has = H5Lexists(f, name, H5P_DEFAULT) > 0;
  H5Fclose(f);
  return has;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int size;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  World world;
  world_init(&world, &argc, &argv, size, 1, 1);
  const int rank = world.rank;

  ParamRegistry r = registry_make(7);
  const size_t total = r.total;
  uint64_t seed = 8;
  real *state1 = test_alloc(total), *state2 = test_alloc(total);  // the whole states, the same on every rank
  test_fill_normal(state1, total, 0.1, &seed);
  test_fill_uniform(state2, total, 0, 0.01, &seed);
  ShardPlan plan;
  shard_plan_make(&plan, &r, size, true, 5);
  const ArenaRange own = shard_plan_range(&plan, rank);
  real *mine1 = test_copy(state1 + own.begin, own.end - own.begin), *mine2 = test_copy(state2 + own.begin, own.end - own.begin);

  char dir[256] = "";
  if (rank == 0) test_make_dir(dir, sizeof dir, "klt_checkpoint_ranks");
  MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);
  CheckpointMeta meta = {.step = 4, .tokens = 64, .optimizer_step = 4};
  snprintf(meta.model_name, sizeof meta.model_name, "tiny");
  checkpoint_save(dir, &meta, &r, mine1, mine2, &own, "", 0, &world);
  char path[1024];
  snprintf(path, sizeof path, "%s/ckpt/step_00000004", dir);

  // Consistent (klt-ckpt verify: every tensor covered once), and each rank stored exactly its own rows:
  // a tensor wholly inside a rank's range is in that rank's file only.
  char problem[1024] = "";
  expect(checkpoint_check(path, true, NULL, problem, sizeof problem), problem, rank);
  int whole_tensors = 0;
  for (int i = 0; i < r.count; i++) {
    const ParamInfo *p = &r.params[i];
    bool inside = own.begin <= p->offset && p->offset + p->numel <= own.end;
    if (!inside) continue;
    whole_tensors++;
    char name[200];
    snprintf(name, sizeof name, "optimizer/state1/%s", p->name);
    for (int f = 0; f < size; f++)
      if (file_has(path, f, p->name) != (f == rank) || file_has(path, f, name) != (f == rank)) {
        fprintf(stderr, "rank %d: %s is %sin rank file %d\n", rank, p->name, f == rank ? "not " : "", f);
        failures++;
      }
  }
  expect(size == 1 || own.end - own.begin < total, "one rank owns the whole arena", rank);

  // Loads: the weights whole, the states of every range of the plans for 1, 2, 3, size and 2 x size ranks.
  int plans[] = {1, 2, 3, size, 2 * size};
  for (size_t k = 0; k < sizeof plans / sizeof plans[0]; k++) {
    ShardPlan other;
    shard_plan_make(&other, &r, plans[k], true, 5);
    for (int q = 0; q < plans[k]; q++) {
      ArenaRange range = shard_plan_range(&other, q);
      size_t n = range.end - range.begin;
      ParamRegistry loaded = registry_make(99);
      real *s1 = test_alloc(n), *s2 = test_alloc(n);
      CheckpointMeta got;
      checkpoint_load(path, &got, &loaded, s1, s2, &range, false);
      bool same = memcmp(loaded.values, r.values, total * sizeof(real)) == 0 &&
                  memcmp(s1, state1 + range.begin, n * sizeof(real)) == 0 &&
                  memcmp(s2, state2 + range.begin, n * sizeof(real)) == 0 && got.step == 4;
      if (!same) {
        fprintf(stderr, "rank %d: loading range %d of the %d-rank plan differs\n", rank, q, plans[k]);
        failures++;
      }
      free(s1);
      free(s2);
      params_free(&loaded);
    }
    shard_plan_free(&other);
  }

  int total_failures = 0;
  MPI_Allreduce(&failures, &total_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    printf("sharded checkpoint on %d ranks (%d tensors whole in rank 0's range, %zu of %zu elements): %s\n", size,
           whole_tensors, own.end - own.begin, total, total_failures ? "FAILED" : "ok");
  free(state1);
  free(state2);
  free(mine1);
  free(mine2);
  shard_plan_free(&plan);
  params_free(&r);
  world_finalize(&world);
  MPI_Finalize();
  return total_failures ? 1 : 0;
}
