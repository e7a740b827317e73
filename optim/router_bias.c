#include "optim/router_bias.h"

#include "common/check.h"

static double load_mean(const double *load, int E) {
  double sum = 0.0;
  for (int e = 0; e < E; e++) sum += load[e];
  return sum / E;
}

void router_bias_update(real *bias, const double *load, int E, real rate) {
  CHECK(E > 0, "router bias update needs at least one expert, got %d", E);
  double mean = load_mean(load, E);
  for (int e = 0; e < E; e++) {
    if (load[e] < mean) bias[e] += rate;
    else if (load[e] > mean) bias[e] -= rate;
  }
}

double load_imbalance(const double *load, int E) {
  CHECK(E > 0, "load imbalance needs at least one expert, got %d", E);
  double mean = load_mean(load, E);
  if (mean <= 0.0) return 1.0;
  double max = load[0];
  for (int e = 1; e < E; e++)
    if (load[e] > max) max = load[e];
  return max / mean;
}
