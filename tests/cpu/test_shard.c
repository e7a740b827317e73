// Shards and klt-data: writer/reader round trip, prep of text and pre-tokenized inputs, the sample
// corpus through the klt-data program (prep and inspect agree on the token count), synthetic tasks.
#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/loader.h"
#include "data/prep.h"
#include "data/shard.h"
#include "tests/testing.h"

static char dir[256];

static void make_dir(void) {
  test_make_dir(dir, sizeof dir, "klt_shard");
}

static char *path_in_dir(const char *name) {
  static char path[512];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  return path;
}

static void write_bytes(const char *name, const void *data, size_t size) {
  FILE *f = fopen(path_in_dir(name), "wb");
  cr_assert_not_null(f);
  cr_assert_eq(fwrite(data, 1, size, f), size);
  fclose(f);
}

static int count_files_with_suffix(const char *directory, const char *suffix) {
  DIR *listing = opendir(directory);
  cr_assert_not_null(listing);
  int count = 0;
  for (struct dirent *e; (e = readdir(listing)) != NULL;) {
    size_t n = strlen(e->d_name), m = strlen(suffix);
    count += n >= m && strcmp(e->d_name + n - m, suffix) == 0;
  }
  closedir(listing);
  return count;
}

Test(shard, writer_round_trip_across_shards) {
  make_dir();
  char data_dir[300];
  snprintf(data_dir, sizeof data_dir, "%s/data", dir);
  mkdir(data_dir, 0755);
  // Two shards (the second longer than a chunk), documents of varying length, with a loss mask.
  uint64_t sizes[2] = {1000, SHARD_CHUNK_TOKENS + 777};
  uint64_t total = 0;
  for (int s = 0; s < 2; s++) {
    char path[400];
    snprintf(path, sizeof path, "%s/shard_%05d.h5", data_dir, s);
    ShardWriter *writer = shard_writer_create(path, 1u << 20, "test", s, 1);
    for (uint64_t i = 0; i < sizes[s]; i++) {
      if (i % 37 == 0) shard_writer_begin_document(writer);
      uint32_t token = (uint32_t)(total + i);
      uint8_t mask = (uint8_t)((total + i) % 3 != 0);
      shard_writer_append(writer, &token, &mask, 1);
    }
    shard_writer_close(writer);
    total += sizes[s];
  }
  cr_assert_eq(count_files_with_suffix(data_dir, ".tmp"), 0, "no temporary file may remain");

  Dataset dataset;
  dataset_open(&dataset, data_dir);
  cr_assert_eq(dataset.shard_count, 2);
  cr_assert_eq(dataset.token_count, total);
  cr_assert_eq(dataset.vocab_size, 1u << 20);
  cr_assert_str_eq(dataset.tokenizer, "test");
  cr_assert(dataset.has_loss_mask);
  uint64_t expected_documents = (sizes[0] + 36) / 37 + (sizes[1] + 36) / 37;
  cr_assert_eq(dataset.document_count, expected_documents);
  cr_assert_eq(dataset.document_start[(sizes[0] + 36) / 37], sizes[0], "second shard begins a document");
  uint32_t *tokens = malloc(total * sizeof(uint32_t));
  uint8_t *mask = malloc(total);
  dataset_read(&dataset, 0, total, tokens, mask);  // one read across the shard boundary
  for (uint64_t i = 0; i < total; i++) {
    cr_assert_eq(tokens[i], (uint32_t)i, "token %llu", (unsigned long long)i);
    cr_assert_eq(mask[i], (uint8_t)(i % 3 != 0));
  }
  dataset_read(&dataset, 990, 20, tokens, NULL);
  for (int i = 0; i < 20; i++) cr_assert_eq(tokens[i], 990u + (uint32_t)i);
  dataset_verify_tokens(&dataset);
  dataset_close(&dataset);
  free(tokens);
  free(mask);
}

static void run_program(const char *arguments, char *output, size_t capacity) {
  const char *build = getenv("KLT_BUILD_DIR");
  cr_assert_not_null(build, "KLT_BUILD_DIR must be set (ctest sets it)");
  char command[2048];
  snprintf(command, sizeof command, "%s/klt-data %s 2>&1", build, arguments);
  FILE *pipe = popen(command, "r");
  cr_assert_not_null(pipe);
  size_t used = fread(output, 1, capacity - 1, pipe);
  output[used] = 0;
  cr_assert_eq(pclose(pipe), 0, "`%s` failed:\n%s", command, output);
}

