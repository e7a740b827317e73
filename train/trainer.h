/* The training loop of klt-train: loader -> forward -> loss -> backward -> gradient clipping ->
 * optimizer -> log, with periodic validation, on the CPU. */
#pragma once
#include <stdbool.h>

#include "train/config.h"
#include "train/model_config.h"

typedef struct {
  bool resume;              // --resume: continue from a checkpoint of [train] run_dir
  const char *resume_path;  // --resume PATH: from this checkpoint directory (NULL: the latest)
} TrainOptions;

// Trains as configured; returns the process exit code. Saves checkpoints every [ckpt] every steps, at
// the end, and after the current step on SIGTERM / SIGINT.
int train_run(const Config *config, const ModelConfig *model, const TrainOptions *options);
