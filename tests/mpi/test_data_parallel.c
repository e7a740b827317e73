// Data and expert parallelism on the CPU (run under mpirun -np 2 and -np 4, with ep = 1, 2, 4 where it
// divides the ranks): each rank runs the model on its slice of the global batch, its experts on the
// tokens routed to them from its ep group, and the gradients are summed over ranks into each rank's
// optimizer range (ZeRO-1); this must equal one model run on the whole batch, the global gradient norm
// from the owned pieces must equal the whole one, and sharded optimizer steps (each rank updating its
// range, holding only its range's state, then the all-gather) must keep every rank's weights and its
// state equal to the single model's. fp64 build: differences are only reduction order.
// 20 steps, each checked (loss 1e-10, gradients and weights 1e-11 relative).
#include <malloc.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "dist/world.h"
#include "optim/grad_norm.h"
#include "tests/testing.h"
#include "train/model.h"
#include "train/optimizer.h"

#define T 12
#define ROWS_PER_RANK 1

static int failures = 0;

static void expect_close(const char *what, const real *a, const real *b, size_t n, double tolerance, int rank) {
  double error = test_rel_error(a, b, n);
  if (!(error <= tolerance)) {
    fprintf(stderr, "rank %d: %s differs: relative error %.3g > %.1g\n", rank, what, error, tolerance);
    failures++;
  }
}

