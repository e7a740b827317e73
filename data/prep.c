// klt-data prep, synth and inspect; see prep.h and data/README.md.
#include "data/prep.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/check.h"
#include "common/rng.h"

#define READ_BLOCK (1 << 20)  // tokens converted per pass

// ---------------------------------------------------------------------------------------------
// Output directory

static int has_suffix(const char *name, const char *suffix) {
  size_t n = strlen(name), m = strlen(suffix);
  return n >= m && strcmp(name + n - m, suffix) == 0;
}

static void make_directories(const char *path) {
  char *partial = klt_strdup(path);
  for (char *p = partial + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    mkdir(partial, 0755);
    *p = '/';
  }
  free(partial);
  if (mkdir(path, 0755) != 0 && errno != EEXIST)
    klt_user_error("could not create output directory %s (%s); check the path and its permissions", path,
                   strerror(errno));
}

// Creates `path` if needed. A non-empty directory is refused unless force, which removes its shards
// (and leftover temporary shards) so that no old shard mixes into the new dataset.
static void prepare_output_directory(const char *path, int force) {
  make_directories(path);
  DIR *listing = opendir(path);
  if (!listing) klt_user_error("cannot open output directory %s (%s)", path, strerror(errno));
  int occupied = 0;
  for (struct dirent *entry; (entry = readdir(listing)) != NULL;) {
    if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
    occupied = 1;
    if (force && (has_suffix(entry->d_name, ".h5") || has_suffix(entry->d_name, ".h5.tmp"))) {
      char *file = klt_malloc(strlen(path) + strlen(entry->d_name) + 2);
      sprintf(file, "%s/%s", path, entry->d_name);
      if (remove(file) != 0) klt_user_error("could not remove old shard %s (%s)", file, strerror(errno));
      free(file);
    }
  }
  closedir(listing);
  if (occupied && !force)
    klt_user_error("output directory %s is not empty; choose another directory or pass --force to replace "
                   "its shards", path);
}

// ---------------------------------------------------------------------------------------------
// A stream of tokens cut into shards of at most shard_tokens. A document that crosses a shard
// boundary continues as a new document in the next shard (every shard begins a document).

typedef struct {
  const char *directory;
  uint64_t shard_tokens, vocab_size;
  const char *tokenizer;
  int deflate_level;
  ShardWriter *current;
  int document_pending;  // the next token begins a document
  PrepTotals totals;
  double last_progress;
  uint64_t bytes_read;
  int show_progress;
} ShardSequence;

static void sequence_close_shard(ShardSequence *sequence) {
  if (!sequence->current) return;
  sequence->totals.tokens += shard_writer_token_count(sequence->current);
  sequence->totals.documents += shard_writer_document_count(sequence->current);
  shard_writer_close(sequence->current);
  sequence->current = NULL;
}

static void sequence_begin_document(ShardSequence *sequence) { sequence->document_pending = 1; }

static void sequence_show_progress(ShardSequence *sequence) {
  if (!sequence->show_progress) return;
  double now = klt_now_seconds();
  if (now - sequence->last_progress < 1.0) return;
  sequence->last_progress = now;
  uint64_t tokens = sequence->totals.tokens + (sequence->current ? shard_writer_token_count(sequence->current) : 0);
  fprintf(stderr, "klt-data: %.1f MB read, %llu tokens, %d shards\n", (double)sequence->bytes_read / 1e6,
          (unsigned long long)tokens, sequence->totals.shards);
}

static void sequence_append(ShardSequence *sequence, const uint32_t *tokens, size_t count) {
  while (count > 0) {
    if (!sequence->current) {
      char *path = klt_malloc(strlen(sequence->directory) + 32);
      sprintf(path, "%s/shard_%05d.h5", sequence->directory, sequence->totals.shards++);
      sequence->current = shard_writer_create(path, sequence->vocab_size, sequence->tokenizer,
                                              sequence->deflate_level, 0);
      free(path);
      shard_writer_begin_document(sequence->current);
    }
    if (sequence->document_pending) {
      shard_writer_begin_document(sequence->current);
      sequence->document_pending = 0;
    }
    uint64_t room = sequence->shard_tokens - shard_writer_token_count(sequence->current);
    size_t take = count < room ? count : (size_t)room;
    shard_writer_append(sequence->current, tokens, NULL, take);
    tokens += take;
    count -= take;
    if (shard_writer_token_count(sequence->current) == sequence->shard_tokens) sequence_close_shard(sequence);
  }
  sequence_show_progress(sequence);
}

