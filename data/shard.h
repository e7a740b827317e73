/* The on-disk token format: a dataset is a directory of HDF5 shards (`*.h5`, read in name order),
 * each holding a 1-D uint32 `tokens` dataset (chunked, optionally deflated), a 1-D uint64
 * `doc_offsets` dataset (the start of every document within the shard, the first one 0), an optional
 * 1-D uint8 `loss_mask` (1 where predicting that token counts in the loss; absent means every token
 * counts) and root attributes `format_version`, `vocab_size`, `tokenizer` and `token_count`.
 * This file writes shards (to `<name>.tmp`, renamed on close, so a reader never sees half a shard)
 * and opens, verifies and reads a whole dataset as one concatenated token stream. Every problem in
 * the files is a user error naming the file and what to do. All HDF5 calls hold h5io_lock(). */
#pragma once
#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#define SHARD_FORMAT_VERSION 1
// The built-in tokenizer: ids 0-255 are bytes, 256 ends every document.
#define BYTE_TOKENIZER_NAME "byte"
#define BYTE_TOKENIZER_END_OF_DOCUMENT 256
#define BYTE_TOKENIZER_VOCAB_SIZE 257
// Chunk length of `tokens` and `loss_mask`: 256 KiB of tokens, a cheap read for one window.
#define SHARD_CHUNK_TOKENS 65536
#define SHARD_TOKENIZER_NAME_MAX 128

// ---------------------------------------------------------------------------------------------
// Writing

typedef struct ShardWriter ShardWriter;

// Creates `path`.tmp; with_loss_mask says whether every append carries a mask. deflate_level 0-9
// (0 = no compression).
ShardWriter *shard_writer_create(const char *path, uint64_t vocab_size, const char *tokenizer,
                                 int deflate_level, int with_loss_mask);
// The next appended token starts a document.
void shard_writer_begin_document(ShardWriter *writer);
// tokens (count,); loss_mask (count,), NULL when the shard has no mask.
void shard_writer_append(ShardWriter *writer, const uint32_t *tokens, const uint8_t *loss_mask,
                         size_t count);
uint64_t shard_writer_token_count(const ShardWriter *writer);
uint64_t shard_writer_document_count(const ShardWriter *writer);
// Writes doc_offsets and the attributes, closes and renames `path`.tmp to `path`; frees writer.
// A shard must hold at least one token and begin with a document.
void shard_writer_close(ShardWriter *writer);

// ---------------------------------------------------------------------------------------------
// Reading

typedef struct {
  char *path;
  hid_t file;
  hid_t tokens;     // (token_count,) uint32
  hid_t loss_mask;  // (token_count,) uint8, or H5I_INVALID_HID when absent
  uint64_t token_count;
  uint64_t document_count;
  uint64_t vocab_size;
  char tokenizer[SHARD_TOKENIZER_NAME_MAX];
} Shard;

typedef struct {
  char *directory;
  int shard_count;
  Shard *shards;             // (shard_count,) sorted by file name
  uint64_t *shard_start;     // (shard_count + 1,) index of each shard's first token in the stream
  uint64_t token_count;
  uint64_t document_count;
  uint64_t *document_start;  // (document_count,) stream index of every document's first token
  uint64_t vocab_size;       // the same in every shard
  char tokenizer[SHARD_TOKENIZER_NAME_MAX];
  int has_loss_mask;         // some shard has a loss mask
} Dataset;

// Opens every shard of `directory` and checks its structure (datasets, dtypes, attributes,
// format version, token_count, doc_offsets sorted and in range, same vocabulary and tokenizer in
// all shards). Does not read the tokens: see dataset_verify_tokens.
void dataset_open(Dataset *dataset, const char *directory);
void dataset_close(Dataset *dataset);
// Reads every token and stops with a user error naming shard and offset at the first token id
// >= the dataset's vocab_size.
void dataset_verify_tokens(const Dataset *dataset);
// Reads stream tokens [start, start + count): tokens (count,); loss_mask (count,) or NULL, filled
// with 1 where a shard has no mask.
void dataset_read(const Dataset *dataset, uint64_t start, uint64_t count, uint32_t *tokens,
                  uint8_t *loss_mask);
// Stops with a user error naming shard and offset if any of tokens (count,), which start at stream
// index `start`, is >= vocab_size; `vocab_name` says whose vocabulary it is in the message.
void dataset_check_token_range(const Dataset *dataset, uint64_t start, const uint32_t *tokens,
                               uint64_t count, uint64_t vocab_size, const char *vocab_name);
