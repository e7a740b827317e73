/* Aux-loss-free load balancing of the MoE router (DeepSeek-V3): the per-expert bias only changes
 * which experts a token is routed to, and is moved after every step by a fixed rate towards balance,
 * using the token counts of the whole global batch (the caller all-reduces them first). */
#pragma once
#include "common/real.h"

// bias_i += rate * sign(mean(load) - load_i): underloaded experts gain, overloaded ones lose,
// experts exactly at the mean stay.
void router_bias_update(real *bias,          // (E)
                        const double *load,  // (E) tokens routed to each expert this step
                        int E, real rate);

// max(load) / mean(load): 1 is perfect balance. 1 when no token was routed.
double load_imbalance(const double *load,  // (E)
                      int E);
