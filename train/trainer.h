/* The training loop of klt-train: loader -> forward -> loss -> backward -> gradient clipping ->
 * optimizer -> log, with periodic validation, on the CPU. */
#pragma once
#include "train/config.h"
#include "train/model_config.h"

// Trains as configured; returns the process exit code.
int train_run(const Config *config, const ModelConfig *model);