// ---------------------------------------------------------------------------------------------
// Inputs

static unsigned char *read_whole_file(const char *path, size_t *size) {
  FILE *file = fopen(path, "rb");
  if (!file) klt_user_error("cannot open input %s (%s); check the path", path, strerror(errno));
  size_t capacity = 1 << 20, used = 0;
  unsigned char *data = klt_malloc(capacity);
  for (;;) {
    if (used == capacity) data = klt_realloc(data, capacity *= 2);
    size_t got = fread(data + used, 1, capacity - used, file);
    used += got;
    if (got == 0) break;
  }
  int failed = ferror(file);
  fclose(file);
  if (failed) klt_user_error("could not read input %s; check the file", path);
  *size = used;
  return data;
}

static int line_is_blank(const unsigned char *line, size_t length) {
  for (size_t i = 0; i < length; i++)
    if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r' && line[i] != '\n') return 0;
  return 1;
}

// Byte tokenizer: each document is its bytes then the end-of-document id.
static void prep_text_document(ShardSequence *sequence, const unsigned char *text, size_t size, uint32_t *buffer) {
  if (size == 0) return;
  sequence_begin_document(sequence);
  while (size > 0) {
    size_t take = size < READ_BLOCK ? size : READ_BLOCK;
    for (size_t i = 0; i < take; i++) buffer[i] = text[i];
    sequence_append(sequence, buffer, take);
    text += take;
    size -= take;
  }
  uint32_t end = BYTE_TOKENIZER_END_OF_DOCUMENT;
  sequence_append(sequence, &end, 1);
}

static void prep_text_file(ShardSequence *sequence, const PrepConfig *config, const char *path, uint32_t *buffer) {
  size_t size = 0;
  unsigned char *text = read_whole_file(path, &size);
  sequence->bytes_read += size;
  if (!config->split_on_blank_lines) {
    prep_text_document(sequence, text, size, buffer);
  } else {
    // A document runs from its first non-blank line to the line before the next blank line.
    size_t position = 0, document_begin = 0, document_end = 0;
    int in_document = 0;
    while (position < size) {
      const unsigned char *newline = memchr(text + position, '\n', size - position);
      size_t line_end = newline ? (size_t)(newline - text) + 1 : size;
      if (line_is_blank(text + position, line_end - position)) {
        if (in_document) prep_text_document(sequence, text + document_begin, document_end - document_begin, buffer);
        in_document = 0;
      } else {
        if (!in_document) document_begin = position;
        in_document = 1;
        document_end = line_end;
      }
      position = line_end;
    }
    if (in_document) prep_text_document(sequence, text + document_begin, document_end - document_begin, buffer);
  }
  free(text);
}

typedef struct {
  size_t element_size;
  int is_signed;
  size_t data_offset;
} TokenFileLayout;

// Parses the header of a version 1-3 .npy file holding a 1-D little-endian integer array.
static TokenFileLayout parse_npy_header(const char *path, const unsigned char *data, size_t size) {
  static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (size < 10 || memcmp(data, magic, 6) != 0)
    klt_user_error("input %s is not a .npy file (bad magic); pass --format for what it holds", path);
  size_t header_length, header_start;
  if (data[6] == 1) {
    header_length = (size_t)data[8] | (size_t)data[9] << 8;
    header_start = 10;
  } else {
    if (size < 12) klt_user_error("input %s has a truncated .npy header", path);
    header_length = (size_t)data[8] | (size_t)data[9] << 8 | (size_t)data[10] << 16 | (size_t)data[11] << 24;
    header_start = 12;
  }
  if (header_start + header_length > size) klt_user_error("input %s has a truncated .npy header", path);
  char *header = klt_calloc(header_length + 1, 1);
  memcpy(header, data + header_start, header_length);
  TokenFileLayout layout = {.data_offset = header_start + header_length};
  static const struct { const char *descr; size_t size; int is_signed; } types[] = {
      {"'<u2'", 2, 0}, {"'<u4'", 4, 0}, {"'<i4'", 4, 1}, {"'<i8'", 8, 1},
      {"'=u2'", 2, 0}, {"'=u4'", 4, 0}, {"'=i4'", 4, 1}, {"'=i8'", 8, 1}};
  for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
    if (strstr(header, types[i].descr)) {
      layout.element_size = types[i].size;
      layout.is_signed = types[i].is_signed;
    }
  }
  if (layout.element_size == 0)
    klt_user_error("input %s holds a dtype klt-data cannot read (header %s); save it as little-endian uint16, "
                   "uint32, int32 or int64", path, header);
  const char *shape = strstr(header, "'shape':");
  const char *open = shape ? strchr(shape, '(') : NULL;
  const char *close = open ? strchr(open, ')') : NULL;
  int commas = 0, digits = 0;
  for (const char *p = open; p && p < close; p++) {
    commas += *p == ',';
    digits += *p >= '0' && *p <= '9';
  }
  // "(N,)" is 1-D; "(N, M)" has a digit after the comma.
  int one_dimensional = close && digits > 0 && commas == 1 && close[-1] == ',' ;
  if (!one_dimensional)
    klt_user_error("input %s is not a 1-D array (header %s); flatten it before prep", path, header);
  free(header);
  return layout;
}

