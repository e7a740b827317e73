// Bad data is a user error (exit code 2, one sentence naming the input): each case below. Broken
// shards are written with raw HDF5 calls so that every missing or wrong piece can be produced.
#include <criterion/criterion.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "data/loader.h"
#include "data/prep.h"
#include "tests/testing.h"

static char dir[256];

static void make_dir(void) {
  test_make_dir(dir, sizeof dir, "klt_data_errors");
}

typedef struct {
  hid_t token_type;            // file type of `tokens`; 0 leaves the dataset out
  int without_doc_offsets;
  const char *without_attribute;
  int format_version;
  uint64_t vocab_size;
  uint64_t token_count;        // tokens written (all 1 except bad_token)
  uint64_t declared_count;     // token_count attribute
  uint32_t bad_token;          // when nonzero, written at position token_count / 2
} ShardRecipe;

static ShardRecipe good_recipe(uint64_t tokens) {
  return (ShardRecipe){.token_type = H5T_STD_U32LE, .format_version = 1, .vocab_size = 257,
                       .token_count = tokens, .declared_count = tokens};
}

static void write_attribute(hid_t file, const char *name, hid_t type, const void *value, const ShardRecipe *r) {
  if (r->without_attribute && strcmp(r->without_attribute, name) == 0) return;
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t attribute = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
  cr_assert_geq(H5Awrite(attribute, type, value), 0);
  H5Aclose(attribute);
  H5Sclose(space);
}

