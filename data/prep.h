/* The work behind klt-data's three commands, callable from tests: prep turns text (byte tokenizer)
 * or pre-tokenized files (raw uint16/uint32 arrays, .npy) into a directory of shards; synth writes the
 * synthetic recall tasks (MQAR, palindrome) with a loss mask, one example per document of exactly
 * seq_len tokens; inspect verifies a dataset directory completely and summarizes it. The token
 * layouts of the synthetic tasks are documented in data/README.md. */
#pragma once
#include <stdint.h>

#include "data/shard.h"

typedef enum { PREP_FORMAT_TEXT, PREP_FORMAT_U16, PREP_FORMAT_U32, PREP_FORMAT_NPY } PrepFormat;

typedef struct {
  const char *output;          // dataset directory to create (or empty, or replaced with force)
  PrepFormat format;
  uint64_t vocab_size;         // required for pre-tokenized formats; text uses the byte tokenizer's 257
  const char *tokenizer;       // NULL: "byte" for text, "pretokenized" otherwise
  uint64_t shard_tokens;       // at most this many tokens per shard
  int deflate_level;           // 0-9
  int64_t end_of_document;     // pre-tokenized: this id ends a document (kept); -1: one file = one document
  int split_on_blank_lines;    // text: blank lines separate documents inside a file
  int force;                   // replace the *.h5 shards of a non-empty output directory
  int show_progress;           // a line on stderr about every second
  const char *const *inputs;   // (input_count,) file paths
  int input_count;
} PrepConfig;

typedef struct {
  int shards;
  uint64_t tokens;
  uint64_t documents;  // entries of doc_offsets: a document cut by a shard boundary counts twice
} PrepTotals;

PrepTotals prep_write_dataset(const PrepConfig *config);

typedef enum { SYNTH_TASK_MQAR, SYNTH_TASK_PALINDROME } SynthTask;

typedef struct {
  SynthTask task;
  const char *output;
  int seq_len;            // T: tokens per example
  uint64_t examples;      // N
  uint64_t seed;
  uint64_t vocab_size;
  int pairs;              // MQAR: key-value pairs per example (0: seq_len / 4)
  int queries;            // MQAR: queries per example, at most pairs (0: pairs)
  int length;             // palindrome: random tokens before the separator (0: (seq_len - 1) / 2)
  uint64_t shard_tokens;  // rounded down to whole examples
  int deflate_level;
  int force;
} SynthConfig;

PrepTotals synth_write_dataset(const SynthConfig *config);

typedef struct {
  int shards;
  uint64_t tokens;
  uint64_t documents;
  uint64_t vocab_size;
  char tokenizer[SHARD_TOKENIZER_NAME_MAX];
  int has_loss_mask;
} DatasetSummary;

// Checks everything dataset_open checks plus every token id; stops at the first problem.
DatasetSummary dataset_inspect(const char *directory);