static void prep_token_file(ShardSequence *sequence, const PrepConfig *config, const char *path, uint32_t *buffer) {
  size_t size = 0;
  unsigned char *data = read_whole_file(path, &size);
  sequence->bytes_read += size;
  TokenFileLayout layout = {.element_size = config->format == PREP_FORMAT_U16 ? 2 : 4};
  if (config->format == PREP_FORMAT_NPY) layout = parse_npy_header(path, data, size);
  size_t payload = size - layout.data_offset;
  if (payload % layout.element_size != 0)
    klt_user_error("input %s holds %zu bytes of tokens, not a whole number of %zu-byte ids; check --format",
                   path, payload, layout.element_size);
  size_t count = payload / layout.element_size;
  const unsigned char *p = data + layout.data_offset;
  sequence_begin_document(sequence);
  size_t i = 0;
  while (i < count) {
    size_t take = 0;
    int document_ends = 0;
    for (; i < count && take < READ_BLOCK && !document_ends; i++, take++) {
      const unsigned char *e = p + i * layout.element_size;
      int64_t value;
      if (layout.element_size == 2) value = (int64_t)((uint16_t)(e[0] | e[1] << 8));
      else if (layout.element_size == 4 && !layout.is_signed) {
        uint32_t u;
        memcpy(&u, e, 4);
        value = u;
      } else if (layout.element_size == 4) {
        int32_t s;
        memcpy(&s, e, 4);
        value = s;
      } else {
        memcpy(&value, e, 8);
      }
      if (value < 0 || (uint64_t)value >= config->vocab_size)
        klt_user_error("token id %lld at position %zu of input %s is outside the vocabulary 0..%llu; check "
                       "--vocab-size and --format", (long long)value, i, path,
                       (unsigned long long)config->vocab_size - 1);
      buffer[take] = (uint32_t)value;
      document_ends = value == config->end_of_document;
    }
    sequence_append(sequence, buffer, take);
    if (document_ends && i < count) sequence_begin_document(sequence);
  }
  free(data);
}