static unsigned long long number_after(const char *text, const char *label) {
  const char *at = strstr(text, label);
  cr_assert_not_null(at, "no '%s' in:\n%s", label, text);
  return strtoull(at + strlen(label), NULL, 10);
}

Test(shard, sample_corpus_prep_and_inspect_agree) {
  make_dir();
  const char *source = getenv("KLT_SOURCE_DIR");
  cr_assert_not_null(source);
  char sample[400];
  snprintf(sample, sizeof sample, "%s/data/sample", source);
  // Bytes of every sample file plus one end-of-document id per file.
  unsigned long long expected = 0, files = 0;
  DIR *listing = opendir(sample);
  cr_assert_not_null(listing);
  for (struct dirent *e; (e = readdir(listing)) != NULL;) {
    size_t n = strlen(e->d_name);
    if (n < 4 || strcmp(e->d_name + n - 4, ".txt") != 0) continue;
    char path[800];
    snprintf(path, sizeof path, "%s/%s", sample, e->d_name);
    struct stat info;
    cr_assert_eq(stat(path, &info), 0);
    expected += (unsigned long long)info.st_size + 1;
    files++;
  }
  closedir(listing);
  cr_assert_geq(files, 5, "the sample corpus has several documents");
  cr_assert_geq(expected, 1000000ull, "the sample corpus is about 1-5 MB");

  static char output[8192];
  char arguments[1200];
  snprintf(arguments, sizeof arguments, "prep --output %s/sample --shard-tokens 300000 --deflate 1 %s/*.txt",
           dir, sample);
  run_program(arguments, output, sizeof output);
  unsigned long long prepared = number_after(output, "wrote ");
  snprintf(arguments, sizeof arguments, "inspect %s/sample", dir);
  run_program(arguments, output, sizeof output);
  unsigned long long inspected = number_after(output, "tokens:");
  cr_assert_eq(prepared, expected, "prep wrote %llu tokens, expected %llu", prepared, expected);
  cr_assert_eq(inspected, prepared, "inspect counts %llu tokens, prep wrote %llu", inspected, prepared);
  cr_assert_eq(number_after(output, "shards:"), (expected + 299999) / 300000);
  cr_assert_not_null(strstr(output, "tokenizer:         byte"), "%s", output);
}

Test(shard, text_documents_and_blank_line_split) {
  make_dir();
  const char *a = "ab\n", *b = "first\n\n\nsecond\n  \nthird";
  write_bytes("a.txt", a, strlen(a));
  write_bytes("b.txt", b, strlen(b));
  const char *inputs[2] = {NULL, NULL};
  char path_a[512], path_b[512], output[512];
  snprintf(path_a, sizeof path_a, "%s/a.txt", dir);
  snprintf(path_b, sizeof path_b, "%s/b.txt", dir);
  snprintf(output, sizeof output, "%s/out", dir);
  inputs[0] = path_a;
  inputs[1] = path_b;
  PrepConfig config = {.output = output, .format = PREP_FORMAT_TEXT, .shard_tokens = 1000,
                       .end_of_document = -1, .split_on_blank_lines = 1, .inputs = inputs, .input_count = 2};
  PrepTotals totals = prep_write_dataset(&config);
  // "ab\n" | "first\n" | "second\n" | "third", each followed by the end-of-document id.
  const char *expected_text[4] = {"ab\n", "first\n", "second\n", "third"};
  cr_assert_eq(totals.documents, 4);
  cr_assert_eq(totals.tokens, 3 + 6 + 7 + 5 + 4);
  Dataset dataset;
  dataset_open(&dataset, output);
  uint32_t tokens[64];
  dataset_read(&dataset, 0, dataset.token_count, tokens, NULL);
  uint64_t position = 0;
  for (int d = 0; d < 4; d++) {
    cr_assert_eq(dataset.document_start[d], position);
    for (size_t i = 0; i < strlen(expected_text[d]); i++)
      cr_assert_eq(tokens[position++], (uint32_t)(unsigned char)expected_text[d][i]);
    cr_assert_eq(tokens[position++], BYTE_TOKENIZER_END_OF_DOCUMENT);
  }
  cr_assert_eq(dataset.vocab_size, BYTE_TOKENIZER_VOCAB_SIZE);
  dataset_close(&dataset);
}

