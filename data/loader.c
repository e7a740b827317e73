// The window sampler, its per-epoch keyed permutation, and the read-ahead thread; see loader.h.
#include "data/loader.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "data/shard.h"

// ---------------------------------------------------------------------------------------------
// A keyed bijection on [0, n): a balanced Feistel network on the smallest even number of bits that
// covers n, walked again while the result falls outside [0, n). The domain is at most 4n, so a
// value takes under 4 passes on average; no O(n) table is needed for billions of windows.

#define PERMUTATION_ROUNDS 6

typedef struct {
  uint64_t n;
  int half_bits;
  uint64_t keys[PERMUTATION_ROUNDS];
} Permutation;

static uint64_t mix64(uint64_t x) {  // SplitMix64's finalizer: every input bit reaches every output bit
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

static void permutation_init(Permutation *permutation, uint64_t n, uint64_t seed, int stage, uint64_t epoch) {
  permutation->n = n;
  int bits = 0;
  while (bits < 64 && (n - 1) >> bits) bits++;
  permutation->half_bits = bits < 2 ? 1 : (bits + 1) / 2;
  uint64_t key = mix64(mix64(mix64(seed) ^ (uint64_t)(int64_t)stage) ^ epoch);
  for (int r = 0; r < PERMUTATION_ROUNDS; r++) permutation->keys[r] = mix64(key + (uint64_t)r);
}

static uint64_t permutation_apply(const Permutation *permutation, uint64_t x) {
  if (permutation->n <= 1) return 0;
  int half = permutation->half_bits;
  uint64_t mask = (1ULL << half) - 1;
  do {
    uint64_t left = x >> half, right = x & mask;
    for (int r = 0; r < PERMUTATION_ROUNDS; r++) {
      uint64_t next_right = left ^ (mix64(right ^ permutation->keys[r]) & mask);
      left = right;
      right = next_right;
    }
    x = (left << half) | right;
  } while (x >= permutation->n);
  return x;
}

// ---------------------------------------------------------------------------------------------

struct Loader {
  LoaderConfig config;  // path owned (copied)
  Dataset dataset;
  uint64_t vocab_size;  // the limit tokens are checked against
  uint64_t window_count, train_windows, val_windows;
  int local_batch;      // G / dp_size
  LoaderState state;    // consumed_samples: handed out through loader_next_batch

  pthread_t thread;
  pthread_mutex_t mutex;
  pthread_cond_t changed;
  int ahead_ready;      // `ahead` holds the step that starts at state.consumed_samples
  int stopping;
  Batch ahead;
  uint32_t *thread_tokens;  // (T + 1,) scratch of the read-ahead thread
  uint8_t *thread_mask;     // (T + 1,)
  uint32_t *val_tokens;     // (T + 1,) scratch of loader_val_batch, called by the user's thread
  uint8_t *val_mask;        // (T + 1,)
};

uint64_t loader_window_of_sample(const Loader *loader, uint64_t sample) {
  Permutation permutation;
  permutation_init(&permutation, loader->train_windows, loader->state.seed, loader->state.stage,
                   sample / loader->train_windows);
  return permutation_apply(&permutation, sample % loader->train_windows);
}

// Fills one row from window `window`: inputs (T,), targets (T,), doc_start (T,).
static void loader_read_window(const Loader *loader, uint64_t window, int *inputs, int *targets,
                               unsigned char *doc_start, uint32_t *tokens, uint8_t *mask) {
  const Dataset *dataset = &loader->dataset;
  int T = loader->config.seq_len;
  uint64_t start = window * (uint64_t)T;
  dataset_read(dataset, start, (uint64_t)T + 1, tokens, mask);
  dataset_check_token_range(dataset, start, tokens, (uint64_t)T + 1, loader->vocab_size, "model's");
  for (int t = 0; t < T; t++) {
    inputs[t] = (int)tokens[t];
    targets[t] = mask[t + 1] ? (int)tokens[t + 1] : -1;
  }
  memset(doc_start, 0, (size_t)T);
  doc_start[0] = 1;
  // First document starting after `start`, then every one inside the window.
  uint64_t lo = 0, hi = dataset->document_count;
  while (lo < hi) {
    uint64_t mid = (lo + hi) / 2;
    if (dataset->document_start[mid] <= start) lo = mid + 1;
    else hi = mid;
  }
  for (uint64_t d = lo; d < dataset->document_count && dataset->document_start[d] < start + (uint64_t)T; d++)
    doc_start[dataset->document_start[d] - start] = 1;
}

static void loader_fill_train(const Loader *loader, Batch *batch, uint64_t first_global_sample) {
  int T = loader->config.seq_len;
  batch->B = loader->local_batch;
  batch->T = T;
  batch->first_sample = first_global_sample + (uint64_t)loader->config.dp_rank * (uint64_t)loader->local_batch;
  for (int b = 0; b < batch->B; b++) {
    uint64_t window = loader_window_of_sample(loader, batch->first_sample + (uint64_t)b);
    size_t row = (size_t)b * (size_t)T;
    loader_read_window(loader, window, batch->inputs + row, batch->targets + row, batch->doc_start + row,
                       loader->thread_tokens, loader->thread_mask);
  }
}

static void *loader_read_ahead(void *argument) {
  Loader *loader = argument;
  pthread_mutex_lock(&loader->mutex);
  for (;;) {
    while (!loader->stopping && loader->ahead_ready) pthread_cond_wait(&loader->changed, &loader->mutex);
    if (loader->stopping) break;
    uint64_t first = loader->state.consumed_samples;
    pthread_mutex_unlock(&loader->mutex);
    loader_fill_train(loader, &loader->ahead, first);
    pthread_mutex_lock(&loader->mutex);
    loader->ahead_ready = 1;
    pthread_cond_broadcast(&loader->changed);
  }
  pthread_mutex_unlock(&loader->mutex);
  return NULL;
}

Loader *loader_open(const LoaderConfig *config, const LoaderState *resume) {
  CHECK(config->dp_size >= 1 && config->dp_rank >= 0 && config->dp_rank < config->dp_size,
        "dp rank %d of %d", config->dp_rank, config->dp_size);
  if (config->seq_len < 1) klt_user_error("seq_len is %d; it must be at least 1", config->seq_len);
  if (config->global_batch < 1 || config->global_batch % config->dp_size != 0)
    klt_user_error("the global batch (%d samples) must be a positive multiple of the data-parallel size %d; "
                   "change the global batch or the number of ranks", config->global_batch, config->dp_size);
  if (!(config->val_fraction >= 0 && config->val_fraction < 1))
    klt_user_error("val_fraction is %g; it must be in [0, 1)", config->val_fraction);

  Loader *loader = klt_calloc(1, sizeof(Loader));
  loader->config = *config;
  loader->config.path = klt_strdup(config->path);
  dataset_open(&loader->dataset, config->path);
  const Dataset *dataset = &loader->dataset;
  loader->vocab_size = config->vocab_size ? config->vocab_size : dataset->vocab_size;
  if (dataset->vocab_size > loader->vocab_size)
    klt_user_error("dataset %s was made for a vocabulary of %llu tokens but the model's has %llu; use data "
                   "made with the model's tokenizer or a model with a larger vocabulary", config->path,
                   (unsigned long long)dataset->vocab_size, (unsigned long long)loader->vocab_size);

  uint64_t T = (uint64_t)config->seq_len;
  loader->window_count = (dataset->token_count - 1) / T;
  if (loader->window_count == 0)
    klt_user_error("dataset %s holds %llu tokens, fewer than the seq_len + 1 = %llu that one sample needs; "
                   "use a shorter seq_len or more data", config->path, (unsigned long long)dataset->token_count,
                   (unsigned long long)(T + 1));
  loader->val_windows = 0;
  if (config->val_fraction > 0) {
    // The tolerance keeps 0.05 * 220 = 11.000000000000002 from rounding up to 12.
    double share = config->val_fraction * (double)loader->window_count;
    loader->val_windows = (uint64_t)ceil(share * (1 - 1e-12));
    if (loader->val_windows < 1) loader->val_windows = 1;
  }
  if (loader->val_windows >= loader->window_count)
    klt_user_error("dataset %s has only %llu windows of seq_len %d, too few to hold out a validation split "
                   "and still train; use more data, a shorter seq_len or a smaller val_fraction", config->path,
                   (unsigned long long)loader->window_count, config->seq_len);
  loader->train_windows = loader->window_count - loader->val_windows;
  loader->local_batch = config->global_batch / config->dp_size;
  if (resume) loader->state = *resume;
  else loader->state = (LoaderState){.stage = config->stage, .consumed_samples = 0, .seed = config->seed};

  loader->thread_tokens = klt_malloc((T + 1) * sizeof(uint32_t));
  loader->thread_mask = klt_malloc(T + 1);
  loader->val_tokens = klt_malloc((T + 1) * sizeof(uint32_t));
  loader->val_mask = klt_malloc(T + 1);
  loader_alloc_batch(loader, &loader->ahead);
  pthread_mutex_init(&loader->mutex, NULL);
  pthread_cond_init(&loader->changed, NULL);
  CHECK(pthread_create(&loader->thread, NULL, loader_read_ahead, loader) == 0, "starting the loader thread");
  return loader;
}

void loader_close(Loader *loader) {
  pthread_mutex_lock(&loader->mutex);
  loader->stopping = 1;
  pthread_cond_broadcast(&loader->changed);
  pthread_mutex_unlock(&loader->mutex);
  pthread_join(loader->thread, NULL);
  pthread_mutex_destroy(&loader->mutex);
  pthread_cond_destroy(&loader->changed);
  loader_free_batch(&loader->ahead);
  dataset_close(&loader->dataset);
  free(loader->thread_tokens);
  free(loader->thread_mask);
  free(loader->val_tokens);
  free(loader->val_mask);
  free((char *)loader->config.path);
  free(loader);
}

void loader_alloc_batch(const Loader *loader, Batch *batch) {
  size_t B = (size_t)loader->local_batch, T = (size_t)loader->config.seq_len;
  batch->B = (int)B;
  batch->T = (int)T;
  batch->capacity = (int)B;
  batch->first_sample = 0;
  batch->inputs = klt_calloc(B * T, sizeof(int));
  batch->targets = klt_calloc(B * T, sizeof(int));
  batch->doc_start = klt_calloc(B * T, 1);
}

void loader_free_batch(Batch *batch) {
  free(batch->inputs);
  free(batch->targets);
  free(batch->doc_start);
  memset(batch, 0, sizeof(Batch));
}

void loader_next_batch(Loader *loader, Batch *batch) {
  CHECK(batch->capacity >= loader->local_batch && batch->T == loader->config.seq_len,
        "batch allocated for another loader");
  pthread_mutex_lock(&loader->mutex);
  while (!loader->ahead_ready) pthread_cond_wait(&loader->changed, &loader->mutex);
  size_t cells = (size_t)loader->local_batch * (size_t)loader->config.seq_len;
  memcpy(batch->inputs, loader->ahead.inputs, cells * sizeof(int));
  memcpy(batch->targets, loader->ahead.targets, cells * sizeof(int));
  memcpy(batch->doc_start, loader->ahead.doc_start, cells);
  batch->B = loader->ahead.B;
  batch->first_sample = loader->ahead.first_sample;
  loader->state.consumed_samples += (uint64_t)loader->config.global_batch;
  loader->ahead_ready = 0;
  pthread_cond_broadcast(&loader->changed);
  pthread_mutex_unlock(&loader->mutex);
}

LoaderState loader_state(const Loader *loader) {
  pthread_mutex_lock((pthread_mutex_t *)&loader->mutex);
  LoaderState state = loader->state;
  pthread_mutex_unlock((pthread_mutex_t *)&loader->mutex);
  return state;
}

int loader_val_batches(const Loader *loader) {
  uint64_t G = (uint64_t)loader->config.global_batch;
  return (int)((loader->val_windows + G - 1) / G);
}

void loader_val_batch(Loader *loader, int index, Batch *batch) {
  CHECK(index >= 0 && index < loader_val_batches(loader), "validation batch %d of %d", index,
        loader_val_batches(loader));
  CHECK(batch->capacity >= loader->local_batch && batch->T == loader->config.seq_len,
        "batch allocated for another loader");
  uint64_t G = (uint64_t)loader->config.global_batch, D = (uint64_t)loader->config.dp_size;
  uint64_t r = (uint64_t)loader->config.dp_rank;
  uint64_t lo = (uint64_t)index * G;
  uint64_t n = loader->val_windows - lo < G ? loader->val_windows - lo : G;
  uint64_t first = lo + r * n / D, last = lo + (r + 1) * n / D;
  int T = loader->config.seq_len;
  batch->B = (int)(last - first);
  batch->T = T;
  batch->first_sample = loader->train_windows + first;
  for (int b = 0; b < batch->B; b++) {
    size_t row = (size_t)b * (size_t)T;
    loader_read_window(loader, batch->first_sample + (uint64_t)b, batch->inputs + row, batch->targets + row,
                       batch->doc_start + row, loader->val_tokens, loader->val_mask);
  }
}

uint64_t loader_train_windows(const Loader *loader) { return loader->train_windows; }
uint64_t loader_val_windows(const Loader *loader) { return loader->val_windows; }
uint64_t loader_token_count(const Loader *loader) { return loader->dataset.token_count; }
