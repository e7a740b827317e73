/* A small seeded random number generator (SplitMix64-seeded xoshiro256**), deterministic on every
 * platform, with independent streams: rng_seed(seed, stream) gives unrelated sequences for different
 * streams, so parameter i's initialization does not depend on how many tensors came before it. */
#pragma once
#include <stdint.h>

typedef struct {
  uint64_t s[4];
} Rng;

void rng_seed(Rng *rng, uint64_t seed, uint64_t stream);
uint64_t rng_u64(Rng *rng);
double rng_uniform(Rng *rng);  // [0, 1)
double rng_normal(Rng *rng);   // N(0, 1)
