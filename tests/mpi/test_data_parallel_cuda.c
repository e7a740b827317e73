// Data and expert parallelism on GPUs with NCCL (label gpu-mpi; mpirun -np 2 or 4, one GPU per rank):
// the tiny model trained for STEPS steps on np ranks (ep = 1, 2, ... dividing the ranks) against one
// GPU that runs the same global batch as np micro-batches of the same rows (gradient accumulation), so
// both sides run the same shapes. What may differ: the order of fp32 gradient sums (NCCL's sum against
// accumulation in the arena), and with ep > 1 the expert GEMMs' row counts (rows of several ranks in
// one GEMM) and the order of the expert weight-gradient sums. Checked each step: loss (relative
// LOSS_TOL), gradients after the all-reduce (relative Frobenius GRAD_TOL), weights after the optimizer
// step (WEIGHT_TOL), and at the end that every rank holds bit-identical weights.
// Where the gradients differ in their last bits (NCCL's sum over 4 ranks is ordered differently from
// the accumulation; ep > 1), training amplifies them: Muon's bf16 Newton-Schulz turns 4e-8 in the
// gradients into 3e-5 in the weights, the bf16 weight copies round differently, near-tied router
// choices flip, and after a few free steps the gradients differ by percents (seen on H200, 8 free
// steps: np 4 dp: loss 1.2e-4, gradients 0.2, weights 6.9e-3; np 2 ep 2: 2.6e-4, 0.18, 5.8e-3; np 2 dp
// stays bit-identical, a + b being order-free). So before every step the one-GPU side takes the ranks'
// weights and optimizer state (gathered from the ranks' ranges: the optimizer is sharded, ZeRO-1), and
// each step is checked from the same state. Gradients are compared on this rank's optimizer range, the
// only part the ranged reduction sums.
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/comm.h"
#include "dist/world.h"
#include "kernels/device.h"
#include "tests/testing.h"
#include "train/model.h"
#include "train/model_gpu.h"
#include "train/optimizer.h"

#define T 128
#define ROWS_PER_RANK 2
#define STEPS 8
#define LOSS_TOL 1e-5
#define GRAD_TOL 1e-6
#define WEIGHT_TOL 2e-4

static int failures = 0;

static void expect(bool ok, const char *what, double value, double tolerance, int rank, int step) {
  if (!ok) {
    fprintf(stderr, "rank %d step %d: %s %.3g > %.1g\n", rank, step, what, value, tolerance);
    failures++;
  }
}

static Config tiny_config(void) {
  Config config;
  config_set_defaults(&config);
  char path[1024];
  snprintf(path, sizeof path, "%s/configs/models/tiny.ini", getenv("KLT_SOURCE_DIR") ? getenv("KLT_SOURCE_DIR") : ".");
  config_load_file(&config, path);
  const char *overrides[] = {"stage.steps=8", "stage.warmup=1", "train.device=cuda"};
  for (size_t i = 0; i < sizeof overrides / sizeof overrides[0]; i++) config_set_override(&config, overrides[i]);
  return config;
}

// The device gradients as `real` on the host.
static void download_grads(Model *model, real *out) {
  const ParamRegistry *r = model_params(model);
  float *staging = malloc(r->total * sizeof(float));
  device_download(staging, gpu_model_params(model_gpu(model))->grads, r->total * sizeof(float));
  for (size_t i = 0; i < r->total; i++) out[i] = staging[i];
  free(staging);
}

