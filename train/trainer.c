// The training loop; see trainer.h.
#include "train/trainer.h"

#include "common/check.h"

int train_run(const Config *config, const ModelConfig *model) {
  klt_user_error("training is not built yet in this revision; use --print-config");
}
