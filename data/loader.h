/* The training data loader. It cuts the concatenated token stream of a dataset directory into
 * windows of seq_len + 1 tokens with stride seq_len (window i = tokens [i*T, i*T + T + 1), count =
 * (tokens - 1) / T). The last ceil(val_fraction * count) windows are the validation split, the rest
 * train. Train windows are visited in a seeded pseudo-random order, a fresh one each epoch, computed
 * by a keyed bijection (no per-window table). Global sample s is window perm_epoch(s mod n_train)
 * with epoch = s / n_train; step s takes global samples [s*G, (s+1)*G) and dp rank r of D takes the
 * contiguous slice [r*G/D, (r+1)*G/D) of them. The whole state is (stage, consumed_samples, seed),
 * so a restored loader yields the next batch bit for bit whatever the number of ranks. A background
 * thread reads the next batch while the current one is used. Validation batches are read on demand,
 * in window order, and are the same on every call. */
#pragma once
#include <stdint.h>

typedef struct {
  const char *path;      // dataset directory
  int seq_len;           // T
  int global_batch;      // G: samples per step over all dp ranks; G % dp_size == 0
  int dp_rank, dp_size;
  uint64_t seed;
  int stage;             // context-length stage; each stage has its own order
  double val_fraction;   // share of windows held out (0.05 is usual); 0 = no validation split
  unsigned vocab_size;   // the model's vocabulary: a token >= it is a user error naming shard and
                         // offset; 0 = the dataset's own vocab_size
} LoaderConfig;

typedef struct {
  int stage;
  uint64_t consumed_samples;  // global samples handed out before the next batch
  uint64_t seed;
} LoaderState;

// One rank's part of a step. targets are the next tokens, -1 where the loss mask says the token does
// not count, so targets alone carry the mask.
typedef struct {
  int B, T;                  // B: rows filled (G / dp_size for training; may be fewer for validation)
  int capacity;              // rows allocated
  int *inputs;               // (B, T)
  int *targets;              // (B, T)
  unsigned char *doc_start;  // (B, T) 1 where input position t begins a document, and at t = 0
  uint64_t first_sample;     // global index of row 0 (train: sample index; validation: window index)
} Batch;

typedef struct Loader Loader;

// Opens the dataset and starts the read-ahead thread. resume NULL starts at sample 0 with the
// config's seed and stage; otherwise the state's stage, consumed_samples and seed are used.
Loader *loader_open(const LoaderConfig *config, const LoaderState *resume);
void loader_close(Loader *loader);

// A batch with room for this rank's G / dp_size rows of seq_len tokens.
void loader_alloc_batch(const Loader *loader, Batch *batch);
void loader_free_batch(Batch *batch);

// Fills batch with the next step's slice and advances the state by G samples.
void loader_next_batch(Loader *loader, Batch *batch);
// The state after the batches handed out so far: saving it and opening with it gives the next batch.
LoaderState loader_state(const Loader *loader);

// Validation: ceil(n_val / G) steps; step i covers validation windows [i*G, min((i+1)*G, n_val))
// and this rank takes its even share of them (so the last step may have fewer than G / dp_size
// rows, even none). Returns 0 when val_fraction is 0.
int loader_val_batches(const Loader *loader);
void loader_val_batch(Loader *loader, int index, Batch *batch);

uint64_t loader_train_windows(const Loader *loader);
uint64_t loader_val_windows(const Loader *loader);
uint64_t loader_token_count(const Loader *loader);
// The window index (into the whole window list) that global train sample `sample` reads.
uint64_t loader_window_of_sample(const Loader *loader, uint64_t sample);
