// One training step of the tiny model on the GPU and on the CPU from the same weights and batch: the
// losses agree to bf16 tolerance and every parameter's gradient is close; then a few optimizer steps
// on the GPU lower the loss on that batch.
#include <math.h>
#include <string.h>

#include "kernels/device.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"
#include "train/model.h"
#include "train/model_gpu.h"
#include "train/optimizer.h"

#define B 2
#define T 200

static Config tiny_run_config(void) {
  Config config;
  config_set_defaults(&config);
  char path[1024];
  snprintf(path, sizeof path, "%s/configs/models/tiny.ini", getenv("KLT_SOURCE_DIR"));
  config_load_file(&config, path);
  return config;
}

static void make_batch(int *inputs, int *targets, unsigned char *doc_start, int vocab) {
  uint64_t rng = 42;
  for (int i = 0; i < B * T; i++) {
    inputs[i] = (int)(test_rand_u64(&rng) % (uint64_t)vocab);
    targets[i] = i % 17 == 5 ? -1 : (int)(test_rand_u64(&rng) % (uint64_t)vocab);
    doc_start[i] = (i % T) == 0 || (i % T) == 77 || (i % T) == 128;  // documents inside chunks and on a boundary
  }
}

Test(model_cuda, one_step_matches_cpu) {
  Config config = tiny_run_config();
  ModelConfig mc;
  model_config_from(&mc, &config);
  World world = {.rank = 0, .size = 1, .dp = 1, .ep = 1, .cp = 1};
  Model *cpu = model_create(&mc, B, T, 7, &world);
  Model *gpu = model_create_on(&mc, B, T, 7, &world, true);
  // The same bf16-representable weights on both sides: what is left is the GPU's arithmetic. The router
  // is pinned (zero weights, distinct biases: every token picks the same experts), because bf16 rounding
  // flips near-tied expert choices, and one flipped token moves every gradient upstream of it by far more
  // than the arithmetic does. Routing with live scores is compared op by op in test_moe_cuda.
  ParamRegistry *cpu_params = model_params(cpu), *gpu_params = model_params(gpu);
  gpu_round_bf16(cpu_params->values, cpu_params->total);
  for (int i = 0; i < cpu_params->count; i++) {
    const ParamInfo *p = &cpu_params->params[i];
    real *value = cpu_params->values + p->offset;
    if (strstr(p->name, "block_sparse_moe.gate.weight")) memset(value, 0, p->numel * sizeof(real));
    if (strstr(p->name, "e_score_correction_bias"))
      for (size_t e = 0; e < p->numel; e++) value[e] = (real)(0.125 * (double)e);
  }
  memcpy(gpu_params->values, cpu_params->values, cpu_params->total * sizeof(real));
  model_weights_to_device(gpu);
  static int inputs[B * T], targets[B * T];
  static unsigned char doc_start[B * T];
  make_batch(inputs, targets, doc_start, mc.vocab_size);
  int loss_tokens = 0;
  for (int i = 0; i < B * T; i++) loss_tokens += targets[i] >= 0;
  const real weight = (real)(1.0 / loss_tokens);

  params_zero_grads(model_params(cpu));
  double cpu_loss = model_forward(cpu, inputs, targets, doc_start, B, T, weight) / loss_tokens;
  model_backward(cpu);
  model_zero_grads(gpu);
  double gpu_loss = model_forward(gpu, inputs, targets, doc_start, B, T, weight) / loss_tokens;
  model_backward(gpu);
  cr_log_info("loss: cpu %.6f gpu %.6f", cpu_loss, gpu_loss);
  cr_expect(fabs(gpu_loss - cpu_loss) <= 1e-2 * fabs(cpu_loss), "loss cpu %.6f gpu %.6f", cpu_loss, gpu_loss);

  const ParamRegistry *r = model_params(cpu);
  GpuParams *gp = gpu_model_params(model_gpu(gpu));
  float *grads = malloc(r->total * sizeof(float));
  device_download(grads, gp->grads, r->total * sizeof(float));
  real *gpu_grads = test_alloc(r->total);
  for (size_t i = 0; i < r->total; i++) gpu_grads[i] = grads[i];
  double worst = 0;
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    if (p->group == GROUP_NONE) continue;
    double norm = 0;
    for (size_t j = 0; j < p->numel; j++) norm += r->grads[p->offset + j] * r->grads[p->offset + j];
    if (norm == 0) continue;  // an expert no token chose
    double err = test_rel_error(gpu_grads + p->offset, r->grads + p->offset, p->numel);
    int bad = 0;
    for (size_t j = 0; j < p->numel; j++) bad += !isfinite(gpu_grads[p->offset + j]);
    if (err > worst) worst = err;
    cr_log_info("%-60s %.3e", p->name, err);
    // A tensor of a few values (a per-head A_log) holds sums over every token and channel of terms of
    // both signs: they cancel, and the bf16 rounding of the terms stays. Measured on an H100: A_log
    // 5.9e-2, every other tensor below 2.4e-2.
    const double tolerance = p->numel <= 64 ? 1e-1 : 5e-2;
    cr_expect(bad == 0 && err <= tolerance, "%s: gradient relative error %.3e (%d non-finite; tolerance %.0e)",
              p->name, err, bad, tolerance);
  }
  cr_log_info("worst per-tensor gradient relative error %.3e", worst);
  free(grads);
  free(gpu_grads);

  // Training on the GPU: five steps on this batch lower its loss.
  Optimizer opt;
  optimizer_create(&opt, gpu, &config, NULL);
  optimizer_state_to_device(&opt);
  double first = gpu_loss, last = 0;
  for (int step = 0; step < 5; step++) {
    model_zero_grads(gpu);
    model_reset_step_stats(gpu);
    last = model_forward(gpu, inputs, targets, doc_start, B, T, weight) / loss_tokens;
    model_backward(gpu);
    optimizer_step(&opt, optimizer_position(&opt, step));
  }
  cr_log_info("loss over 5 GPU steps: %.4f -> %.4f", first, last);
  cr_expect(last < first - 0.1, "five steps did not lower the loss: %.4f -> %.4f", first, last);
  optimizer_free(&opt);
  model_free(cpu);
  model_free(gpu);
}
