/* The parameter registry: the one list of every trainable tensor (and the router biases), with the
 * released Hugging Face checkpoint's name and shape, its optimizer group, whether weight decay applies,
 * and how it is initialized. Values and gradients live in two arenas (one allocation each) in registry
 * order, so a layer's tensors are pointers into them. The optimizer, checkpoints, export and gradient
 * reduction all walk this list; nobody keeps a second one. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/real.h"

typedef enum {
  GROUP_MUON,   // 2-D matrices (each expert's matrix on its own)
  GROUP_ADAMW,  // embedding, lm head, norms, convolutions, A_log, dt_bias
  GROUP_NONE,   // not trained by gradients (the router bias, moved by load balancing)
} OptimizerGroup;

typedef enum {
  INIT_NORMAL,          // N(0, init_std^2): linear layers, embedding, lm head
  INIT_ONES,            // norm gains
  INIT_ZEROS,           // router bias
  INIT_UNIFORM_FAN_IN,  // U(-1/sqrt(in), 1/sqrt(in)): the router (kaiming uniform, a = sqrt 5, as released)
  INIT_CONV,            // U(-1/sqrt(kernel), 1/sqrt(kernel)): PyTorch Conv1d default, fan-in = kernel size
  INIT_A_LOG,           // log U(1, 16)
  INIT_DT_BIAS,         // inverse softplus of dt ~ log-uniform [1e-3, 1e-1]
} ParamInit;

typedef struct {
  char name[128];  // Hugging Face name, e.g. model.layers.3.self_attn.q_proj.weight
  int ndim;
  int64_t shape[4];
  size_t numel;
  size_t offset;  // in elements, into the value and gradient arenas
  OptimizerGroup group;
  bool decay;
  ParamInit init;
  bool active_per_token;  // false for routed experts (only top-k of them act on a token)
} ParamInfo;

typedef struct {
  ParamInfo *params;
  int count, capacity;
  size_t total;     // elements over all tensors
  real *values;     // (total)
  real *grads;      // (total)
} ParamRegistry;

void params_init(ParamRegistry *registry);
// Adds a tensor; returns its index. Shapes are given as up to 4 extents (unused ones 0).
int params_add(ParamRegistry *registry, const char *name, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
               OptimizerGroup group, bool decay, ParamInit init, bool active_per_token);
// Allocates the value and gradient arenas (zeroed) once every tensor is added.
void params_allocate(ParamRegistry *registry);
void params_free(ParamRegistry *registry);
int params_find(const ParamRegistry *registry, const char *name);  // -1 when absent
static inline real *params_value(const ParamRegistry *r, int i) { return r->values + r->params[i].offset; }
static inline real *params_grad(const ParamRegistry *r, int i) { return r->grads + r->params[i].offset; }
// Fills every tensor by its ParamInit rule from a seeded generator (deterministic for a seed).
void params_initialize(ParamRegistry *registry, double init_std, uint64_t seed);
void params_zero_grads(ParamRegistry *registry);
