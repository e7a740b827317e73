// Data and expert parallelism on the CPU (run under mpirun -np 2 and -np 4, with ep = 1, 2, 4 where it
// divides the ranks): each rank runs the model on its slice of the global batch, its experts on the
// tokens routed to them from its ep group, and the gradients are summed over ranks; this must equal one
// model run on the whole batch, and optimizer steps from those gradients must keep every rank's weights equal to
// the single-model weights. fp64 build: differences are only reduction order.
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "dist/world.h"
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
                             "stage.steps=5", "stage.warmup=1"};
  for (size_t i = 0; i < sizeof overrides / sizeof overrides[0]; i++) config_set_override(&config, overrides[i]);
  ModelConfig mc;
  model_config_from(&mc, &config);
  World alone = {.rank = 0, .size = 1, .dp = 1, .ep = 1, .cp = 1};
  Model *whole = model_create(&mc, G, T, 11, &alone);
  Model *part = model_create(&mc, ROWS_PER_RANK, T, 11, world_in);
  Optimizer whole_opt, part_opt;
  optimizer_create(&whole_opt, whole, &config);
  optimizer_create(&part_opt, part, &config);
  ParamRegistry *wp = model_params(whole), *pp = model_params(part);

  int *inputs = malloc(sizeof(int) * G * T), *targets = malloc(sizeof(int) * G * T);
  unsigned char *doc_start = calloc((size_t)G * T, 1);
  uint64_t rng = 99;
  for (int step = 0; step < 5; step++) {
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
    world_sum_reals(&world, pp->grads, pp->total);
    for (int l = 0; l < mc.num_layers; l++) {
      if (model_max_logits(part, l)) world_max_reals(&world, model_max_logits(part, l), (size_t)mc.mla_heads);
      if (model_expert_load(part, l)) world_sum_doubles(&world, model_expert_load(part, l), (size_t)mc.num_experts);
    }
    if (fabs(whole_loss - part_loss) > 1e-10 * fabs(whole_loss)) {
      fprintf(stderr, "rank %d step %d: loss %.15g vs %.15g\n", world.rank, step, part_loss, whole_loss);
      failures++;
    }
    expect_close("gradients", pp->grads, wp->grads, wp->total, 1e-11, world.rank);
    for (int l = 0; l < mc.num_layers; l++)
      if (model_max_logits(part, l))
        expect_close("max logits", model_max_logits(part, l), model_max_logits(whole, l), (size_t)mc.mla_heads, 1e-12,
                     world.rank);
    OptimizerReport a = optimizer_step(&whole_opt, optimizer_position(&whole_opt, step));
    OptimizerReport b = optimizer_step(&part_opt, optimizer_position(&part_opt, step));
    if (a.clipped_heads != b.clipped_heads) failures++;
    expect_close("weights after the step", pp->values, wp->values, wp->total, 1e-11, world.rank);
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