PrepTotals prep_write_dataset(const PrepConfig *config) {
  int is_text = config->format == PREP_FORMAT_TEXT;
  const char *tokenizer = config->tokenizer ? config->tokenizer : is_text ? BYTE_TOKENIZER_NAME : "pretokenized";
  uint64_t vocab_size = config->vocab_size;
  if (is_text) {
    if (strcmp(tokenizer, BYTE_TOKENIZER_NAME) != 0)
      klt_user_error("unknown tokenizer '%s': klt-data prep tokenizes text only with the built-in '%s' "
                     "tokenizer; pre-tokenize with yours and use --format u16, u32 or npy", tokenizer,
                     BYTE_TOKENIZER_NAME);
    if (vocab_size != 0 && vocab_size != BYTE_TOKENIZER_VOCAB_SIZE)
      klt_user_error("--vocab-size %llu does not fit text input, whose byte tokenizer has %d ids; leave it out",
                     (unsigned long long)vocab_size, BYTE_TOKENIZER_VOCAB_SIZE);
    vocab_size = BYTE_TOKENIZER_VOCAB_SIZE;
  } else {
    if (vocab_size == 0 || vocab_size > (uint64_t)UINT32_MAX + 1)
      klt_user_error("pre-tokenized input needs --vocab-size, the tokenizer's vocabulary size (1..2^32)");
    if (strlen(tokenizer) == 0 || strlen(tokenizer) >= SHARD_TOKENIZER_NAME_MAX)
      klt_user_error("--tokenizer must be a name of 1 to %d characters", SHARD_TOKENIZER_NAME_MAX - 1);
  }
  if (config->shard_tokens == 0) klt_user_error("--shard-tokens must be positive");
  if (config->deflate_level < 0 || config->deflate_level > 9)
    klt_user_error("--deflate is %d; it must be 0-9", config->deflate_level);
  if (config->input_count == 0) klt_user_error("klt-data prep needs at least one input file");
  for (int i = 0; i < config->input_count; i++) {
    struct stat info;
    if (stat(config->inputs[i], &info) != 0 || !S_ISREG(info.st_mode))
      klt_user_error("input %s is not a readable file; check the path", config->inputs[i]);
  }
  prepare_output_directory(config->output, config->force);

  ShardSequence sequence = {.directory = config->output, .shard_tokens = config->shard_tokens,
                            .vocab_size = vocab_size, .tokenizer = tokenizer,
                            .deflate_level = config->deflate_level, .last_progress = klt_now_seconds(),
                            .show_progress = config->show_progress};
  uint32_t *buffer = klt_malloc(READ_BLOCK * sizeof(uint32_t));
  for (int i = 0; i < config->input_count; i++) {
    if (is_text) prep_text_file(&sequence, config, config->inputs[i], buffer);
    else prep_token_file(&sequence, config, config->inputs[i], buffer);
  }
  free(buffer);
  sequence_close_shard(&sequence);
  if (sequence.totals.tokens == 0) klt_user_error("the inputs hold no tokens; nothing was written");
  return sequence.totals;
}

// ---------------------------------------------------------------------------------------------
// Synthetic tasks (layouts in data/README.md). Token 0 pads; masks are 1 only on answer tokens.

#define SYNTH_PAD 0
#define SYNTH_SEPARATOR 1

static uint64_t random_below(Rng *rng, uint64_t n) { return rng_u64(rng) % n; }

// One MQAR example: P pairs "k v" with distinct keys, then Q queries "k v" (mask on v), then pads.
static void synth_mqar(Rng *rng, const SynthConfig *config, int pairs, int queries, uint32_t *tokens,
                       uint8_t *mask, uint32_t *keys, uint32_t *values, int *order) {
  uint64_t key_count = (config->vocab_size - 1) / 2;
  uint64_t value_first = 1 + key_count, value_count = config->vocab_size - value_first;
  for (int i = 0; i < pairs; i++) {
    int fresh;
    do {
      keys[i] = 1 + (uint32_t)random_below(rng, key_count);
      fresh = 1;
      for (int j = 0; j < i; j++) fresh &= keys[j] != keys[i];
    } while (!fresh);
    values[i] = (uint32_t)(value_first + random_below(rng, value_count));
    order[i] = i;
  }
  for (int i = pairs - 1; i > 0; i--) {
    int j = (int)random_below(rng, (uint64_t)i + 1), swap = order[i];
    order[i] = order[j];
    order[j] = swap;
  }
  int t = 0;
  for (int i = 0; i < pairs; i++) {
    tokens[t] = keys[i], mask[t++] = 0;
    tokens[t] = values[i], mask[t++] = 0;
  }
  for (int q = 0; q < queries; q++) {
    tokens[t] = keys[order[q]], mask[t++] = 0;
    tokens[t] = values[order[q]], mask[t++] = 1;
  }
  for (; t < config->seq_len; t++) tokens[t] = SYNTH_PAD, mask[t] = 0;
}

// One palindrome example: L random tokens, the separator, the L tokens reversed (mask on them), pads.
static void synth_palindrome(Rng *rng, const SynthConfig *config, int length, uint32_t *tokens, uint8_t *mask) {
  int t = 0;
  for (int i = 0; i < length; i++) tokens[t] = 2 + (uint32_t)random_below(rng, config->vocab_size - 2), mask[t++] = 0;
  tokens[t] = SYNTH_SEPARATOR, mask[t++] = 0;
  for (int i = length - 1; i >= 0; i--) tokens[t] = tokens[i], mask[t++] = 1;
  for (; t < config->seq_len; t++) tokens[t] = SYNTH_PAD, mask[t] = 0;
}

