/* Lookup of a layer's parameter tensors in the registry by their released names. */
#pragma once
#include <stdio.h>

#include "common/check.h"
#include "train/params.h"

// Sets *value and *grad to model.layers.<layer>.<suffix> (a bug if the registry lacks it).
static inline void layer_param(const ParamRegistry *params, int layer, const char *suffix, real **value, real **grad) {
  char name[160];
  snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
  int i = params_find(params, name);
  CHECK(i >= 0, "parameter %s is not registered", name);
  *value = params_value(params, i);
  *grad = params_grad(params, i);
}