// The ranks' ranges are the plan's, the same plan on every rank, covering the arena once; each rank's
// state arrays hold its range only (their allocation's size), less than the whole arena on several ranks.
static void check_sharding(const Optimizer *whole, const Optimizer *part, size_t total, const World *world) {
  if (whole->owned.begin != 0 || whole->owned.end != total) {
    fprintf(stderr, "rank %d: one rank does not own the whole arena\n", world->rank);
    failures++;
  }
  long long cuts[65];
  if (world->size > 64) abort();
  for (int r = 0; r <= world->size; r++) cuts[r] = (long long)part->plan.cuts[r];
  MPI_Bcast(cuts, world->size + 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  size_t owned = part->owned.end - part->owned.begin, sum = owned;
  MPI_Allreduce(MPI_IN_PLACE, &sum, 1, MPI_UNSIGNED_LONG, MPI_SUM, MPI_COMM_WORLD);
  bool same = part->plan.ranks == world->size && part->owned.begin == part->plan.cuts[world->rank] &&
              part->owned.end == part->plan.cuts[world->rank + 1];
  for (int r = 0; r <= world->size; r++) same = same && cuts[r] == (long long)part->plan.cuts[r];
  if (!same || sum != total || cuts[0] != 0 || cuts[world->size] != (long long)total) {
    fprintf(stderr, "rank %d: the ranges are not one plan covering the arena (%zu of %zu owned in all)\n",
            world->rank, sum, total);
    failures++;
  }
  size_t bytes = (owned ? owned : 1) * sizeof(real);
  size_t usable1 = malloc_usable_size(part->state1), usable2 = malloc_usable_size(part->state2);
  if (usable1 < bytes || usable1 > bytes + 4096 || usable2 < bytes || usable2 > bytes + 4096 ||
      (world->size > 1 && owned >= total)) {
    fprintf(stderr, "rank %d: optimizer state of %zu and %zu bytes for a range of %zu of %zu elements\n", world->rank,
            usable1, usable2, owned, total);
    failures++;
  }
  if (world->size > 1 && world->rank == 0) {
    printf("  ranges:");
    for (int r = 0; r < world->size; r++) printf(" [%lld, %lld)", cuts[r], cuts[r + 1]);
    printf(" of %zu\n", total);
  }
}

// One layout: every rank a data-parallel rank, experts spread over groups of ep ranks.
static void run_layout(const World *world_in, int size) {
  const World world = *world_in;
  const int G = ROWS_PER_RANK * size;

  Config config;
  config_set_defaults(&config);
  const char *overrides[] = {"model.vocab_size=13", "model.hidden_size=16", "model.num_layers=2", "model.layers=kda,mla",
                             "model.dense_intermediate_size=12", "kda.heads=2", "kda.head_dim=4", "kda.chunk_size=4",
                             "mla.heads=2", "mla.kv_lora_rank=6", "mla.qk_nope_dim=4", "mla.qk_pe_dim=2", "mla.v_dim=3",
                             "moe.num_experts=4", "moe.intermediate_size=8", "optim.qk_clip_tau=0.5",
                             "stage.steps=20", "stage.warmup=3"};
  for (size_t i = 0; i < sizeof overrides / sizeof overrides[0]; i++) config_set_override(&config, overrides[i]);
  ModelConfig mc;
  model_config_from(&mc, &config);
  World alone = {.rank = 0, .size = 1, .dp = 1, .ep = 1, .cp = 1};
  Model *whole = model_create(&mc, G, T, 11, &alone);
  Model *part = model_create(&mc, ROWS_PER_RANK, T, 11, world_in);
  Optimizer whole_opt, part_opt;
  optimizer_create(&whole_opt, whole, &config, &alone);
  optimizer_create(&part_opt, part, &config, world_in);
  ParamRegistry *wp = model_params(whole), *pp = model_params(part);
  check_sharding(&whole_opt, &part_opt, wp->total, &world);

  int *inputs = malloc(sizeof(int) * G * T), *targets = malloc(sizeof(int) * G * T);
  unsigned char *doc_start = calloc((size_t)G * T, 1);
  uint64_t rng = 99;
  for (int step = 0; step < 20; step++) {
    long loss_tokens = 0;
    for (int i = 0; i < G * T; i++) {
      inputs[i] = (int)(test_rand_u64(&rng) % 13);
      targets[i] = (i % 5 == 4) ? -1 : (int)(test_rand_u64(&rng) % 13);
      doc_start[i] = (i % T == 0) || (i % T == 7);
      loss_tokens += targets[i] >= 0;
    }
    real weight = (real)(1.0 / loss_tokens);
    params_zero_grads(wp);
    model_reset_step_stats(whole);
    double whole_loss = model_forward(whole, inputs, targets, doc_start, G, T, weight);
    model_backward(whole);

    size_t offset = (size_t)world.dp_rank * ROWS_PER_RANK * T;
    params_zero_grads(pp);
    model_reset_step_stats(part);
    double part_loss = model_forward(part, inputs + offset, targets + offset, doc_start + offset, ROWS_PER_RANK, T,
                                     weight);
    model_backward(part);
    world_sum_doubles(&world, &part_loss, 1);
    optimizer_reduce_gradients(&part_opt);
    for (int l = 0; l < mc.num_layers; l++) {
      if (model_max_logits(part, l)) world_max_reals(&world, model_max_logits(part, l), (size_t)mc.mla_heads);
      if (model_expert_load(part, l)) world_sum_doubles(&world, model_expert_load(part, l), (size_t)mc.num_experts);
    }
    if (fabs(whole_loss - part_loss) > 1e-10 * fabs(whole_loss)) {
      fprintf(stderr, "rank %d step %d: loss %.15g vs %.15g\n", world.rank, step, part_loss, whole_loss);
      failures++;
    }
    // The reduced gradients: this rank's range holds the sum (the rest is its own contribution).
    const ArenaRange own = part_opt.owned;
    expect_close("owned gradients", pp->grads + own.begin, wp->grads + own.begin, own.end - own.begin, 1e-11,
                 world.rank);
    real norm[2] = {(real)sqrt(optimizer_grad_norm_squared(&whole_opt)), (real)sqrt(optimizer_grad_norm_squared(&part_opt))};
    expect_close("global gradient norm", &norm[1], &norm[0], 1, 1e-12, world.rank);
    // Clipping active (a tenth of the norm), as the trainer sets it.
    whole_opt.grad_scale = grad_clip_scale(norm[0], norm[0] / 10);
    part_opt.grad_scale = grad_clip_scale(norm[1], norm[1] / 10);
    for (int l = 0; l < mc.num_layers; l++)
      if (model_max_logits(part, l))
        expect_close("max logits", model_max_logits(part, l), model_max_logits(whole, l), (size_t)mc.mla_heads, 1e-12,
                     world.rank);
    OptimizerReport a = optimizer_step(&whole_opt, optimizer_position(&whole_opt, step));
    OptimizerReport b = optimizer_step(&part_opt, optimizer_position(&part_opt, step));
    if (a.clipped_heads != b.clipped_heads) failures++;
    expect_close("weights after the step", pp->values, wp->values, wp->total, 1e-11, world.rank);
    expect_close("optimizer state 1 of the range", part_opt.state1, whole_opt.state1 + own.begin, own.end - own.begin,
                 1e-11, world.rank);
    expect_close("optimizer state 2 of the range", part_opt.state2, whole_opt.state2 + own.begin, own.end - own.begin,
                 1e-11, world.rank);
  }
  free(inputs); free(targets); free(doc_start);
  optimizer_free(&whole_opt); optimizer_free(&part_opt);
  model_free(whole); model_free(part);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int size;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (int ep = 1; ep <= size; ep *= 2) {
    World world;
    world_init(&world, &argc, &argv, size, ep, 1);
    run_layout(&world, size);
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (world.rank == 0) printf("data parallel on %d ranks, ep %d: %s\n", size, ep, total ? "FAILED" : "ok");
    world_finalize(&world);
  }
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Finalize();
  return total ? 1 : 0;
}
