// klt-train end to end on a small synthetic dataset: it trains (the loss falls), writes metrics.jsonl
// with a step line per logged step and a validation line, and refuses bad input with exit code 2.
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tests/testing.h"

static char dir[256];
static char command[4096];

static void setup(void) {
  test_make_dir(dir, sizeof dir, "klt_train");
  snprintf(command, sizeof command,
           "%s/klt-data synth --task palindrome --output %s/data --seq-len 32 --examples 600 --vocab-size 16 "
           "--seed 3 > /dev/null",
           getenv("KLT_BUILD_DIR"), dir);
  cr_assert_eq(system(command), 0, "klt-data synth failed");
}

TestSuite(train_run, .init = setup, .timeout = 600);

static int train(const char *extra) {
  snprintf(command, sizeof command,
           "%s/klt-train %s/configs/default.ini --set data.path=%s/data --set train.run_dir=%s/run "
           "--set model.vocab_size=16 --set stage.seq_len=32 --set stage.global_batch=8 --set stage.steps=40 "
           "--set stage.warmup=5 --set log.every=1 --set train.val_every=20 --set train.val_batches=2 "
           "--set data.val_fraction=0.05 %s > %s/out.txt 2>&1",
           getenv("KLT_BUILD_DIR"), getenv("KLT_SOURCE_DIR"), dir, dir, extra, dir);
  int status = system(command);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

Test(train_run, trains_and_writes_metrics) {
  cr_assert_eq(train(""), 0, "klt-train failed; see the output in %s/out.txt", dir);
  char path[512];
  snprintf(path, sizeof path, "%s/run/metrics.jsonl", dir);
  FILE *f = fopen(path, "r");
  cr_assert_not_null(f, "no metrics.jsonl");
  char line[4096];
  int steps = 0, validations = 0;
  double first = 0, last = 0;
  while (fgets(line, sizeof line, f)) {
    if (strstr(line, "\"kind\":\"step\"")) {
      double loss = atof(strstr(line, "\"loss\":") + 7);
      if (steps++ == 0) first = loss;
      last = loss;
      cr_assert_not_null(strstr(line, "\"tokens_per_second\":"));
      cr_assert_not_null(strstr(line, "\"max_attention_logit\":"));
      cr_assert_not_null(strstr(line, "\"load_imbalance\":"));
    } else if (strstr(line, "\"kind\":\"validation\"")) {
      validations++;
    }
  }
  fclose(f);
  cr_assert_eq(steps, 40);
  cr_assert_eq(validations, 2);
  cr_assert_lt(last, first - 0.15, "loss did not fall: %.4f -> %.4f", first, last);
}

Test(train_run, adamw_and_bounded_gate_also_train) {
  cr_assert_eq(train("--set optim.optimizer=adamw --set kda.gate=bounded --set train.micro_batches=2"), 0,
               "klt-train failed; see %s/out.txt", dir);
}

Test(train_run, model_vocabulary_smaller_than_the_data_is_a_user_error) {
  cr_assert_eq(train("--set model.vocab_size=8"), 2);
}

Test(train_run, missing_dataset_is_a_user_error) {
  cr_assert_eq(train("--set data.path=/nonexistent/klt"), 2);
}

// A rank that stops answering (SIGSTOP) must not hang the job: the other rank's step watchdog stops it
// with a message naming the timeout, and mpirun ends with a failure.
Test(train_run, a_hung_rank_ends_the_job_with_a_message) {
  snprintf(command, sizeof command,
           "cd %s && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 "
           "timeout 120 mpirun --oversubscribe -np 2 %s/klt-train %s/configs/default.ini --set data.path=%s/data "
           "--set train.run_dir=%s/hang --set model.vocab_size=16 --set stage.seq_len=32 --set stage.global_batch=8 "
           "--set stage.steps=1000000 --set train.val_every=0 --set parallel.dp=2 --set train.step_timeout=3 "
           "> %s/hang.out 2>&1 & "
           "for i in $(seq 300); do [ -f %s/hang/metrics.jsonl ] && break; sleep 0.1; done; sleep 1; "
           "kill -STOP $(pgrep -f '^[^ ]*klt-train .*run_dir=%s/hang' | tail -1); wait; "
           "grep -q 'did not finish within' %s/hang.out",
           dir, getenv("KLT_BUILD_DIR"), getenv("KLT_SOURCE_DIR"), dir, dir, dir, dir, dir, dir);
  cr_assert_eq(system(command), 0, "no watchdog message; see %s/hang.out", dir);
}