Test(shard, pretokenized_raw_and_npy_with_end_of_document) {
  make_dir();
  uint16_t u16[6] = {5, 6, 9, 7, 9, 8};  // 9 ends a document
  uint32_t u32[3] = {70000, 1, 2};
  write_bytes("a.u16", u16, sizeof u16);
  write_bytes("b.u32", u32, sizeof u32);
  // .npy, version 1, int64, shape (4,): header padded so that the data start is 64-byte aligned.
  char header[118];
  memset(header, ' ', sizeof header);
  const char *dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (4,), }";
  memcpy(header, dict, strlen(dict));
  header[sizeof header - 1] = '\n';
  unsigned char npy[10 + sizeof header + 32];
  memcpy(npy, "\x93NUMPY\x01\x00", 8);
  npy[8] = sizeof header;
  npy[9] = 0;
  memcpy(npy + 10, header, sizeof header);
  int64_t values[4] = {3, 9, 4, 65535};
  memcpy(npy + 10 + sizeof header, values, sizeof values);
  write_bytes("c.npy", npy, sizeof npy);

  char a[512], b[512], c[512], out1[512], out2[512], out3[512];
  snprintf(a, sizeof a, "%s/a.u16", dir);
  snprintf(b, sizeof b, "%s/b.u32", dir);
  snprintf(c, sizeof c, "%s/c.npy", dir);
  snprintf(out1, sizeof out1, "%s/o1", dir);
  snprintf(out2, sizeof out2, "%s/o2", dir);
  snprintf(out3, sizeof out3, "%s/o3", dir);
  const char *in_a[1] = {a}, *in_b[1] = {b}, *in_c[1] = {c};

  PrepConfig config = {.output = out1, .format = PREP_FORMAT_U16, .vocab_size = 100000, .tokenizer = "test",
                       .shard_tokens = 4, .end_of_document = 9, .inputs = in_a, .input_count = 1};
  PrepTotals totals = prep_write_dataset(&config);
  cr_assert_eq(totals.tokens, 6);
  cr_assert_eq(totals.shards, 2);
  Dataset dataset;
  dataset_open(&dataset, out1);
  // Documents [5 6 9] [7 9] [8]; the shard boundary after 4 tokens also starts one.
  uint64_t starts[4] = {0, 3, 4, 5};
  cr_assert_eq(dataset.document_count, 4);
  for (int d = 0; d < 4; d++) cr_assert_eq(dataset.document_start[d], starts[d]);
  uint32_t tokens[8];
  dataset_read(&dataset, 0, 6, tokens, NULL);
  for (int i = 0; i < 6; i++) cr_assert_eq(tokens[i], u16[i]);
  cr_assert_str_eq(dataset.tokenizer, "test");
  dataset_close(&dataset);

  config = (PrepConfig){.output = out2, .format = PREP_FORMAT_U32, .vocab_size = 100000, .shard_tokens = 100,
                        .end_of_document = -1, .inputs = in_b, .input_count = 1};
  prep_write_dataset(&config);
  dataset_open(&dataset, out2);
  dataset_read(&dataset, 0, 3, tokens, NULL);
  for (int i = 0; i < 3; i++) cr_assert_eq(tokens[i], u32[i]);
  cr_assert_eq(dataset.document_count, 1);
  cr_assert_str_eq(dataset.tokenizer, "pretokenized");
  dataset_close(&dataset);

  config = (PrepConfig){.output = out3, .format = PREP_FORMAT_NPY, .vocab_size = 65536, .shard_tokens = 100,
                        .end_of_document = 9, .inputs = in_c, .input_count = 1};
  prep_write_dataset(&config);
  DatasetSummary summary = dataset_inspect(out3);
  cr_assert_eq(summary.tokens, 4);
  cr_assert_eq(summary.documents, 2);
  dataset_open(&dataset, out3);
  dataset_read(&dataset, 0, 4, tokens, NULL);
  for (int i = 0; i < 4; i++) cr_assert_eq(tokens[i], (uint32_t)values[i]);
  dataset_close(&dataset);
}

Test(shard, force_replaces_old_shards) {
  make_dir();
  write_bytes("a.txt", "hello", 5);
  char input[512], output[512];
  snprintf(input, sizeof input, "%s/a.txt", dir);
  snprintf(output, sizeof output, "%s/out", dir);
  const char *inputs[1] = {input};
  PrepConfig config = {.output = output, .shard_tokens = 2, .end_of_document = -1, .inputs = inputs,
                       .input_count = 1};
  cr_assert_eq(prep_write_dataset(&config).shards, 3);
  config.shard_tokens = 100;
  config.force = 1;
  cr_assert_eq(prep_write_dataset(&config).shards, 1);
  cr_assert_eq(count_files_with_suffix(output, ".h5"), 1, "old shards must be gone");
}

