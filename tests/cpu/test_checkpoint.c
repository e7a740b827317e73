// Checkpoints: bitwise round trip of weights, optimizer state and metadata; retention, `latest` and
// interrupted saves; loading a checkpoint whose tensors are split over several rank files; and every
// bad-input case as a user error (exit code 2). Broken checkpoints are made by editing saved files.
#include <criterion/criterion.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/testing.h"
#include "train/checkpoint.h"

static char dir[256];

static void make_dir(void) {
  test_make_dir(dir, sizeof dir, "klt_checkpoint");
}

// A small registry with tensors of 1 to 4 dimensions and every optimizer group; `hidden` changes the
// model's shape, `extra` adds a tensor.
static void registry_make(ParamRegistry *r, int64_t hidden, bool extra, uint64_t seed) {
  params_init(r);
  params_add(r, "model.embed_tokens.weight", 7, hidden, 0, 0, GROUP_ADAMW, false, INIT_NORMAL, true);
  params_add(r, "model.layers.0.input_layernorm.weight", hidden, 0, 0, 0, GROUP_ADAMW, false, INIT_ONES, true);
  params_add(r, "model.layers.0.mlp.experts.w1", 3, 4, hidden, 0, GROUP_MUON, true, INIT_NORMAL, false);
  params_add(r, "model.layers.0.self_attn.q_conv1d.weight", 5, 1, 1, 4, GROUP_ADAMW, false, INIT_CONV, true);
  params_add(r, "model.layers.0.mlp.gate.e_score_correction_bias", 3, 0, 0, 0, GROUP_NONE, false, INIT_ZEROS, true);
  if (extra) params_add(r, "model.norm.weight", hidden, 0, 0, 0, GROUP_ADAMW, false, INIT_ONES, true);
  params_allocate(r);
  test_fill_normal(r->values, r->total, 1.0, &seed);
}

typedef struct {
  ParamRegistry params;
  real *state1, *state2;  // (params.total)
  CheckpointMeta meta;
} Run;

static Run run_make(uint64_t seed) {
  Run run;
  registry_make(&run.params, 6, false, seed);
  run.state1 = test_alloc(run.params.total);
  run.state2 = test_alloc(run.params.total);
  test_fill_normal(run.state1, run.params.total, 0.1, &seed);
  test_fill_uniform(run.state2, run.params.total, 0, 0.01, &seed);
  run.meta = (CheckpointMeta){.step = 10, .tokens = 40960.5, .loader = {.stage = 1, .consumed_samples = 320,
                              .seed = 0xFEEDFACECAFEBEEFull}, .optimizer_step = 9};
  snprintf(run.meta.model_name, sizeof run.meta.model_name, "tiny-test");
  return run;
}

static void run_free(Run *run) {
  params_free(&run->params);
  free(run->state1);
  free(run->state2);
}

static const char *config_text = "[model]\nname = tiny-test\nhidden_size = 6\n";

static void save(Run *run, long step, int keep) {
  run->meta.step = step;
  double seconds =
      checkpoint_save(dir, &run->meta, &run->params, run->state1, run->state2, NULL, config_text, keep, NULL);
  cr_assert(seconds >= 0);
}

static void step_path(char *out, size_t cap, long step) { snprintf(out, cap, "%s/ckpt/step_%08ld", dir, step); }

static bool exists(const char *path) {
  struct stat info;
  return stat(path, &info) == 0;
}

Test(checkpoint, crc32_check_value) {
  cr_assert_eq(checkpoint_crc32(0, "123456789", 9), 0xCBF43926u);
  cr_assert_eq(checkpoint_crc32(0, "The quick brown fox jumps over the lazy dog", 43), 0x414FA339u);
  // Continuing a CRC over pieces gives the CRC of the whole.
  cr_assert_eq(checkpoint_crc32(checkpoint_crc32(0, "1234", 4), "56789", 5), 0xCBF43926u);
}