static void write_shard(const char *name, ShardRecipe r) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  cr_assert_geq(file, 0);
  if (r.token_type) {
    uint32_t *tokens = malloc((r.token_count + 1) * sizeof(uint32_t));
    for (uint64_t i = 0; i < r.token_count; i++) tokens[i] = 1;
    if (r.bad_token) tokens[r.token_count / 2] = r.bad_token;
    hsize_t dims[1] = {r.token_count};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t dataset = H5Dcreate2(file, "tokens", r.token_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (r.token_count) cr_assert_geq(H5Dwrite(dataset, H5T_NATIVE_UINT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, tokens), 0);
    H5Dclose(dataset);
    H5Sclose(space);
    free(tokens);
  }
  if (!r.without_doc_offsets) {
    uint64_t offsets[1] = {0};
    hsize_t dims[1] = {1};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t dataset = H5Dcreate2(file, "doc_offsets", H5T_STD_U64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(dataset, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, offsets);
    H5Dclose(dataset);
    H5Sclose(space);
  }
  int version = r.format_version;
  write_attribute(file, "format_version", H5T_NATIVE_INT, &version, &r);
  write_attribute(file, "vocab_size", H5T_NATIVE_UINT64, &r.vocab_size, &r);
  write_attribute(file, "token_count", H5T_NATIVE_UINT64, &r.declared_count, &r);
  hid_t string_type = H5Tcopy(H5T_C_S1);
  H5Tset_size(string_type, 5);
  write_attribute(file, "tokenizer", string_type, "byte", &r);
  H5Tclose(string_type);
  H5Fclose(file);
}

static Loader *open_loader(int seq_len) {
  LoaderConfig config = {.path = dir, .seq_len = seq_len, .global_batch = 2, .dp_rank = 0, .dp_size = 1,
                         .seed = 1, .val_fraction = 0.05, .vocab_size = 257};
  return loader_open(&config, NULL);
}

Test(data_errors, good_shard_opens) {  // the recipe itself is sound, so the failures below are real
  make_dir();
  write_shard("a.h5", good_recipe(1000));
  Loader *loader = open_loader(16);
  Batch batch;
  loader_alloc_batch(loader, &batch);
  loader_next_batch(loader, &batch);
  cr_assert_eq(batch.inputs[0], 1);
  loader_free_batch(&batch);
  loader_close(loader);
  cr_assert_eq(dataset_inspect(dir).tokens, 1000);
}

Test(data_errors, missing_directory, .exit_code = 2) {
  make_dir();
  LoaderConfig config = {.path = "/nonexistent/klt/data", .seq_len = 4, .global_batch = 1, .dp_size = 1};
  loader_open(&config, NULL);
}

Test(data_errors, directory_without_shards, .exit_code = 2) {
  make_dir();
  char path[512];
  snprintf(path, sizeof path, "%s/notes.txt", dir);
  FILE *f = fopen(path, "w");
  fputs("not a shard\n", f);
  fclose(f);
  open_loader(4);
}

Test(data_errors, file_that_is_not_hdf5, .exit_code = 2) {
  make_dir();
  write_shard("a.h5", good_recipe(100));
  char path[512];
  snprintf(path, sizeof path, "%s/b.h5", dir);
  FILE *f = fopen(path, "w");
  fputs("this is not an HDF5 file\n", f);
  fclose(f);
  open_loader(4);
}

Test(data_errors, shard_missing_tokens_dataset, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.token_type = 0;
  write_shard("a.h5", r);
  open_loader(4);
}

Test(data_errors, shard_missing_doc_offsets, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.without_doc_offsets = 1;
  write_shard("a.h5", r);
  dataset_inspect(dir);
}

Test(data_errors, shard_missing_attribute, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.without_attribute = "tokenizer";
  write_shard("a.h5", r);
  open_loader(4);
}

Test(data_errors, shard_missing_vocab_size, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.without_attribute = "vocab_size";
  write_shard("a.h5", r);
  dataset_inspect(dir);
}

Test(data_errors, wrong_token_dtype, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.token_type = H5T_STD_I64LE;
  write_shard("a.h5", r);
  open_loader(4);
}

Test(data_errors, token_count_attribute_mismatch, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.declared_count = 99;
  write_shard("a.h5", r);
  dataset_inspect(dir);
}

// The loader finds it while reading (in its read-ahead thread), naming shard and offset.
Test(data_errors, token_id_not_below_vocab_in_loader, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(40);
  r.bad_token = 300;
  write_shard("a.h5", r);
  // One window, every token but the last, no validation split.
  LoaderConfig config = {.path = dir, .seq_len = 38, .global_batch = 1, .dp_size = 1, .vocab_size = 257};
  Loader *loader = loader_open(&config, NULL);
  Batch batch;
  loader_alloc_batch(loader, &batch);
  loader_next_batch(loader, &batch);
}

Test(data_errors, token_id_not_below_vocab_in_inspect, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(70000);
  r.bad_token = 257;
  write_shard("a.h5", r);
  dataset_inspect(dir);
}

Test(data_errors, dataset_vocab_larger_than_model, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.vocab_size = 1000;
  write_shard("a.h5", r);
  open_loader(4);
}

Test(data_errors, empty_dataset, .exit_code = 2) {
  make_dir();
  write_shard("a.h5", good_recipe(0));
  open_loader(4);
}

Test(data_errors, seq_len_longer_than_data, .exit_code = 2) {
  make_dir();
  write_shard("a.h5", good_recipe(100));
  open_loader(100);
}

Test(data_errors, format_version_mismatch, .exit_code = 2) {
  make_dir();
  ShardRecipe r = good_recipe(100);
  r.format_version = 2;
  write_shard("a.h5", r);
  open_loader(4);
}

Test(data_errors, vocab_differs_between_shards, .exit_code = 2) {
  make_dir();
  write_shard("a.h5", good_recipe(100));
  ShardRecipe r = good_recipe(100);
  r.vocab_size = 200;
  write_shard("b.h5", r);
  dataset_inspect(dir);
}

Test(data_errors, global_batch_not_divisible_by_dp, .exit_code = 2) {
  make_dir();
  write_shard("a.h5", good_recipe(1000));
  LoaderConfig config = {.path = dir, .seq_len = 4, .global_batch = 6, .dp_rank = 0, .dp_size = 4};
  loader_open(&config, NULL);
}

Test(data_errors, unknown_tokenizer_in_prep, .exit_code = 2) {
  make_dir();
  char input[512], output[512];
  snprintf(input, sizeof input, "%s/a.txt", dir);
  snprintf(output, sizeof output, "%s/out", dir);
  FILE *f = fopen(input, "w");
  fputs("text", f);
  fclose(f);
  const char *inputs[1] = {input};
  PrepConfig config = {.output = output, .format = PREP_FORMAT_TEXT, .tokenizer = "gpt2", .shard_tokens = 100,
                       .end_of_document = -1, .inputs = inputs, .input_count = 1};
  prep_write_dataset(&config);
}

Test(data_errors, prep_refuses_non_empty_output, .exit_code = 2) {
  make_dir();
  char input[512];
  snprintf(input, sizeof input, "%s/a.txt", dir);
  FILE *f = fopen(input, "w");
  fputs("text", f);
  fclose(f);
  const char *inputs[1] = {input};
  PrepConfig config = {.output = dir, .format = PREP_FORMAT_TEXT, .shard_tokens = 100, .end_of_document = -1,
                       .inputs = inputs, .input_count = 1};
  prep_write_dataset(&config);
}

Test(data_errors, pretokenized_token_outside_vocab, .exit_code = 2) {
  make_dir();
  char input[512], output[512];
  snprintf(input, sizeof input, "%s/a.u16", dir);
  snprintf(output, sizeof output, "%s/out", dir);
  uint16_t tokens[3] = {1, 2, 500};
  FILE *f = fopen(input, "wb");
  fwrite(tokens, sizeof tokens, 1, f);
  fclose(f);
  const char *inputs[1] = {input};
  PrepConfig config = {.output = output, .format = PREP_FORMAT_U16, .vocab_size = 100, .shard_tokens = 100,
                       .end_of_document = -1, .inputs = inputs, .input_count = 1};
  prep_write_dataset(&config);
}

// The program: bad arguments and bad data exit with 2 and say what is wrong in one line.
static int run_program(const char *arguments, char *output, size_t capacity) {
  const char *build = getenv("KLT_BUILD_DIR");
  cr_assert_not_null(build, "KLT_BUILD_DIR must be set (ctest sets it)");
  char command[1024];
  snprintf(command, sizeof command, "%s/klt-data %s 2>&1", build, arguments);
  FILE *pipe = popen(command, "r");
  cr_assert_not_null(pipe);
  size_t used = fread(output, 1, capacity - 1, pipe);
  output[used] = 0;
  int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

Test(data_errors, program_reports_usage_and_data_errors) {
  make_dir();
  static char output[8192];
  cr_assert_eq(run_program("", output, sizeof output), 2);
  cr_assert_eq(run_program("frobnicate", output, sizeof output), 2);
  cr_assert_eq(run_program("prep --no-such-option x", output, sizeof output), 2);
  cr_assert_eq(run_program("synth --task mqar --output /tmp/x --seq-len abc --examples 3", output, sizeof output), 2);
  cr_assert_eq(run_program("synth --task stack --output /tmp/x --seq-len 8 --examples 3", output, sizeof output), 2);
  cr_assert_eq(run_program("--help", output, sizeof output), 0);
  cr_assert_eq(run_program("prep --help", output, sizeof output), 0);
  cr_assert_not_null(strstr(output, "--shard-tokens"));

  ShardRecipe r = good_recipe(100);
  r.format_version = 7;
  write_shard("shard_00000.h5", r);
  char arguments[400];
  snprintf(arguments, sizeof arguments, "inspect %s", dir);
  cr_assert_eq(run_program(arguments, output, sizeof output), 2);
  cr_assert_not_null(strstr(output, "shard_00000.h5"), "the message names the shard: %s", output);
  cr_assert_not_null(strstr(output, "format_version 7"), "%s", output);
  cr_assert_null(strstr(output, "HDF5-DIAG"), "HDF5's own error stack is silenced: %s", output);
}
