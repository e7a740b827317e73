// The loader: window contents and document starts, seeded order (same seed, same batches; every
// train window once per epoch; validation windows never in it), dp slices for 1/2/4 ranks, exact
// resume from a saved state with another dp size, and validation batches.
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/loader.h"
#include "data/shard.h"

static char dir[256];
static char data_dir[300];

static void remove_dir(void) {
  char command[300];
  snprintf(command, sizeof command, "rm -rf %s", dir);
  if (system(command) != 0) fprintf(stderr, "could not remove %s\n", dir);
}

// Token at stream position p is p itself, so a row tells which window it came from.
#define SHARD_COUNT 3
static const uint64_t shard_sizes[SHARD_COUNT] = {1000, 37, 2500};
#define TOTAL_TOKENS 3537

static int is_document_start(uint64_t p) { return p == 0 || p == 1000 || p == 1037 || p % 53 == 11; }

static void make_dataset(void) {
  snprintf(dir, sizeof dir, "/tmp/klt_loader_XXXXXX");
  cr_assert_not_null(mkdtemp(dir));
  atexit(remove_dir);
  snprintf(data_dir, sizeof data_dir, "%s/data", dir);
  mkdir(data_dir, 0755);
  uint64_t position = 0;
  for (int s = 0; s < SHARD_COUNT; s++) {
    char path[400];
    snprintf(path, sizeof path, "%s/part_%d.h5", data_dir, s);
    ShardWriter *writer = shard_writer_create(path, 1u << 22, "positions", 0, 0);
    for (uint64_t i = 0; i < shard_sizes[s]; i++, position++) {
      if (is_document_start(position)) shard_writer_begin_document(writer);
      uint32_t token = (uint32_t)position;
      shard_writer_append(writer, &token, NULL, 1);
    }
    shard_writer_close(writer);
  }
}

static LoaderConfig config_for(int seq_len, int global_batch, int dp_rank, int dp_size, uint64_t seed) {
  return (LoaderConfig){.path = data_dir, .seq_len = seq_len, .global_batch = global_batch, .dp_rank = dp_rank,
                        .dp_size = dp_size, .seed = seed, .stage = 0, .val_fraction = 0.05,
                        .vocab_size = 1u << 22};
}

static void assert_row_is_window(const Batch *batch, int b, uint64_t window) {
  int T = batch->T;
  for (int t = 0; t < T; t++) {
    uint64_t p = window * (uint64_t)T + (uint64_t)t;
    cr_assert_eq(batch->inputs[b * T + t], (int)p, "row %d position %d", b, t);
    cr_assert_eq(batch->targets[b * T + t], (int)(p + 1));
    cr_assert_eq(batch->doc_start[b * T + t], (unsigned char)(t == 0 || is_document_start(p)),
                 "doc_start of row %d position %d (stream %llu)", b, t, (unsigned long long)p);
  }
}

static int batches_equal(const Batch *a, const Batch *b) {
  size_t cells = (size_t)a->B * (size_t)a->T;
  return a->B == b->B && a->T == b->T && a->first_sample == b->first_sample &&
         memcmp(a->inputs, b->inputs, cells * sizeof(int)) == 0 &&
         memcmp(a->targets, b->targets, cells * sizeof(int)) == 0 && memcmp(a->doc_start, b->doc_start, cells) == 0;
}

Test(loader, windows_hold_the_right_tokens_and_document_starts) {
  make_dataset();
  LoaderConfig config = config_for(16, 4, 0, 1, 42);
  Loader *loader = loader_open(&config, NULL);
  uint64_t count = (TOTAL_TOKENS - 1) / 16;
  cr_assert_eq(loader_token_count(loader), TOTAL_TOKENS);
  cr_assert_eq(loader_val_windows(loader), (uint64_t)((count * 5 + 99) / 100), "ceil(0.05 * windows)");
  cr_assert_eq(loader_train_windows(loader) + loader_val_windows(loader), count);
  Batch batch;
  loader_alloc_batch(loader, &batch);
  // 60 steps of 4 cross the epoch boundary (209 train windows).
  for (int step = 0; step < 60; step++) {
    loader_next_batch(loader, &batch);
    cr_assert_eq(batch.B, 4);
    cr_assert_eq(batch.first_sample, (uint64_t)step * 4);
    for (int b = 0; b < 4; b++) assert_row_is_window(&batch, b, loader_window_of_sample(loader, (uint64_t)step * 4 + b));
    LoaderState state = loader_state(loader);
    cr_assert_eq(state.consumed_samples, (uint64_t)(step + 1) * 4);
    cr_assert_eq(state.seed, 42);
  }
  loader_free_batch(&batch);
  loader_close(loader);
}

