// Exact resume through klt-train: 20 steps in one go, and 10 steps then --resume for 10 more, give the
// same losses at every step and the same final weights and optimizer state, bit for bit (CPU). Also:
// SIGTERM saves and exits cleanly, --resume without a checkpoint starts fresh, and [stage] init_from
// takes the weights only.
#include <criterion/criterion.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train/checkpoint.h"
#include "train/config.h"
#include "train/model_config.h"
#include "train/params.h"
#include "tests/testing.h"

static char dir[256];
static char command[4096];

static void setup(void) {
  test_make_dir(dir, sizeof dir, "klt_resume");
  snprintf(command, sizeof command,
           "%s/klt-data synth --task palindrome --output %s/data --seq-len 32 --examples 400 --vocab-size 16 "
           "--seed 5 > /dev/null",
           getenv("KLT_BUILD_DIR"), dir);
  cr_assert_eq(system(command), 0);
}

TestSuite(resume, .init = setup, .timeout = 600);

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

Test(resume, ten_plus_ten_equals_twenty_bit_for_bit) {
  cr_assert_eq(train("whole", 20, ""), 0);
  cr_assert_eq(train("split", 10, ""), 0);
  cr_assert_eq(train("split", 20, "--resume"), 0);
  char whole[32][64], split[32][64];
  cr_assert_eq(read_losses("whole", whole, 32), 20);
  cr_assert_eq(read_losses("split", split, 32), 20);
  for (int i = 0; i < 20; i++) cr_assert_str_eq(split[i], whole[i], "loss of step %d differs after resume", i + 1);
  real *a1, *a2, *b1, *b2;
  ParamRegistry a = load_final("whole", &a1, &a2), b = load_final("split", &b1, &b2);
  cr_assert(memcmp(a.values, b.values, a.total * sizeof(real)) == 0, "weights differ after resume");
  cr_assert(memcmp(a1, b1, a.total * sizeof(real)) == 0, "optimizer state 1 differs after resume");
  cr_assert(memcmp(a2, b2, a.total * sizeof(real)) == 0, "optimizer state 2 differs after resume");
}

Test(resume, resume_without_a_checkpoint_starts_fresh) {
  cr_assert_eq(train("fresh", 2, "--resume"), 0);
  snprintf(command, sizeof command, "grep -q 'starting fresh' %s/fresh.out", dir);
  cr_assert_eq(system(command), 0, "no message that --resume found nothing");
}

Test(resume, sigterm_saves_and_exits_cleanly) {
  snprintf(command, sizeof command,
           "%s/klt-train %s/configs/default.ini --set data.path=%s/data --set train.run_dir=%s/term "
           "--set model.vocab_size=16 --set stage.seq_len=32 --set stage.global_batch=4 --set stage.steps=100000 "
           "--set train.val_every=0 > %s/term.out 2>&1 & echo $!",
           getenv("KLT_BUILD_DIR"), getenv("KLT_SOURCE_DIR"), dir, dir, dir);
  FILE *p = popen(command, "r");
  int pid = 0;
  cr_assert_eq(fscanf(p, "%d", &pid), 1);
  pclose(p);
  char metrics[512];
  snprintf(metrics, sizeof metrics, "%s/term/metrics.jsonl", dir);
  for (int i = 0; i < 600 && access(metrics, F_OK) != 0; i++) usleep(100000);
  usleep(500000);
  kill(pid, SIGTERM);
  snprintf(command, sizeof command, "while kill -0 %d 2>/dev/null; do sleep 0.1; done", pid);
  cr_assert_eq(system(command), 0);
  snprintf(command, sizeof command, "grep -q 'stopped by a signal' %s/term.out && ls %s/term/ckpt/latest > /dev/null",
           dir, dir);
  cr_assert_eq(system(command), 0, "SIGTERM did not save a checkpoint and stop cleanly");
}

Test(resume, init_from_takes_the_weights_only) {
  cr_assert_eq(train("first", 5, ""), 0);
  char extra[1024];
  snprintf(extra, sizeof extra, "--set stage.init_from=%s/first/ckpt/latest", dir);
  cr_assert_eq(train("second", 2, extra), 0);
  snprintf(command, sizeof command, "grep -q 'fresh optimizer' %s/second.out", dir);
  cr_assert_eq(system(command), 0);
}