Test(checkpoint, round_trip_is_bitwise) {
  make_dir();
  Run saved = run_make(1), loaded = run_make(2);
  save(&saved, 10, 3);
  char path[512];
  cr_assert(checkpoint_find_latest(dir, path, sizeof path));
  char expected[512];
  step_path(expected, sizeof expected, 10);
  cr_assert_str_eq(path, expected);
  CheckpointMeta meta;
  memset(&meta, 0xAB, sizeof meta);
  checkpoint_load(path, &meta, &loaded.params, loaded.state1, loaded.state2, NULL, false);
  size_t bytes = saved.params.total * sizeof(real);
  cr_assert_eq(memcmp(loaded.params.values, saved.params.values, bytes), 0, "weights differ");
  cr_assert_eq(memcmp(loaded.state1, saved.state1, bytes), 0, "state1 differs");
  cr_assert_eq(memcmp(loaded.state2, saved.state2, bytes), 0, "state2 differs");
  cr_assert_eq(meta.step, 10);
  cr_assert_eq(meta.tokens, 40960.5);
  cr_assert_eq(meta.loader.stage, 1);
  cr_assert_eq(meta.loader.consumed_samples, 320);
  cr_assert_eq(meta.loader.seed, 0xFEEDFACECAFEBEEFull);
  cr_assert_eq(meta.optimizer_step, 9);
  cr_assert_str_eq(meta.model_name, "tiny-test");
  char *config = checkpoint_read_config(path);
  cr_assert_str_eq(config, config_text);
  free(config);
  char problem[1024];
  cr_assert(checkpoint_check(path, true, NULL, problem, sizeof problem), "%s", problem);
  run_free(&saved);
  run_free(&loaded);
}

Test(checkpoint, weights_only_leaves_optimizer_state_alone) {
  make_dir();
  Run saved = run_make(1), loaded = run_make(2);
  save(&saved, 4, 0);
  real *state1_before = test_copy(loaded.state1, loaded.params.total);
  char path[512];
  step_path(path, sizeof path, 4);
  CheckpointMeta meta;
  checkpoint_load(path, &meta, &loaded.params, NULL, NULL, NULL, false);
  cr_assert_eq(memcmp(loaded.params.values, saved.params.values, saved.params.total * sizeof(real)), 0);
  cr_assert_eq(memcmp(loaded.state1, state1_before, saved.params.total * sizeof(real)), 0);
  free(state1_before);
  run_free(&saved);
  run_free(&loaded);
}

Test(checkpoint, retention_keeps_the_newest_k_and_latest_moves) {
  make_dir();
  Run run = run_make(1);
  for (long step = 1; step <= 5; step++) {
    run.params.values[0] = (real)step;
    save(&run, step, 2);
  }
  char path[512], link[64];
  for (long step = 1; step <= 5; step++) {
    step_path(path, sizeof path, step);
    cr_assert_eq(exists(path), step >= 4, "step %ld %s", step, step >= 4 ? "was deleted" : "was kept");
  }
  snprintf(path, sizeof path, "%s/ckpt/latest", dir);
  ssize_t n = readlink(path, link, sizeof link - 1);
  cr_assert_gt(n, 0);
  link[n] = '\0';
  cr_assert_str_eq(link, "step_00000005");
  cr_assert(checkpoint_find_latest(dir, path, sizeof path));
  Run loaded = run_make(2);
  CheckpointMeta meta;
  checkpoint_load(path, &meta, &loaded.params, NULL, NULL, NULL, false);
  cr_assert_eq(meta.step, 5);
  cr_assert_eq(loaded.params.values[0], 5);
  run_free(&run);
  run_free(&loaded);
}

// A kill -9 during a save leaves rank files without a manifest: that directory is skipped, with or
// without `latest`.
Test(checkpoint, interrupted_save_is_skipped) {
  make_dir();
  Run run = run_make(1);
  save(&run, 20, 0);
  char previous[512], interrupted[512], command[1600], path[512];
  step_path(previous, sizeof previous, 20);
  step_path(interrupted, sizeof interrupted, 30);
  snprintf(command, sizeof command, "mkdir %s && cp %s/rank_00000.h5 %s/", interrupted, previous, interrupted);
  cr_assert_eq(system(command), 0);
  cr_assert(checkpoint_find_latest(dir, path, sizeof path));
  cr_assert_str_eq(path, previous);
  snprintf(path, sizeof path, "%s/ckpt/latest", dir);
  cr_assert_eq(unlink(path), 0);
  cr_assert(checkpoint_find_latest(dir, path, sizeof path));
  cr_assert_str_eq(path, previous);
  // The next save cleans the dead directory once it is older than the new checkpoint.
  save(&run, 40, 0);
  cr_assert(!exists(interrupted));
  cr_assert(exists(previous));
  run_free(&run);
}