Test(loader, same_seed_same_batches_other_seed_other_order) {
  make_dataset();
  LoaderConfig config = config_for(16, 4, 0, 1, 5);
  Loader *a = loader_open(&config, NULL), *b = loader_open(&config, NULL);
  config.seed = 6;
  Loader *c = loader_open(&config, NULL);
  Batch x, y, z;
  loader_alloc_batch(a, &x);
  loader_alloc_batch(b, &y);
  loader_alloc_batch(c, &z);
  int differs = 0;
  for (int step = 0; step < 20; step++) {
    loader_next_batch(a, &x);
    loader_next_batch(b, &y);
    loader_next_batch(c, &z);
    cr_assert(batches_equal(&x, &y), "step %d differs between two loaders with the same seed", step);
    differs |= memcmp(x.inputs, z.inputs, 4 * 16 * sizeof(int)) != 0;
  }
  cr_assert(differs, "another seed must give another order");
  loader_free_batch(&x);
  loader_free_batch(&y);
  loader_free_batch(&z);
  loader_close(a);
  loader_close(b);
  loader_close(c);
}

// Every epoch visits each train window exactly once, in a fresh order, for many window counts
// (seq_len changes the count, so the permutation is tried on domains that are not powers of 4).
Test(loader, each_epoch_is_a_permutation_of_the_train_windows) {
  make_dataset();
  const int seq_lens[] = {1, 2, 3, 7, 16, 33, 100, 1000, 1700};
  for (size_t k = 0; k < sizeof(seq_lens) / sizeof(seq_lens[0]); k++) {
    LoaderConfig config = config_for(seq_lens[k], 1, 0, 1, 11);
    Loader *loader = loader_open(&config, NULL);
    uint64_t n = loader_train_windows(loader);
    char *seen = calloc(n, 1);
    int same_order = 1;
    for (uint64_t epoch = 0; epoch < 3; epoch++) {
      memset(seen, 0, n);
      for (uint64_t i = 0; i < n; i++) {
        uint64_t window = loader_window_of_sample(loader, epoch * n + i);
        cr_assert_lt(window, n, "seq_len %d: a validation window is in the train order", seq_lens[k]);
        cr_assert_eq(seen[window], 0, "seq_len %d epoch %llu: window %llu twice", seq_lens[k],
                     (unsigned long long)epoch, (unsigned long long)window);
        seen[window] = 1;
        if (epoch == 1) same_order &= window == loader_window_of_sample(loader, i);
      }
    }
    if (n > 3) cr_assert(!same_order, "seq_len %d: epoch 1 repeats epoch 0's order", seq_lens[k]);
    free(seen);
    loader_close(loader);
  }
}

// The windows the batches actually carry (read back from the tokens) are train windows only.
Test(loader, batches_never_carry_validation_windows) {
  make_dataset();
  LoaderConfig config = config_for(16, 19, 0, 1, 3);
  Loader *loader = loader_open(&config, NULL);
  uint64_t n = loader_train_windows(loader);
  Batch batch;
  loader_alloc_batch(loader, &batch);
  char *seen = calloc(n, 1);
  uint64_t samples = 0;
  while (samples < n) {  // one epoch (and a bit)
    loader_next_batch(loader, &batch);
    for (int b = 0; b < batch.B && samples < n; b++, samples++) {
      uint64_t window = (uint64_t)batch.inputs[b * 16] / 16;
      cr_assert_lt(window, n, "train batch holds validation window %llu", (unsigned long long)window);
      cr_assert_eq(seen[window], 0);
      seen[window] = 1;
    }
  }
  free(seen);
  loader_free_batch(&batch);
  loader_close(loader);
}