// The same run on `ranks` MPI ranks with experts over groups of ep ranks (the optimizer sharded over
// the ranks).
static int train_ranks(const char *run, int ranks, int ep, long steps, const char *extra) {
  snprintf(command, sizeof command,
           "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 mpirun --oversubscribe "
           "-np %d %s/klt-train %s/configs/default.ini --set data.path=%s/data --set train.run_dir=%s/%s "
           "--set model.vocab_size=16 --set stage.seq_len=32 --set stage.global_batch=4 --set stage.steps=%ld "
           "--set stage.schedule=constant --set stage.warmup=3 --set log.every=1 --set train.val_every=0 "
           "--set train.val_batches=1 --set parallel.dp=%d --set parallel.ep=%d %s >> %s/%s.out 2>&1",
           ranks, getenv("KLT_BUILD_DIR"), getenv("KLT_SOURCE_DIR"), dir, dir, run, steps, ranks, ep, extra, dir, run);
  int status = system(command);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Resuming on another number of ranks (1 -> 2 -> 4; data parallel only, and with the experts spread
// over all ranks, ep = ranks): each resume loads the states of its new ranges from the previous rank
// count's sharded checkpoint. The same losses as one rank, to within float reduction order.
static void resume_on_two_then_four_ranks(const char *run, bool expert_parallel) {
  char whole_run[64];
  snprintf(whole_run, sizeof whole_run, "%s_whole", run);
  cr_assert_eq(train(whole_run, 20, ""), 0);
  cr_assert_eq(train(run, 10, ""), 0);
  for (int ranks = 2; ranks <= 4; ranks *= 2)
    cr_assert_eq(train_ranks(run, ranks, expert_parallel ? ranks : 1, ranks == 2 ? 15 : 20, "--resume"), 0,
                 "mpirun -np %d failed; see %s/%s.out", ranks, dir, run);
  char whole[32][64], split[32][64];
  cr_assert_eq(read_losses(whole_run, whole, 32), 20);
  cr_assert_eq(read_losses(run, split, 32), 20);
  for (int i = 0; i < 20; i++) {
    double a = atof(whole[i]), b = atof(split[i]);
    cr_assert_lt(fabs(a - b), 1e-6 * fabs(a), "step %d: %s on 1 rank, %s after resuming on more", i + 1, whole[i],
                 split[i]);
  }
}

Test(resume, resume_on_two_then_four_ranks) { resume_on_two_then_four_ranks("ranks", true); }
Test(resume, resume_on_two_then_four_data_parallel_ranks) { resume_on_two_then_four_ranks("dp_ranks", false); }

// On two ranks (sharded optimizer state, each rank saving its own range): 20 steps in one go and 10 +
// --resume 10 give the same losses and the same final weights and optimizer state, bit for bit.
Test(resume, ten_plus_ten_equals_twenty_bit_for_bit_on_two_ranks) {
  cr_assert_eq(train_ranks("two_whole", 2, 1, 20, ""), 0, "see %s/two_whole.out", dir);
  cr_assert_eq(train_ranks("two_split", 2, 1, 10, ""), 0, "see %s/two_split.out", dir);
  cr_assert_eq(train_ranks("two_split", 2, 1, 20, "--resume"), 0, "see %s/two_split.out", dir);
  char whole[32][64], split[32][64];
  cr_assert_eq(read_losses("two_whole", whole, 32), 20);
  cr_assert_eq(read_losses("two_split", split, 32), 20);
  for (int i = 0; i < 20; i++) cr_assert_str_eq(split[i], whole[i], "loss of step %d differs after resume", i + 1);
  real *a1, *a2, *b1, *b2;
  ParamRegistry a = load_final("two_whole", &a1, &a2), b = load_final("two_split", &b1, &b2);
  cr_assert(memcmp(a.values, b.values, a.total * sizeof(real)) == 0, "weights differ after resume");
  cr_assert(memcmp(a1, b1, a.total * sizeof(real)) == 0, "optimizer state 1 differs after resume");
  cr_assert(memcmp(a2, b2, a.total * sizeof(real)) == 0, "optimizer state 2 differs after resume");
  char path[512];
  snprintf(path, sizeof path, "%s/two_split/ckpt/latest/rank_00001.h5", dir);
  struct stat info;
  cr_assert(stat(path, &info) == 0 && info.st_size > 100000, "rank 1 stored no share of the model (%s)", path);
}

// Starts a long run in the background (a checkpoint every step) and returns its pid.
static int start_background(const char *run, const char *extra) {
  snprintf(command, sizeof command,
           "%s/klt-train %s/configs/default.ini --set data.path=%s/data --set train.run_dir=%s/%s "
           "--set model.vocab_size=16 --set stage.seq_len=32 --set stage.global_batch=4 --set stage.steps=100000 "
           "--set train.val_every=0 --set ckpt.every=1 --set ckpt.keep=2 %s >> %s/%s.out 2>&1 & echo $!",
           getenv("KLT_BUILD_DIR"), getenv("KLT_SOURCE_DIR"), dir, dir, run, extra, dir, run);
  FILE *p = popen(command, "r");
  int pid = 0;
  cr_assert_eq(fscanf(p, "%d", &pid), 1);
  pclose(p);
  return pid;
}

static void wait_for_exit(int pid) {
  snprintf(command, sizeof command, "while kill -0 %d 2>/dev/null; do sleep 0.05; done", pid);
  cr_assert_eq(system(command), 0);
}

// kill -9 at arbitrary moments of a run that saves every step (so a kill often lands inside a save):
// every time, --resume must find a complete checkpoint and go on from it.
Test(resume, kill_nine_at_any_moment_leaves_a_resumable_run) {
  char latest[512];
  snprintf(latest, sizeof latest, "%s/killed/ckpt/latest", dir);
  int pid = start_background("killed", "");
  for (int i = 0; i < 200 && access(latest, F_OK) != 0; i++) usleep(50000);
  for (int round = 0; round < 4; round++) {
    usleep(150000 + 110000 * round);
    kill(pid, SIGKILL);
    wait_for_exit(pid);
    snprintf(command, sizeof command, "%s/klt-ckpt verify %s > /dev/null", getenv("KLT_BUILD_DIR"), latest);
    cr_assert_eq(system(command), 0, "round %d: ckpt/latest is not a complete checkpoint after kill -9", round);
    pid = start_background("killed", "--resume");
    // Wait until this restart has loaded its checkpoint before the next kill.
    snprintf(command, sizeof command, "for i in $(seq 600); do [ $(grep -c 'resuming from' %s/killed.out) -ge %d ] && exit 0; sleep 0.05; done; exit 1",
             dir, round + 1);
    cr_assert_eq(system(command), 0, "restart %d did not resume; see %s/killed.out", round + 1, dir);
  }
  kill(pid, SIGTERM);
  wait_for_exit(pid);
  snprintf(command, sizeof command, "grep -q 'stopped by a signal' %s/killed.out", dir);
  cr_assert_eq(system(command), 0, "the last restart did not stop cleanly; see %s/killed.out", dir);
}