// The one-GPU side's whole optimizer state from the ranks' ranges (each rank holds only its own).
static void gather_states(Optimizer *whole, Optimizer *part, const World *world, size_t total) {
  const size_t owned = part->owned.end - part->owned.begin;
  float *mine = malloc((owned ? owned : 1) * sizeof(float)), *all = malloc(total * sizeof(float));
  int *counts = malloc(2 * sizeof(int) * (size_t)world->size), *displacements = counts + world->size;
  for (int r = 0; r < world->size; r++) {
    counts[r] = (int)(part->plan.cuts[r + 1] - part->plan.cuts[r]);
    displacements[r] = (int)part->plan.cuts[r];
  }
  float *device[2][2] = {{part->device_state1, whole->device_state1}, {part->device_state2, whole->device_state2}};
  for (int k = 0; k < 2; k++) {
    device_download(mine, device[k][0], owned * sizeof(float));
    MPI_Allgatherv(mine, (int)owned, MPI_FLOAT, all, counts, displacements, MPI_FLOAT, MPI_COMM_WORLD);
    device_upload(device[k][1], all, total * sizeof(float));
  }
  free(mine);
  free(all);
  free(counts);
}

// One layout: size ranks, experts over groups of ep ranks. Returns the worst errors seen.
static void run_layout(World *world, double worst[4]) {
  const int size = world->size, G = ROWS_PER_RANK * size;
  Config config = tiny_config();
  ModelConfig mc;
  model_config_from(&mc, &config);
  World alone = {.rank = 0, .size = 1, .dp = 1, .ep = 1, .cp = 1, .comm = NULL};
  Model *whole = model_create_on(&mc, ROWS_PER_RANK, T, 11, &alone, true);
  Model *part = model_create_on(&mc, ROWS_PER_RANK, T, 11, world, true);
  Optimizer whole_opt, part_opt;
  optimizer_create(&whole_opt, whole, &config, &alone);
  optimizer_create(&part_opt, part, &config, world);
  optimizer_state_to_device(&whole_opt);
  optimizer_state_to_device(&part_opt);
  ParamRegistry *wp = model_params(whole), *pp = model_params(part);
  real *wgrad = test_alloc(wp->total), *pgrad = test_alloc(wp->total);

  int *inputs = malloc(sizeof(int) * G * T), *targets = malloc(sizeof(int) * G * T);
  unsigned char *doc_start = calloc((size_t)G * T, 1);
  uint64_t rng = 99;
  for (int step = 0; step < STEPS; step++) {
    if (step > 0) {  // the one-GPU side from the ranks' state (see the top)
      memcpy(wp->values, pp->values, wp->total * sizeof(real));
      model_weights_to_device(whole);
      gather_states(&whole_opt, &part_opt, world, wp->total);
    }
    long loss_tokens = 0;
    for (int i = 0; i < G * T; i++) {
      inputs[i] = (int)(test_rand_u64(&rng) % (uint64_t)mc.vocab_size);
      targets[i] = (i % 7 == 3) ? -1 : (int)(test_rand_u64(&rng) % (uint64_t)mc.vocab_size);
      doc_start[i] = (i % T == 0) || (i % T == 77);
      loss_tokens += targets[i] >= 0;
    }
    real weight = (real)(1.0 / loss_tokens);
    const size_t slice = (size_t)ROWS_PER_RANK * T;
    // One GPU: the global batch as size micro-batches, gradients accumulated.
    model_zero_grads(whole);
    model_reset_step_stats(whole);
    double whole_loss = 0;
    for (int r = 0; r < size; r++) {
      whole_loss += model_forward(whole, inputs + r * slice, targets + r * slice, doc_start + r * slice,
                                  ROWS_PER_RANK, T, weight);
      model_backward(whole);
    }
    // This rank's slice; the sums over ranks as the trainer does them.
    model_zero_grads(part);
    model_reset_step_stats(part);
    size_t offset = (size_t)world->dp_rank * slice;
    double part_loss = model_forward(part, inputs + offset, targets + offset, doc_start + offset, ROWS_PER_RANK, T,
                                     weight);
    model_backward(part);
    world_sum_doubles(world, &part_loss, 1);
    optimizer_reduce_gradients(&part_opt);
    for (int l = 0; l < mc.num_layers; l++) {
      if (model_max_logits(part, l)) world_max_reals(world, model_max_logits(part, l), (size_t)mc.mla_heads);
      if (model_expert_load(part, l)) world_sum_doubles(world, model_expert_load(part, l), (size_t)mc.num_experts);
    }
    double loss_error = fabs(whole_loss - part_loss) / fabs(whole_loss);
    expect(loss_error <= LOSS_TOL, "loss relative error", loss_error, LOSS_TOL, world->rank, step);
    download_grads(whole, wgrad);
    download_grads(part, pgrad);
    const ArenaRange own = part_opt.owned;
    double grad_error = test_rel_error(pgrad + own.begin, wgrad + own.begin, own.end - own.begin);
    expect(grad_error <= GRAD_TOL, "gradient relative error", grad_error, GRAD_TOL, world->rank, step);
    // The global norm from the ranges (a scalar all-reduce) against the one GPU's.
    double whole_norm = sqrt(optimizer_grad_norm_squared(&whole_opt)), part_norm = sqrt(optimizer_grad_norm_squared(&part_opt));
    double norm_error = fabs(part_norm - whole_norm) / whole_norm;
    expect(norm_error <= GRAD_TOL, "gradient norm relative error", norm_error, GRAD_TOL, world->rank, step);
    for (int l = 0; l < mc.num_layers; l++)
      if (model_max_logits(part, l)) {
        double e = test_rel_error(model_max_logits(part, l), model_max_logits(whole, l), (size_t)mc.mla_heads);
        expect(e <= LOSS_TOL, "max logit relative error", e, LOSS_TOL, world->rank, step);
      }
    optimizer_step(&whole_opt, optimizer_position(&whole_opt, step));
    optimizer_step(&part_opt, optimizer_position(&part_opt, step));
    model_weights_to_host(whole);
    model_weights_to_host(part);
    double weight_error = test_rel_error(pp->values, wp->values, wp->total);
    expect(weight_error <= WEIGHT_TOL, "weight relative error", weight_error, WEIGHT_TOL, world->rank, step);
    if (world->rank == 0)
      printf("  step %d: loss %.6f vs %.6f (rel %.2e), grads rel %.2e, weights rel %.2e\n", step + 1,
             part_loss / loss_tokens, whole_loss / loss_tokens, loss_error, grad_error, weight_error);
    worst[0] = fmax(worst[0], loss_error);
    worst[1] = fmax(worst[1], grad_error);
    worst[2] = fmax(worst[2], weight_error);
  }
  // Every rank holds the same replica, bit for bit.
  real *first = test_copy(pp->values, pp->total);
  MPI_Bcast(first, (int)pp->total, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  double spread = test_max_abs_diff(pp->values, first, pp->total);
  expect(spread == 0, "weights differ across ranks by", spread, 0, world->rank, STEPS);
  worst[3] = fmax(worst[3], spread);
  free(first);
  free(inputs); free(targets); free(doc_start);
  free(wgrad); free(pgrad);
  optimizer_free(&whole_opt); optimizer_free(&part_opt);
  model_free(whole); model_free(part);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int size;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (int ep = 1; ep <= size; ep *= 2) {
    if (8 % ep != 0) continue;  // the tiny model's 8 experts
    World world;
    world_init(&world, &argc, &argv, size, ep, 1);
    comm_select_device(&world);
    comm_create(&world);
    if (world.rank == 0) printf("GPU data parallel on %d ranks, ep %d:\n", size, ep);
    double worst[4] = {0, 0, 0, 0};
    int failures_before = failures;
    run_layout(&world, worst);
    int total = 0, mine = failures - failures_before;
    MPI_Allreduce(&mine, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (world.rank == 0)
      printf("GPU data parallel on %d ranks, ep %d: %s (worst: loss %.2e, gradients %.2e, weights %.2e relative; "
             "ranks' weights differ by %.1e)\n",
             size, ep, total ? "FAILED" : "ok", worst[0], worst[1], worst[2], worst[3]);
    fflush(stdout);
    comm_destroy(world.comm);
    world.comm = NULL;
    world_finalize(&world);
  }
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Finalize();
  return total ? 1 : 0;
}