PrepTotals synth_write_dataset(const SynthConfig *config) {
  int T = config->seq_len;
  if (T < 4) klt_user_error("--seq-len must be at least 4 for a synthetic task");
  if (config->examples < 1) klt_user_error("--examples must be at least 1");
  if (config->deflate_level < 0 || config->deflate_level > 9)
    klt_user_error("--deflate is %d; it must be 0-9", config->deflate_level);
  if (config->vocab_size > (uint64_t)UINT32_MAX + 1) klt_user_error("--vocab-size must be at most 2^32");
  int pairs = 0, queries = 0, length = 0;
  const char *task_name;
  if (config->task == SYNTH_TASK_MQAR) {
    task_name = "mqar";
    pairs = config->pairs ? config->pairs : T / 4;
    queries = config->queries ? config->queries : pairs;
    if (pairs < 1 || queries < 1 || queries > pairs || 2 * (pairs + queries) > T)
      klt_user_error("MQAR with %d pairs and %d queries needs 2 * (pairs + queries) <= --seq-len %d and "
                     "1 <= queries <= pairs; lower --pairs or --queries", pairs, queries, T);
    if (config->vocab_size < 3 || (config->vocab_size - 1) / 2 < (uint64_t)pairs)
      klt_user_error("MQAR with %d distinct keys needs --vocab-size of at least %d", pairs, 2 * pairs + 1);
  } else {
    task_name = "palindrome";
    length = config->length ? config->length : (T - 1) / 2;
    if (length < 1 || 2 * length + 1 > T)
      klt_user_error("a palindrome of %d tokens needs 2 * length + 1 <= --seq-len %d; lower --length", length, T);
    if (config->vocab_size < 3) klt_user_error("the palindrome task needs --vocab-size of at least 3");
  }
  prepare_output_directory(config->output, config->force);
  char tokenizer[64];
  snprintf(tokenizer, sizeof(tokenizer), "synthetic-%s", task_name);

  // Whole examples per shard, so that no shard boundary falls inside an example.
  uint64_t per_shard = config->shard_tokens / (uint64_t)T;
  if (per_shard < 1) per_shard = 1;
  uint32_t *tokens = klt_malloc((size_t)T * sizeof(uint32_t));
  uint8_t *mask = klt_malloc((size_t)T);
  uint32_t *keys = klt_malloc(((size_t)pairs + 1) * sizeof(uint32_t));
  uint32_t *values = klt_malloc(((size_t)pairs + 1) * sizeof(uint32_t));
  int *order = klt_malloc(((size_t)pairs + 1) * sizeof(int));
  Rng rng;
  rng_seed(&rng, config->seed, (uint64_t)config->task);
  PrepTotals totals = {0};
  ShardWriter *writer = NULL;
  for (uint64_t e = 0; e < config->examples; e++) {
    if (e % per_shard == 0) {
      if (writer) {
        totals.tokens += shard_writer_token_count(writer);
        totals.documents += shard_writer_document_count(writer);
        shard_writer_close(writer);
      }
      char *path = klt_malloc(strlen(config->output) + 32);
      sprintf(path, "%s/shard_%05d.h5", config->output, totals.shards++);
      writer = shard_writer_create(path, config->vocab_size, tokenizer, config->deflate_level, 1);
      free(path);
    }
    if (config->task == SYNTH_TASK_MQAR) synth_mqar(&rng, config, pairs, queries, tokens, mask, keys, values, order);
    else synth_palindrome(&rng, config, length, tokens, mask);
    shard_writer_begin_document(writer);
    shard_writer_append(writer, tokens, mask, (size_t)T);
  }
  // One pad after the last example completes its window: N examples give exactly N windows.
  uint32_t pad = SYNTH_PAD;
  uint8_t no_loss = 0;
  shard_writer_append(writer, &pad, &no_loss, 1);
  totals.tokens += shard_writer_token_count(writer);
  totals.documents += shard_writer_document_count(writer);
  shard_writer_close(writer);
  free(tokens);
  free(mask);
  free(keys);
  free(values);
  free(order);
  return totals;
}

// ---------------------------------------------------------------------------------------------

DatasetSummary dataset_inspect(const char *directory) {
  Dataset dataset;
  dataset_open(&dataset, directory);
  dataset_verify_tokens(&dataset);
  DatasetSummary summary = {.shards = dataset.shard_count, .tokens = dataset.token_count,
                            .documents = dataset.document_count, .vocab_size = dataset.vocab_size,
                            .has_loss_mask = dataset.has_loss_mask};
  snprintf(summary.tokenizer, sizeof(summary.tokenizer), "%s", dataset.tokenizer);
  dataset_close(&dataset);
  return summary;
}