// dp ranks 0..D-1 together read exactly the batch of one rank, in rank order, for D = 1, 2, 4.
Test(loader, dp_slices_cover_the_global_batch) {
  make_dataset();
  const int G = 8, T = 16;
  LoaderConfig config = config_for(T, G, 0, 1, 9);
  Loader *single = loader_open(&config, NULL);
  Batch whole;
  loader_alloc_batch(single, &whole);
  Loader *ranks[4];
  Batch parts[4];
  for (int D = 1; D <= 4; D *= 2) {
    for (int r = 0; r < D; r++) {
      LoaderConfig rank_config = config_for(T, G, r, D, 9);
      ranks[r] = loader_open(&rank_config, NULL);
      loader_alloc_batch(ranks[r], &parts[r]);
      cr_assert_eq(parts[r].B, G / D);
    }
    LoaderConfig again = config_for(T, G, 0, 1, 9);
    loader_close(single);
    single = loader_open(&again, NULL);
    for (int step = 0; step < 40; step++) {
      loader_next_batch(single, &whole);
      for (int r = 0; r < D; r++) {
        loader_next_batch(ranks[r], &parts[r]);
        int B = G / D;
        cr_assert_eq(parts[r].first_sample, whole.first_sample + (uint64_t)(r * B));
        size_t offset = (size_t)r * B * T, cells = (size_t)B * T;
        cr_assert(memcmp(parts[r].inputs, whole.inputs + offset, cells * sizeof(int)) == 0,
                  "D=%d rank %d step %d inputs", D, r, step);
        cr_assert(memcmp(parts[r].targets, whole.targets + offset, cells * sizeof(int)) == 0);
        cr_assert(memcmp(parts[r].doc_start, whole.doc_start + offset, cells) == 0);
      }
    }
    for (int r = 0; r < D; r++) {
      loader_free_batch(&parts[r]);
      loader_close(ranks[r]);
    }
  }
  loader_free_batch(&whole);
  loader_close(single);
}

// Save the state after some steps on 2 ranks, restore it on 1 and on 4 ranks: the next batch is the
// one an uninterrupted single-rank run gives, bit for bit.
Test(loader, resume_from_state_with_another_dp_size) {
  make_dataset();
  const int G = 8, T = 16, steps_before = 31;  // past the first epoch boundary (209 windows)
  LoaderConfig config = config_for(T, G, 0, 1, 77);
  config.stage = 2;
  Loader *reference = loader_open(&config, NULL);
  Batch expected[3];
  for (int i = 0; i < 3; i++) loader_alloc_batch(reference, &expected[i]);
  for (int step = 0; step < steps_before; step++) loader_next_batch(reference, &expected[0]);
  for (int i = 0; i < 3; i++) loader_next_batch(reference, &expected[i]);
  loader_close(reference);

  LoaderConfig half = config_for(T, G, 1, 2, 77);
  half.stage = 2;
  Loader *before = loader_open(&half, NULL);
  Batch scratch;
  loader_alloc_batch(before, &scratch);
  for (int step = 0; step < steps_before; step++) loader_next_batch(before, &scratch);
  LoaderState saved = loader_state(before);
  loader_free_batch(&scratch);
  loader_close(before);
  cr_assert_eq(saved.consumed_samples, (uint64_t)steps_before * G);
  cr_assert_eq(saved.stage, 2);

  for (int D = 1; D <= 4; D *= 4) {
    for (int r = 0; r < D; r++) {
      // A config with another seed and stage: the saved state decides.
      LoaderConfig resumed_config = config_for(T, G, r, D, 12345);
      Loader *resumed = loader_open(&resumed_config, &saved);
      Batch batch;
      loader_alloc_batch(resumed, &batch);
      for (int i = 0; i < 3; i++) {
        loader_next_batch(resumed, &batch);
        int B = G / D;
        size_t offset = (size_t)r * B * T, cells = (size_t)B * T;
        cr_assert_eq(batch.first_sample, expected[i].first_sample + (uint64_t)(r * B));
        cr_assert(memcmp(batch.inputs, expected[i].inputs + offset, cells * sizeof(int)) == 0,
                  "resumed on %d ranks, rank %d, batch %d differs", D, r, i);
        cr_assert(memcmp(batch.targets, expected[i].targets + offset, cells * sizeof(int)) == 0);
        cr_assert(memcmp(batch.doc_start, expected[i].doc_start + offset, cells) == 0);
      }
      loader_free_batch(&batch);
      loader_close(resumed);
    }
  }
  for (int i = 0; i < 3; i++) loader_free_batch(&expected[i]);
}

