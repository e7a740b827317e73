// The parameter registry; see params.h.
#include "train/params.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "common/rng.h"

void params_init(ParamRegistry *registry) { memset(registry, 0, sizeof *registry); }

int params_add(ParamRegistry *registry, const char *name, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
               OptimizerGroup group, bool decay, ParamInit init, bool active_per_token) {
  CHECK(registry->values == NULL, "params_add(%s) after the arenas were allocated", name);
  CHECK(strlen(name) < sizeof registry->params[0].name, "parameter name too long: %s", name);
  if (registry->count == registry->capacity) {
    registry->capacity = registry->capacity ? 2 * registry->capacity : 64;
    registry->params = klt_realloc(registry->params, (size_t)registry->capacity * sizeof(ParamInfo));
  }
  ParamInfo *p = &registry->params[registry->count];
  memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "%s", name);
  int64_t dims[4] = {d0, d1, d2, d3};
  p->numel = 1;
  for (int i = 0; i < 4 && dims[i] > 0; i++) {
    p->shape[p->ndim++] = dims[i];
    p->numel *= (size_t)dims[i];
  }
  CHECK(p->ndim > 0, "parameter %s has no extent", name);
  p->offset = registry->total;
  p->group = group;
  p->decay = decay;
  p->init = init;
  p->active_per_token = active_per_token;
  registry->total += p->numel;
  return registry->count++;
}

void params_allocate(ParamRegistry *registry) {
  CHECK(registry->values == NULL, "arenas allocated twice");
  registry->values = klt_calloc(registry->total, sizeof(real));
  registry->grads = klt_calloc(registry->total, sizeof(real));
}

void params_free(ParamRegistry *registry) {
  free(registry->params);
  free(registry->values);
  free(registry->grads);
  memset(registry, 0, sizeof *registry);
}

int params_find(const ParamRegistry *registry, const char *name) {
  for (int i = 0; i < registry->count; i++)
    if (strcmp(registry->params[i].name, name) == 0) return i;
  return -1;
}

void params_zero_grads(ParamRegistry *registry) { memset(registry->grads, 0, registry->total * sizeof(real)); }

void params_initialize(ParamRegistry *registry, double init_std, uint64_t seed) {
  for (int i = 0; i < registry->count; i++) {
    const ParamInfo *p = &registry->params[i];
    real *x = params_value(registry, i);
    // One stream per tensor, keyed by its index: adding a tensor does not reshuffle the others.
    Rng rng;
    rng_seed(&rng, seed, (uint64_t)i);
    double fan_in = (double)p->shape[p->ndim - 1];
    for (size_t j = 0; j < p->numel; j++) {
      double v = 0;
      switch (p->init) {
        case INIT_NORMAL: v = init_std * rng_normal(&rng); break;
        case INIT_ONES: v = 1; break;
        case INIT_ZEROS: v = 0; break;
        case INIT_UNIFORM_FAN_IN: v = (2 * rng_uniform(&rng) - 1) / sqrt(fan_in); break;
        case INIT_CONV: v = (2 * rng_uniform(&rng) - 1) / sqrt(fan_in); break;
        case INIT_A_LOG: v = log(1 + 15 * rng_uniform(&rng)); break;
        case INIT_DT_BIAS: {
          double dt = exp(log(1e-3) + (log(1e-1) - log(1e-3)) * rng_uniform(&rng));
          v = dt + log(-expm1(-dt));  // inverse of softplus
          break;
        }
      }
      x[j] = (real)v;
    }
  }
}
