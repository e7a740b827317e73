#include "optim/adamw.h"

#include <math.h>

#include "common/check.h"

AdamWConfig adamw_config_default(void) {
  return (AdamWConfig){.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
}

void adamw_step(real *weight, real *first_moment, real *second_moment, const real *grad, size_t n,
                const AdamWConfig *config, real lr, long step) {
  CHECK(step >= 1, "AdamW step counter is 1-based, got %ld", step);
  double beta1 = config->beta1, beta2 = config->beta2;
  double correction1 = 1.0 - pow(beta1, (double)step);
  double correction2 = 1.0 - pow(beta2, (double)step);
  for (size_t i = 0; i < n; i++) {
    double g = grad[i];
    double m = beta1 * first_moment[i] + (1.0 - beta1) * g;
    double v = beta2 * second_moment[i] + (1.0 - beta2) * g * g;
    first_moment[i] = (real)m;
    second_moment[i] = (real)v;
    double update = (m / correction1) / (sqrt(v / correction2) + config->eps);
    weight[i] -= (real)((double)lr * (update + config->weight_decay * (double)weight[i]));
  }
}