// Validation steps cover the held-out windows once, in order, split over ranks; repeatable.
Test(loader, validation_batches_cover_the_held_out_windows) {
  make_dataset();
  const int G = 5, T = 16;  // 12 validation windows: steps of 5, 5, 2 on one rank; 4, 4, 4 on 2 and 4
  for (int D = 1; D <= 4; D *= 2) {
    int global = D == 1 ? G : 4;
    uint64_t next_window = 0;
    Loader *ranks[4];
    Batch batches[4];
    for (int r = 0; r < D; r++) {
      LoaderConfig config = config_for(T, global, r, D, 1);
      ranks[r] = loader_open(&config, NULL);
      loader_alloc_batch(ranks[r], &batches[r]);
    }
    uint64_t n_train = loader_train_windows(ranks[0]), n_val = loader_val_windows(ranks[0]);
    cr_assert_eq(n_val, 12);
    cr_assert_eq(loader_val_batches(ranks[0]), (int)((n_val + (uint64_t)global - 1) / (uint64_t)global));
    next_window = n_train;
    for (int i = 0; i < loader_val_batches(ranks[0]); i++) {
      for (int r = 0; r < D; r++) {
        loader_val_batch(ranks[r], i, &batches[r]);
        cr_assert_leq(batches[r].B, global / D);
        for (int b = 0; b < batches[r].B; b++) assert_row_is_window(&batches[r], b, next_window++);
        Batch again;
        loader_alloc_batch(ranks[r], &again);
        loader_val_batch(ranks[r], i, &again);
        cr_assert(batches_equal(&batches[r], &again), "validation batch %d is not repeatable", i);
        loader_free_batch(&again);
      }
    }
    cr_assert_eq(next_window, n_train + n_val, "D=%d: validation windows covered once", D);
    for (int r = 0; r < D; r++) {
      loader_free_batch(&batches[r]);
      loader_close(ranks[r]);
    }
  }
}

// The loss mask reaches the targets: -1 where the next token does not count.
Test(loader, loss_mask_becomes_minus_one_targets) {
  snprintf(dir, sizeof dir, "/tmp/klt_loader_XXXXXX");
  cr_assert_not_null(mkdtemp(dir));
  atexit(remove_dir);
  snprintf(data_dir, sizeof data_dir, "%s/data", dir);
  mkdir(data_dir, 0755);
  char path[400];
  snprintf(path, sizeof path, "%s/shard.h5", data_dir);
  ShardWriter *writer = shard_writer_create(path, 1000, "masked", 0, 1);
  shard_writer_begin_document(writer);
  for (uint32_t p = 0; p < 101; p++) {
    uint8_t mask = p % 4 != 1;
    shard_writer_append(writer, &p, &mask, 1);
  }
  shard_writer_close(writer);
  LoaderConfig config = config_for(10, 2, 0, 1, 4);
  config.vocab_size = 1000;
  config.val_fraction = 0;
  Loader *loader = loader_open(&config, NULL);
  cr_assert_eq(loader_val_batches(loader), 0);
  cr_assert_eq(loader_train_windows(loader), 10);
  Batch batch;
  loader_alloc_batch(loader, &batch);
  for (int step = 0; step < 5; step++) {
    loader_next_batch(loader, &batch);
    for (int i = 0; i < 2 * 10; i++) {
      int next = batch.inputs[i] + 1;
      cr_assert_eq(batch.targets[i], next % 4 == 1 ? -1 : next);
    }
  }
  loader_free_batch(&batch);
  loader_close(loader);
}