Test(checkpoint, no_checkpoint_yet) {
  make_dir();
  char path[512];
  cr_assert(!checkpoint_find_latest(dir, path, sizeof path));
}

// Resuming from an earlier checkpoint and saving its successor's step again replaces that one whole;
// retention leaves checkpoints of higher steps alone.
Test(checkpoint, saving_an_existing_step_replaces_it) {
  make_dir();
  Run run = run_make(1);
  for (long step = 1; step <= 3; step++) save(&run, step, 1);
  char path[512];
  step_path(path, sizeof path, 3);
  cr_assert(exists(path));
  run.params.values[1] = 123;
  save(&run, 2, 1);
  cr_assert(checkpoint_find_latest(dir, path, sizeof path));
  char expected[512];
  step_path(expected, sizeof expected, 2);
  cr_assert_str_eq(path, expected);
  Run loaded = run_make(2);
  CheckpointMeta meta;
  checkpoint_load(path, &meta, &loaded.params, loaded.state1, loaded.state2, NULL, false);
  cr_assert_eq(loaded.params.values[1], 123);
  step_path(path, sizeof path, 3);
  cr_assert(exists(path));
  run_free(&run);
  run_free(&loaded);
}

// ---------------------------------------------------------------------------------------------
// A checkpoint split over two rank files (as a sharded save on two ranks writes it) loads the same.

