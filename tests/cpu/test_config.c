// Configuration: includes, overrides, errors (exit code 2), printing, and the README's key table.
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train/config.h"
#include "train/model_config.h"
#include "tests/testing.h"

static char dir[256];

static void make_dir(void) {
  test_make_dir(dir, sizeof dir, "klt_config");
}

static void write_file(const char *name, const char *text) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "w");
  cr_assert_not_null(f);
  fputs(text, f);
  fclose(f);
}

static void load(Config *c, const char *name) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  config_set_defaults(c);
  config_load_file(c, path);
}

TestSuite(config, .init = make_dir);

Test(config, include_then_local_keys_then_overrides) {
  write_file("model.ini", "[model]\nhidden_size = 64\nnum_layers = 2\n[optim]\nlr = 0.5\n");
  write_file("run.ini", "include = model.ini\n[optim]\nlr = 0.25 ; later wins\n[stage]\nseq_len = 32\n");
  Config c;
  load(&c, "run.ini");
  cr_assert_eq(c.model.hidden_size, 64);
  cr_assert_eq(c.model.num_layers, 2);
  cr_assert_float_eq(c.optim.lr, 0.25, 1e-15);
  cr_assert_eq(c.stage.seq_len, 32);
  config_set_override(&c, "optim.lr=1e-3");
  config_set_override(&c, "kda.gate=bounded");
  cr_assert_float_eq(c.optim.lr, 1e-3, 1e-18);
  cr_assert_str_eq(c.kda.gate, "bounded");
}

Test(config, print_reads_back_to_the_same_values) {
  Config a, b;
  config_set_defaults(&a);
  config_set_override(&a, "optim.lr=0.1");
  config_set_override(&a, "model.layers=kda,mla");
  char path[512];
  snprintf(path, sizeof path, "%s/printed.ini", dir);
  FILE *f = fopen(path, "w");
  config_print(&a, f);
  fclose(f);
  config_set_defaults(&b);
  config_load_file(&b, path);
  cr_assert(memcmp(&a, &b, sizeof a) == 0, "printed config does not read back identically");
}

Test(config, layer_pattern_from_full_attn_every_matches_the_released_model) {
  Config c;
  config_set_defaults(&c);
  config_set_override(&c, "model.num_layers=27");
  config_set_override(&c, "model.layers=");
  config_set_override(&c, "model.full_attn_every=4");
  int mla[] = {3, 7, 11, 15, 19, 23, 26}, next = 0;
  for (int l = 0; l < 27; l++) {
    bool expect = next < 7 && mla[next] == l;
    if (expect) next++;
    cr_assert_eq(config_layer_is_mla(&c, l), expect, "layer %d", l);
  }
}

Test(config, released_model_parameter_count) {
  Config c;
  config_set_defaults(&c);
  char path[512];
  snprintf(path, sizeof path, "%s/configs/models/kimi-linear-48b-a3b.ini", getenv("KLT_SOURCE_DIR"));
  config_load_file(&c, path);
  ModelConfig m;
  model_config_from(&m, &c);
  ParamCount count = model_count_params(&m);
  cr_assert(count.total > 48.5e9 && count.total < 49.5e9, "total %.4g", count.total);  // 49.1B as released
  cr_assert(count.active - count.embedding > 2.8e9 && count.active - count.embedding < 3.3e9, "active %.4g",
            count.active - count.embedding);
}

Test(config, unknown_key_is_a_user_error, .exit_code = 2) {
  write_file("bad.ini", "[optim]\nlearning_rate = 1\n");
  Config c;
  load(&c, "bad.ini");
}

Test(config, unknown_section_is_a_user_error, .exit_code = 2) {
  write_file("bad.ini", "[optimizer]\nlr = 1\n");
  Config c;
  load(&c, "bad.ini");
}

Test(config, malformed_number_is_a_user_error, .exit_code = 2) {
  write_file("bad.ini", "[model]\nhidden_size = 12x\n");
  Config c;
  load(&c, "bad.ini");
}

Test(config, out_of_range_is_a_user_error, .exit_code = 2) {
  write_file("bad.ini", "[kda]\ngate_lower_bound = -7\n");
  Config c;
  load(&c, "bad.ini");
}

Test(config, bad_choice_is_a_user_error, .exit_code = 2) {
  Config c;
  config_set_defaults(&c);
  config_set_override(&c, "train.device=tpu");
}

Test(config, error_in_included_file_is_a_user_error, .exit_code = 2) {
  write_file("inner.ini", "[model]\n\nhidden_size = -3\n");
  write_file("outer.ini", "include = inner.ini\n");
  Config c;
  load(&c, "outer.ini");
}

Test(config, include_cycle_is_a_user_error, .exit_code = 2) {
  write_file("a.ini", "include = b.ini\n");
  write_file("b.ini", "include = a.ini\n");
  Config c;
  load(&c, "a.ini");
}

Test(config, missing_file_is_a_user_error, .exit_code = 2) {
  Config c;
  load(&c, "does-not-exist.ini");
}

Test(config, layer_list_of_wrong_length_is_a_user_error, .exit_code = 2) {
  Config c;
  config_set_defaults(&c);
  config_set_override(&c, "model.layers=kda,mla");
  config_validate(&c);
}

Test(config, ep_not_dividing_dp_is_a_user_error, .exit_code = 2) {
  Config c;
  config_set_defaults(&c);
  config_set_override(&c, "parallel.dp=4");
  config_set_override(&c, "parallel.ep=3");
  config_validate(&c);
}

Test(config, readme_documents_every_key_with_its_default) {
  char path[512];
  snprintf(path, sizeof path, "%s/configs/README.md", getenv("KLT_SOURCE_DIR"));
  FILE *f = fopen(path, "r");
  cr_assert_not_null(f, "cannot read %s", path);
  static char text[1 << 20];
  size_t n = fread(text, 1, sizeof text - 1, f);
  text[n] = '\0';
  fclose(f);
  for (int i = 0; i < config_key_count(); i++) {
    char row[256];
    const char *def = config_key_default(i);
    if (def[0]) snprintf(row, sizeof row, "| `%s.%s` | `%s` |", config_key_section(i), config_key_name(i), def);
    else snprintf(row, sizeof row, "| `%s.%s` | (empty) |", config_key_section(i), config_key_name(i));
    cr_assert_not_null(strstr(text, row), "configs/README.md lacks the row starting %s", row);
  }
}
