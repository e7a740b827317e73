// Under mpirun -np 2 and -np 4: each rank's loader slice equals its part of a one-rank loader's
// batch, the ranks' slices gathered on rank 0 are exactly that batch, every rank's saved state is the
// same and restoring it continues the one-rank sequence, and validation slices cover the held-out
// windows once. The dataset (token = stream position, documents and a loss mask) is made by rank 0.
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/loader.h"
#include "data/shard.h"

static int rank, world_size, checks;

#define EXPECT(cond, ...)                                                  \
  do {                                                                     \
    checks++;                                                              \
    if (!(cond)) {                                                         \
      fprintf(stderr, "rank %d: %s:%d: failed: %s: ", rank, __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, "\n");                                               \
      MPI_Abort(MPI_COMM_WORLD, 1);                                        \
    }                                                                      \
  } while (0)

static void make_dataset(const char *directory) {
  mkdir(directory, 0755);
  uint32_t position = 0;
  const uint32_t sizes[3] = {5000, 123, 7000};
  for (int s = 0; s < 3; s++) {
    char path[512];
    snprintf(path, sizeof path, "%s/shard_%05d.h5", directory, s);
    ShardWriter *writer = shard_writer_create(path, 1u << 20, "positions", 1, 1);
    for (uint32_t i = 0; i < sizes[s]; i++, position++) {
      if (i == 0 || position % 97 == 5) shard_writer_begin_document(writer);
      uint8_t mask = position % 5 != 0;
      shard_writer_append(writer, &position, &mask, 1);
    }
    shard_writer_close(writer);
  }
}

static LoaderConfig config_for(const char *path, int dp_rank, int dp_size) {
  return (LoaderConfig){.path = path, .seq_len = 32, .global_batch = 8, .dp_rank = dp_rank, .dp_size = dp_size,
                        .seed = 2024, .stage = 1, .val_fraction = 0.05, .vocab_size = 1u << 20};
}

static void expect_slice(const Batch *part, const Batch *whole, int step, const char *what) {
  int B = part->B, T = part->T;
  size_t offset = (size_t)rank * B * T, cells = (size_t)B * T;
  EXPECT(part->first_sample == whole->first_sample + (uint64_t)rank * B, "%s step %d first sample", what, step);
  EXPECT(memcmp(part->inputs, whole->inputs + offset, cells * sizeof(int)) == 0, "%s step %d inputs", what, step);
  EXPECT(memcmp(part->targets, whole->targets + offset, cells * sizeof(int)) == 0, "%s step %d targets", what, step);
  EXPECT(memcmp(part->doc_start, whole->doc_start + offset, cells) == 0, "%s step %d doc_start", what, step);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  EXPECT(8 % world_size == 0, "run with 1, 2, 4 or 8 ranks");

  char root[256] = {0}, path[300];
  if (rank == 0) {
    snprintf(root, sizeof root, "/tmp/klt_loader_ranks_XXXXXX");
    EXPECT(mkdtemp(root) != NULL, "mkdtemp");
    snprintf(path, sizeof path, "%s/data", root);
    make_dataset(path);
  }
  MPI_Bcast(root, sizeof root, MPI_CHAR, 0, MPI_COMM_WORLD);
  snprintf(path, sizeof path, "%s/data", root);

  const int steps = 60, save_after = 45;  // 45 * 8 samples cross the first epoch boundary
  LoaderConfig single_config = config_for(path, 0, 1), rank_config = config_for(path, rank, world_size);
  Loader *single = loader_open(&single_config, NULL);
  Loader *mine = loader_open(&rank_config, NULL);
  EXPECT(loader_train_windows(single) < (uint64_t)save_after * 8, "the test must cross an epoch");
  Batch whole, part;
  loader_alloc_batch(single, &whole);
  loader_alloc_batch(mine, &part);
  int B = part.B, T = part.T;
  int *gathered = rank == 0 ? malloc((size_t)8 * T * sizeof(int)) : NULL;
  Batch *reference = calloc((size_t)steps, sizeof(Batch));
  LoaderState saved = {0};
  for (int step = 0; step < steps; step++) {
    loader_next_batch(single, &whole);
    loader_next_batch(mine, &part);
    loader_alloc_batch(single, &reference[step]);
    memcpy(reference[step].inputs, whole.inputs, (size_t)8 * T * sizeof(int));
    memcpy(reference[step].targets, whole.targets, (size_t)8 * T * sizeof(int));
    memcpy(reference[step].doc_start, whole.doc_start, (size_t)8 * T);
    reference[step].first_sample = whole.first_sample;
    expect_slice(&part, &whole, step, "read");
    MPI_Gather(part.inputs, B * T, MPI_INT, gathered, B * T, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank == 0)
      EXPECT(memcmp(gathered, whole.inputs, (size_t)8 * T * sizeof(int)) == 0, "gathered step %d", step);
    if (step + 1 == save_after) saved = loader_state(mine);
  }
  loader_close(mine);

  // Every rank saved the same state; resuming it on these ranks continues the one-rank sequence.
  uint64_t lowest = 0, highest = 0;
  MPI_Allreduce(&saved.consumed_samples, &lowest, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&saved.consumed_samples, &highest, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
  EXPECT(lowest == highest && lowest == (uint64_t)save_after * 8, "saved states differ between ranks");
  EXPECT(saved.stage == 1 && saved.seed == 2024, "saved stage and seed");
  Loader *resumed = loader_open(&rank_config, &saved);
  for (int step = save_after; step < steps; step++) {
    loader_next_batch(resumed, &part);
    expect_slice(&part, &reference[step], step, "resumed");
  }

  // Validation: the ranks' slices of each step, in rank order, are the held-out windows in order.
  uint64_t n_train = loader_train_windows(resumed), n_val = loader_val_windows(resumed);
  uint64_t next_window = n_train;
  for (int i = 0; i < loader_val_batches(resumed); i++) {
    loader_val_batch(resumed, i, &part);
    int rows = part.B;
    int *counts = rank == 0 ? malloc(sizeof(int) * (size_t)world_size) : NULL;
    MPI_Gather(&rows, 1, MPI_INT, counts, 1, MPI_INT, 0, MPI_COMM_WORLD);
    uint64_t first = part.first_sample, firsts[8];
    MPI_Gather(&first, 1, MPI_UINT64_T, firsts, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    for (int b = 0; b < rows; b++)
      EXPECT((uint64_t)part.inputs[b * T] == (part.first_sample + (uint64_t)b) * (uint64_t)T,
             "validation row %d holds window %llu", b, (unsigned long long)(part.first_sample + b));
    if (rank == 0) {
      for (int r = 0; r < world_size; r++) {
        if (counts[r] == 0) continue;
        EXPECT(firsts[r] == next_window, "validation step %d rank %d starts at window %llu", i, r,
               (unsigned long long)firsts[r]);
        next_window += (uint64_t)counts[r];
      }
      free(counts);
    }
  }
  if (rank == 0) EXPECT(next_window == n_train + n_val, "validation windows covered once");

  loader_free_batch(&part);
  loader_free_batch(&whole);
  for (int step = 0; step < steps; step++) loader_free_batch(&reference[step]);
  free(reference);
  free(gathered);
  loader_close(resumed);
  loader_close(single);
  MPI_Barrier(MPI_COMM_WORLD);
  int total_checks = 0;
  MPI_Reduce(&checks, &total_checks, 1, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    char command[300];
    snprintf(command, sizeof command, "rm -rf %s", root);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", root);
    printf("test_loader_ranks on %d ranks: %d checks passed\n", world_size, total_checks);
  }
  MPI_Finalize();
  return 0;
}
