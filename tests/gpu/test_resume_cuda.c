// Exact resume on the GPU through klt-train: 20 steps in one go, and 10 steps then --resume for 10 more,
// give the same losses at every step and the same final weights and optimizer state, bit for bit (every
// CUDA op is deterministic). And a run saved on the CPU resumes on the GPU (and back): the checkpoint
// does not depend on the device.
#include <criterion/criterion.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train/checkpoint.h"
#include "train/config.h"
#include "train/model_config.h"
#include "train/params.h"
#include "tests/testing.h"

static char dir[256];
static char command[4096];

static void setup(void) {
  test_make_dir(dir, sizeof dir, "klt_resume_cuda");
  snprintf(command, sizeof command,
           "%s/klt-data synth --task palindrome --output %s/data --seq-len 32 --examples 400 --vocab-size 16 "
           "--seed 5 > /dev/null",
           getenv("KLT_BUILD_DIR"), dir);
  cr_assert_eq(system(command), 0);
}

TestSuite(resume_cuda, .init = setup, .timeout = 600);

// The schedule is constant after warmup so that a 10-step run is the first half of a 20-step one.
static int train(const char *run, long steps, const char *extra) {
  snprintf(command, sizeof command,
           "%s/klt-train %s/configs/default.ini --set data.path=%s/data --set train.run_dir=%s/%s "
           "--set model.vocab_size=16 --set stage.seq_len=32 --set stage.global_batch=4 --set stage.steps=%ld "
           "--set stage.schedule=constant --set stage.warmup=3 --set log.every=1 --set train.val_every=0 "
           "--set train.val_batches=1 %s >> %s/%s.out 2>&1",
           getenv("KLT_BUILD_DIR"), getenv("KLT_SOURCE_DIR"), dir, dir, run, steps, extra, dir, run);
  int status = system(command);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The "loss" field of every step line of a run's metrics.jsonl, as text (cJSON prints round-trip digits).
static int read_losses(const char *run, char losses[][64], int cap) {
  char path[512], line[4096];
  snprintf(path, sizeof path, "%s/%s/metrics.jsonl", dir, run);
  FILE *f = fopen(path, "r");
  cr_assert_not_null(f, "no %s", path);
  int count = 0;
  while (fgets(line, sizeof line, f) && count < cap) {
    if (!strstr(line, "\"kind\":\"step\"")) continue;
    char *start = strstr(line, "\"loss\":") + 7;
    size_t n = strcspn(start, ",}");
    snprintf(losses[count++], 64, "%.*s", (int)n, start);
  }
  fclose(f);
  return count;
}

static ParamRegistry load_final(const char *run, real **state1, real **state2) {
  Config config;
  config_set_defaults(&config);
  char path[512];
  snprintf(path, sizeof path, "%s/configs/models/tiny.ini", getenv("KLT_SOURCE_DIR"));
  config_load_file(&config, path);
  config_set_override(&config, "model.vocab_size=16");
  ModelConfig model;
  model_config_from(&model, &config);
  ParamRegistry params;
  params_init(&params);
  model_register_params(&model, &params);
  params_allocate(&params);
  *state1 = calloc(params.total, sizeof(real));
  *state2 = calloc(params.total, sizeof(real));
  char latest[1024], run_dir[512];
  snprintf(run_dir, sizeof run_dir, "%s/%s", dir, run);
  cr_assert(checkpoint_find_latest(run_dir, latest, sizeof latest), "no checkpoint in %s", run_dir);
  CheckpointMeta meta;
  checkpoint_load(latest, &meta, &params, *state1, *state2, NULL, false);
  cr_assert_eq(meta.step, 20);
  return params;
}

Test(resume_cuda, ten_plus_ten_equals_twenty_bit_for_bit) {
  const char *gpu = "--set train.device=cuda";
  cr_assert_eq(train("whole", 20, gpu), 0);
  cr_assert_eq(train("split", 10, gpu), 0);
  cr_assert_eq(train("split", 20, "--set train.device=cuda --resume"), 0);
  char whole[32][64], split[32][64];
  cr_assert_eq(read_losses("whole", whole, 32), 20);
  cr_assert_eq(read_losses("split", split, 32), 20);
  for (int i = 0; i < 20; i++) cr_expect_str_eq(split[i], whole[i], "loss of step %d differs after resume", i + 1);
  real *a1, *a2, *b1, *b2;
  ParamRegistry a = load_final("whole", &a1, &a2), b = load_final("split", &b1, &b2);
  cr_expect(memcmp(a.values, b.values, a.total * sizeof(real)) == 0, "weights differ after resume");
  cr_expect(memcmp(a1, b1, a.total * sizeof(real)) == 0, "optimizer state 1 differs after resume");
  cr_expect(memcmp(a2, b2, a.total * sizeof(real)) == 0, "optimizer state 2 differs after resume");
}

Test(resume_cuda, cpu_checkpoint_resumes_on_the_gpu) {
  cr_assert_eq(train("gpu_only", 20, "--set train.device=cuda"), 0);
  cr_assert_eq(train("mixed", 10, "--set train.device=cpu"), 0);
  cr_assert_eq(train("mixed", 20, "--set train.device=cuda --resume"), 0);
  char gpu_only[32][64], mixed[32][64];
  cr_assert_eq(read_losses("gpu_only", gpu_only, 32), 20);
  cr_assert_eq(read_losses("mixed", mixed, 32), 20);
  // Steps 11-20 ran on the GPU from the CPU's state: close to the all-GPU run, within bf16 drift.
  for (int i = 10; i < 20; i++) {
    double a = atof(gpu_only[i]), b = atof(mixed[i]);
    cr_expect(fabs(a - b) <= 0.05 * fabs(a), "step %d: loss %.5f after a CPU -> GPU resume vs %.5f", i + 1, b, a);
  }
}