// MQAR: answers (mask 1) are the values paired with the queried key earlier in the same example, and
// loader windows of stride seq_len line up with examples.
Test(shard, mqar_layout_and_window_alignment) {
  make_dir();
  char output[512];
  snprintf(output, sizeof output, "%s/mqar", dir);
  const int T = 40, N = 30, pairs = 6, queries = 4;
  SynthConfig config = {.task = SYNTH_TASK_MQAR, .output = output, .seq_len = T, .examples = N, .seed = 7,
                        .vocab_size = 64, .pairs = pairs, .queries = queries, .shard_tokens = 7 * T};
  PrepTotals totals = synth_write_dataset(&config);
  cr_assert_eq(totals.tokens, (uint64_t)N * T + 1);
  cr_assert_eq(totals.shards, 5);
  Dataset dataset;
  dataset_open(&dataset, output);
  cr_assert_eq(dataset.document_count, (uint64_t)N);
  uint32_t *tokens = malloc(dataset.token_count * sizeof(uint32_t));
  uint8_t *mask = malloc(dataset.token_count);
  dataset_read(&dataset, 0, dataset.token_count, tokens, mask);
  for (int e = 0; e < N; e++) {
    const uint32_t *x = tokens + e * T;
    const uint8_t *m = mask + e * T;
    cr_assert_eq(dataset.document_start[e], (uint64_t)e * T);
    int answers = 0;
    for (int t = 0; t < T; t++) {
      if (!m[t]) continue;
      answers++;
      cr_assert(t >= 2 * pairs && t % 2 == 1, "answers only in the query part");
      int found = 0;
      for (int p = 0; p < pairs; p++) found |= x[2 * p] == x[t - 1] && x[2 * p + 1] == x[t];
      cr_assert(found, "example %d position %d answers a key it was not paired with", e, t);
      cr_assert_geq(x[t], 1 + (64 - 1) / 2, "values come from the value range");
    }
    cr_assert_eq(answers, queries);
    for (int t = 2 * (pairs + queries); t < T; t++) cr_assert_eq(x[t], 0u, "pad");
  }
  free(tokens);
  free(mask);
  dataset_close(&dataset);

  LoaderConfig loader_config = {.path = output, .seq_len = T, .global_batch = 2, .dp_size = 1, .seed = 1,
                                .val_fraction = 0.1};
  Loader *loader = loader_open(&loader_config, NULL);
  cr_assert_eq(loader_train_windows(loader) + loader_val_windows(loader), (uint64_t)N, "one window per example");
  Batch batch;
  loader_alloc_batch(loader, &batch);
  for (int step = 0; step < 10; step++) {
    loader_next_batch(loader, &batch);
    for (int b = 0; b < batch.B; b++) {
      const unsigned char *d = batch.doc_start + b * T;
      const int *y = batch.targets + b * T;
      cr_assert_eq(d[0], 1);
      for (int t = 1; t < T; t++) cr_assert_eq(d[t], 0, "an example is one document");
      cr_assert_eq(y[T - 1], -1, "the next example's first token is not a target");
      int answers = 0;
      for (int t = 0; t < T; t++) answers += y[t] >= 0;
      cr_assert_eq(answers, queries);
    }
  }
  loader_free_batch(&batch);
  loader_close(loader);
}

Test(shard, palindrome_layout) {
  make_dir();
  char output[512];
  snprintf(output, sizeof output, "%s/pal", dir);
  const int T = 16, L = 5;
  SynthConfig config = {.task = SYNTH_TASK_PALINDROME, .output = output, .seq_len = T, .examples = 9,
                        .seed = 3, .vocab_size = 10, .length = L, .shard_tokens = 1000};
  synth_write_dataset(&config);
  DatasetSummary summary = dataset_inspect(output);
  cr_assert(summary.has_loss_mask);
  cr_assert_eq(summary.documents, 9);
  Dataset dataset;
  dataset_open(&dataset, output);
  uint32_t tokens[16 * 9 + 1];
  uint8_t mask[16 * 9 + 1];
  dataset_read(&dataset, 0, dataset.token_count, tokens, mask);
  for (int e = 0; e < 9; e++) {
    const uint32_t *x = tokens + e * T;
    const uint8_t *m = mask + e * T;
    cr_assert_eq(x[L], 1u, "separator");
    for (int i = 0; i < L; i++) {
      cr_assert_geq(x[i], 2u);
      cr_assert_eq(x[L + 1 + i], x[L - 1 - i], "reversed copy");
      cr_assert_eq(m[i], 0);
      cr_assert_eq(m[L + 1 + i], 1);
    }
    for (int t = 2 * L + 1; t < T; t++) cr_assert(x[t] == 0 && m[t] == 0, "pad");
  }
  dataset_close(&dataset);
}