static void write_int64s(hid_t object, const char *name, const int64_t *values, int count) {
  hsize_t dims[1] = {(hsize_t)count};
  hid_t space = count ? H5Screate_simple(1, dims, NULL) : H5Screate(H5S_SCALAR);
  hid_t attribute = H5Acreate2(object, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
  cr_assert_geq(H5Awrite(attribute, H5T_NATIVE_INT64, values), 0);
  H5Aclose(attribute);
  H5Sclose(space);
}

// Writes rows [begin, end) of tensor as dataset `name`, in float32 (as klt-train stores values) or in
// float64 (as the tests' build does).
static void write_slice(hid_t file, const char *name, const ParamInfo *p, const real *tensor, int64_t begin,
                        int64_t end, bool as_float32) {
  hsize_t dims[4];
  int64_t offset[4] = {begin, 0, 0, 0};
  size_t per_row = 1;
  dims[0] = (hsize_t)(end - begin);
  for (int d = 1; d < p->ndim; d++) {
    dims[d] = (hsize_t)p->shape[d];
    per_row *= (size_t)p->shape[d];
  }
  const real *slice = tensor + (size_t)begin * per_row;
  size_t count = (size_t)(end - begin) * per_row;
  float *narrow = malloc(count * sizeof(float));
  for (size_t i = 0; i < count; i++) narrow[i] = (float)slice[i];
  const void *data = as_float32 ? (const void *)narrow : (const void *)slice;
  hid_t space = H5Screate_simple(p->ndim, dims, NULL);
  hid_t dataset = H5Dcreate2(file, name, as_float32 ? H5T_IEEE_F32LE : H5T_IEEE_F64LE, space, H5P_DEFAULT,
                             H5P_DEFAULT, H5P_DEFAULT);
  cr_assert_geq(H5Dwrite(dataset, as_float32 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                         data), 0);
  write_int64s(dataset, "global_shape", p->shape, p->ndim);
  write_int64s(dataset, "offset", offset, p->ndim);
  uint32_t checksum = checkpoint_crc32(0, data, count * (as_float32 ? sizeof(float) : sizeof(real)));
  free(narrow);
  hid_t scalar = H5Screate(H5S_SCALAR);
  hid_t attribute = H5Acreate2(dataset, "checksum", H5T_STD_U32LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
  cr_assert_geq(H5Awrite(attribute, H5T_NATIVE_UINT32, &checksum), 0);
  H5Aclose(attribute);
  H5Sclose(scalar);
  H5Dclose(dataset);
  H5Sclose(space);
}

static void file_checksum(const char *path, uint64_t *bytes, uint32_t *crc) {
  FILE *file = fopen(path, "rb");
  cr_assert_not_null(file);
  unsigned char buffer[65536];
  size_t got;
  *bytes = 0;
  *crc = 0;
  while ((got = fread(buffer, 1, sizeof buffer, file)) > 0) {
    *crc = checkpoint_crc32(*crc, buffer, got);
    *bytes += got;
  }
  fclose(file);
}

static void rewrite_list(hid_t manifest, const char *name, hid_t file_type, hid_t memory_type, const void *data) {
  cr_assert_geq(H5Ldelete(manifest, name, H5P_DEFAULT), 0);
  hsize_t dims[1] = {2};
  hid_t space = H5Screate_simple(1, dims, NULL);
  hid_t dataset = H5Dcreate2(manifest, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  cr_assert_geq(H5Dwrite(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), 0);
  H5Dclose(dataset);
  H5Sclose(space);
}

// Rewrites checkpoint `path` of `run` as two rank files: rank 0 keeps the first rows of every tensor
// with more than one row, rank 1 holds the rest (in float32 with second_as_float32).
static void split_over_two_ranks(const char *path, const Run *run, bool second_as_float32) {
  char rank0[600], rank1[600], manifest_path[600];
  snprintf(rank0, sizeof rank0, "%s/rank_00000.h5", path);
  snprintf(rank1, sizeof rank1, "%s/rank_00001.h5", path);
  snprintf(manifest_path, sizeof manifest_path, "%s/manifest.h5", path);
  hid_t first = H5Fopen(rank0, H5F_ACC_RDWR, H5P_DEFAULT);
  hid_t second = H5Fcreate(rank1, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  cr_assert(first >= 0 && second >= 0);
  int64_t step = run->meta.step;
  write_int64s(second, "step", &step, 0);
  H5Gclose(H5Gcreate2(second, "optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  H5Gclose(H5Gcreate2(second, "optimizer/state1", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  H5Gclose(H5Gcreate2(second, "optimizer/state2", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  const char *prefixes[3] = {"", "optimizer/state1/", "optimizer/state2/"};
  const real *arenas[3] = {run->params.values, run->state1, run->state2};
  for (int kind = 0; kind < 3; kind++)
    for (int i = 0; i < run->params.count; i++) {
      const ParamInfo *p = &run->params.params[i];
      if (p->shape[0] < 2) continue;
      char name[200];
      snprintf(name, sizeof name, "%s%s", prefixes[kind], p->name);
      int64_t split = p->shape[0] / 2;
      cr_assert_geq(H5Ldelete(first, name, H5P_DEFAULT), 0);
      write_slice(first, name, p, arenas[kind] + p->offset, 0, split, false);
      write_slice(second, name, p, arenas[kind] + p->offset, split, p->shape[0], second_as_float32);
    }
  H5Fclose(first);
  H5Fclose(second);

  char names[2][32] = {"rank_00000.h5", "rank_00001.h5"};
  uint64_t bytes[2];
  uint32_t crcs[2];
  file_checksum(rank0, &bytes[0], &crcs[0]);
  file_checksum(rank1, &bytes[1], &crcs[1]);
  hid_t manifest = H5Fopen(manifest_path, H5F_ACC_RDWR, H5P_DEFAULT);
  cr_assert_geq(manifest, 0);
  int world_size = 2;
  hid_t attribute = H5Aopen(manifest, "world_size", H5P_DEFAULT);
  cr_assert_geq(H5Awrite(attribute, H5T_NATIVE_INT, &world_size), 0);
  H5Aclose(attribute);
  hid_t name_type = H5Tcopy(H5T_C_S1);
  H5Tset_size(name_type, 32);
  rewrite_list(manifest, "rank_files", name_type, name_type, names);
  rewrite_list(manifest, "rank_file_bytes", H5T_STD_U64LE, H5T_NATIVE_UINT64, bytes);
  rewrite_list(manifest, "rank_file_crc32", H5T_STD_U32LE, H5T_NATIVE_UINT32, crcs);
  H5Tclose(name_type);
  H5Fclose(manifest);
}

Test(checkpoint, slices_over_two_rank_files_load_the_same) {
  make_dir();
  Run saved = run_make(1), loaded = run_make(2);
  save(&saved, 7, 0);
  char path[512];
  step_path(path, sizeof path, 7);
  split_over_two_ranks(path, &saved, false);
  char problem[1024];
  cr_assert(checkpoint_check(path, true, NULL, problem, sizeof problem), "%s", problem);
  CheckpointMeta meta;
  checkpoint_load(path, &meta, &loaded.params, loaded.state1, loaded.state2, NULL, false);
  size_t bytes = saved.params.total * sizeof(real);
  cr_assert_eq(memcmp(loaded.params.values, saved.params.values, bytes), 0);
  cr_assert_eq(memcmp(loaded.state1, saved.state1, bytes), 0);
  cr_assert_eq(memcmp(loaded.state2, saved.state2, bytes), 0);
  run_free(&saved);
  run_free(&loaded);
}

// A float32 file (as klt-train writes) loads into the float64 build, each value converted exactly.
Test(checkpoint, float32_slices_load_converted) {
  make_dir();
  Run saved = run_make(1), loaded = run_make(2);
  save(&saved, 7, 0);
  char path[512];
  step_path(path, sizeof path, 7);
  split_over_two_ranks(path, &saved, true);
  CheckpointMeta meta;
  checkpoint_load(path, &meta, &loaded.params, loaded.state1, loaded.state2, NULL, false);
  const real *saved_arenas[3] = {saved.params.values, saved.state1, saved.state2};
  const real *loaded_arenas[3] = {loaded.params.values, loaded.state1, loaded.state2};
  int narrowed = 0;
  for (int kind = 0; kind < 3; kind++)
    for (int i = 0; i < saved.params.count; i++) {
      const ParamInfo *p = &saved.params.params[i];
      size_t first_narrow = p->shape[0] < 2 ? p->numel : (size_t)(p->shape[0] / 2) * (p->numel / (size_t)p->shape[0]);
      for (size_t j = 0; j < p->numel; j++) {
        real x = saved_arenas[kind][p->offset + j];
        real expected = j < first_narrow ? x : (real)(float)x;
        cr_assert_eq(loaded_arenas[kind][p->offset + j], expected, "%s element %zu", p->name, j);
        narrowed += j >= first_narrow && expected != x;
      }
    }
  cr_assert_gt(narrowed, 0, "the float32 half lost no precision, so the test shows nothing");
  run_free(&saved);
  run_free(&loaded);
}

// ---------------------------------------------------------------------------------------------
// Bad input: each a user error

// A saved checkpoint at step 5 of a fresh run; its path in `path`.
static Run saved_checkpoint(char *path, size_t cap) {
  make_dir();
  Run run = run_make(1);
  save(&run, 5, 0);
  step_path(path, cap, 5);
  return run;
}

static void load_into_fresh(const char *path, bool extra, int64_t hidden) {
  ParamRegistry params;
  registry_make(&params, hidden, extra, 3);
  real *state1 = test_alloc(params.total), *state2 = test_alloc(params.total);
  CheckpointMeta meta;
  checkpoint_load(path, &meta, &params, state1, state2, NULL, false);
}

Test(checkpoint, missing_manifest, .exit_code = 2) {
  char path[512], manifest[600];
  saved_checkpoint(path, sizeof path);
  snprintf(manifest, sizeof manifest, "%s/manifest.h5", path);
  cr_assert_eq(unlink(manifest), 0);
  load_into_fresh(path, false, 6);
}

Test(checkpoint, not_a_checkpoint, .exit_code = 2) {
  make_dir();
  load_into_fresh(dir, false, 6);
}

Test(checkpoint, missing_rank_file, .exit_code = 2) {
  char path[512], rank_file[600];
  saved_checkpoint(path, sizeof path);
  snprintf(rank_file, sizeof rank_file, "%s/rank_00000.h5", path);
  cr_assert_eq(unlink(rank_file), 0);
  load_into_fresh(path, false, 6);
}

Test(checkpoint, truncated_rank_file, .exit_code = 2) {
  char path[512], rank_file[600];
  saved_checkpoint(path, sizeof path);
  snprintf(rank_file, sizeof rank_file, "%s/rank_00000.h5", path);
  struct stat info;
  cr_assert_eq(stat(rank_file, &info), 0);
  cr_assert_eq(truncate(rank_file, info.st_size / 2), 0);
  load_into_fresh(path, false, 6);
}

static void flip_middle_byte(const char *file_path) {
  FILE *file = fopen(file_path, "r+b");
  cr_assert_not_null(file);
  fseek(file, 0, SEEK_END);
  long middle = ftell(file) / 2;
  fseek(file, middle, SEEK_SET);
  int byte = fgetc(file);
  fseek(file, middle, SEEK_SET);
  fputc(byte ^ 0x10, file);
  fclose(file);
}

Test(checkpoint, corrupted_byte_is_detected, .exit_code = 2) {
  char path[512], rank_file[600], problem[1024];
  saved_checkpoint(path, sizeof path);
  snprintf(rank_file, sizeof rank_file, "%s/rank_00000.h5", path);
  flip_middle_byte(rank_file);
  // The check reports it without exiting; the load exits.
  cr_assert(!checkpoint_check(path, true, NULL, problem, sizeof problem));
  cr_assert_not_null(strstr(problem, "rank_00000.h5"), "%s", problem);
  load_into_fresh(path, false, 6);
}

// A flipped value byte is pinned to its dataset: make a checkpoint of one big tensor so that the
// middle of the file is that tensor's data.
Test(checkpoint, corruption_names_the_dataset) {
  make_dir();
  ParamRegistry params;
  params_init(&params);
  params_add(&params, "model.embed_tokens.weight", 512, 64, 0, 0, GROUP_ADAMW, false, INIT_NORMAL, true);
  params_allocate(&params);
  uint64_t seed = 5;
  test_fill_normal(params.values, params.total, 1, &seed);
  CheckpointMeta meta = {.step = 1};
  checkpoint_save(dir, &meta, &params, NULL, NULL, NULL, "", 0, NULL);
  char path[512], rank_file[600], problem[1024];
  step_path(path, sizeof path, 1);
  snprintf(rank_file, sizeof rank_file, "%s/rank_00000.h5", path);
  flip_middle_byte(rank_file);
  cr_assert(!checkpoint_check(path, true, NULL, problem, sizeof problem));
  cr_assert_not_null(strstr(problem, "model.embed_tokens.weight"), "%s", problem);
  cr_assert_not_null(strstr(problem, "checksum"), "%s", problem);
  params_free(&params);
}

Test(checkpoint, another_model_shape, .exit_code = 2) {
  char path[512];
  saved_checkpoint(path, sizeof path);
  load_into_fresh(path, false, 8);
}

Test(checkpoint, model_with_a_tensor_the_checkpoint_lacks, .exit_code = 2) {
  char path[512];
  saved_checkpoint(path, sizeof path);
  load_into_fresh(path, true, 6);
}

Test(checkpoint, checkpoint_with_a_tensor_the_model_lacks, .exit_code = 2) {
  make_dir();
  ParamRegistry params;
  registry_make(&params, 6, true, 1);
  CheckpointMeta meta = {.step = 3};
  checkpoint_save(dir, &meta, &params, NULL, NULL, NULL, "", 0, NULL);
  char path[512];
  step_path(path, sizeof path, 3);
  ParamRegistry smaller;
  registry_make(&smaller, 6, false, 2);
  checkpoint_load(path, &meta, &smaller, NULL, NULL, NULL, false);
}

Test(checkpoint, full_load_of_a_weights_only_checkpoint, .exit_code = 2) {
  make_dir();
  ParamRegistry params;
  registry_make(&params, 6, false, 1);
  CheckpointMeta meta = {.step = 3};
  checkpoint_save(dir, &meta, &params, NULL, NULL, NULL, "", 0, NULL);
  char path[512];
  step_path(path, sizeof path, 3);
  load_into_fresh(path, false, 6);
}

// ---------------------------------------------------------------------------------------------
// klt-ckpt

static int klt_ckpt(const char *command, const char *path) {
  const char *build = getenv("KLT_BUILD_DIR");
  cr_assert_not_null(build, "KLT_BUILD_DIR must be set (ctest sets it)");
  char line[1200];
  snprintf(line, sizeof line, "%s/klt-ckpt %s %s > %s/klt_ckpt.out 2>&1", build, command, path, dir);
  int status = system(line);
  cr_assert(WIFEXITED(status));
  return WEXITSTATUS(status);
}

Test(checkpoint, klt_ckpt_inspect_and_verify) {
  char path[512];
  Run run = saved_checkpoint(path, sizeof path);
  cr_assert_eq(klt_ckpt("inspect", path), 0);
  char out_path[600], text[16384];
  snprintf(out_path, sizeof out_path, "%s/klt_ckpt.out", dir);
  FILE *out = fopen(out_path, "r");
  cr_assert_not_null(out);
  size_t n = fread(text, 1, sizeof text - 1, out);
  fclose(out);
  text[n] = '\0';
  cr_assert_not_null(strstr(text, "step 5"), "%s", text);
  cr_assert_not_null(strstr(text, "model.layers.0.mlp.experts.w1"), "%s", text);
  cr_assert_not_null(strstr(text, "(3, 4, 6)"), "%s", text);
  cr_assert_not_null(strstr(text, "consistent"), "%s", text);
  cr_assert_eq(klt_ckpt("verify", path), 0);
  cr_assert_eq(klt_ckpt("verify", dir), 0, "a run directory stands for its latest checkpoint");
  char rank_file[600];
  snprintf(rank_file, sizeof rank_file, "%s/rank_00000.h5", path);
  flip_middle_byte(rank_file);
  cr_assert_eq(klt_ckpt("verify", path), 2);
  cr_assert_eq(klt_ckpt("inspect", path), 0, "inspect checks structure and sizes, not checksums");
  cr_assert_eq(truncate(rank_file, 100), 0);
  cr_assert_eq(klt_ckpt("inspect", path), 2);
  cr_assert_eq(klt_ckpt("bogus", path), 2);
  run_free(&run);
}

// A sharded optimizer's rank loads only its range of the states (any window, whatever split saved
// them); the weights always whole. Saving with an owned range that
// is the whole arena is the one-rank case of a sharded save.
Test(checkpoint, states_load_into_an_arena_window, .init = make_dir) {
  Run run = run_make(21);
  const size_t total = run.params.total;
  ArenaRange all = {0, total};
  run.meta.step = 3;
  checkpoint_save(dir, &run.meta, &run.params, run.state1, run.state2, &all, config_text, 0, NULL);
  char path[512];
  step_path(path, sizeof path, 3);
  // Windows: empty, inside one tensor, across tensor boundaries, the whole arena.
  size_t windows[][2] = {{0, 0}, {5, 5}, {3, 9}, {0, total / 2}, {total / 3, total}, {1, total - 1}, {0, total}};
  for (size_t w = 0; w < sizeof windows / sizeof windows[0]; w++) {
    ArenaRange range = {windows[w][0], windows[w][1]};
    size_t n = range.end - range.begin;
    Run loaded = run_make(99);
    real *state1 = test_alloc(n + 1), *state2 = test_alloc(n + 1);
    state1[n] = state2[n] = 12345;  // past the window: must stay untouched
    CheckpointMeta meta;
    checkpoint_load(path, &meta, &loaded.params, state1, state2, &range, false);
    cr_assert(memcmp(loaded.params.values, run.params.values, total * sizeof(real)) == 0, "window %zu: weights", w);
    cr_assert(memcmp(state1, run.state1 + range.begin, n * sizeof(real)) == 0, "window %zu: state 1", w);
    cr_assert(memcmp(state2, run.state2 + range.begin, n * sizeof(real)) == 0, "window %zu: state 2", w);
    cr_assert(state1[n] == 12345 && state2[n] == 12345, "window %zu: written past its end", w);
    free(state1);
    free(state2);
    run_free(&loaded);
  }
  run_free(&run);
}
