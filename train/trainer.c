// The training loop; see trainer.h.
#include "train/trainer.h"

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/check.h"
#include "data/loader.h"
#include "dist/comm.h"
#include "dist/watchdog.h"
#include "dist/world.h"
#include "kernels/device.h"
#include "optim/grad_norm.h"
#include "optim/router_bias.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/model.h"
#include "train/model_gpu.h"
#include "train/optimizer.h"

// Dense bf16 tensor-core peak of an H100 / H200 SXM (the same chip): the denominator of MFU.
#define HOPPER_BF16_PEAK_FLOPS 989e12

// Set by SIGTERM / SIGINT: the loop saves a checkpoint after the current step and exits cleanly.
static volatile sig_atomic_t stop_requested = 0;
static void request_stop(int signal_number) { stop_requested = signal_number; }

// Each stage visits the data in its own order: the loader's stage number comes from the stage's name.
static int stage_number(const char *name) {
  uint32_t hash = 2166136261u;  // FNV-1a
  for (const char *p = name; *p; p++) hash = (hash ^ (unsigned char)*p) * 16777619u;
  return (int)(hash & 0x7fffffff);
}

// The merged configuration as INI text, stored in every checkpoint.
static char *config_text(const Config *c) {
  char *text = NULL;
  size_t size = 0;
  FILE *f = open_memstream(&text, &size);
  CHECK(f != NULL, "open_memstream failed");
  config_print(c, f);
  fclose(f);
  return text;
}

static void save(const char *run_dir, long step, const Config *c, Optimizer *opt, const Loader *loader,
                 const World *world, const char *text) {
  CheckpointMeta meta = {.step = step, .tokens = (double)step * c->stage.global_batch * c->stage.seq_len,
                         .loader = loader_state(loader), .optimizer_step = opt->step};
  snprintf(meta.model_name, sizeof meta.model_name, "%.127s", c->model.name);
  optimizer_state_to_host(opt);
  checkpoint_save(run_dir, &meta, model_params(opt->model), opt->state1, opt->state2, &opt->owned, text, c->ckpt.keep,
                  world);
}

static double resident_megabytes(void) {
  long pages = 0, resident = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (!f) return NAN;
  if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
  fclose(f);
  return (double)resident * (double)sysconf(_SC_PAGESIZE) / 1e6;
}

static long count_loss_tokens(const Batch *batch) {
  long count = 0;
  for (long i = 0; i < (long)batch->B * batch->T; i++) count += batch->targets[i] >= 0;
  return count;
}

// Runs the model over one rank-local batch in micro-batches of at most max_rows rows; returns the
// summed token loss. With backward, gradients accumulate over the micro-batches. With correct, adds the
// number of loss positions whose most likely token is the target.
static double forward_backward(Model *model, const Batch *batch, int max_rows, real loss_weight, bool backward,
                               double *correct) {
  double loss = 0;
  for (int row = 0; row < batch->B; row += max_rows) {
    int rows = batch->B - row < max_rows ? batch->B - row : max_rows;
    size_t offset = (size_t)row * batch->T;
    loss += model_forward(model, batch->inputs + offset, batch->targets + offset, batch->doc_start + offset, rows,
                          batch->T, loss_weight);
    if (correct) {
      const int *predictions = model_predictions(model);
      for (size_t i = 0; i < (size_t)rows * batch->T; i++)
        *correct += batch->targets[offset + i] >= 0 && predictions[i] == batch->targets[offset + i];
    }
    if (backward) model_backward(model);
  }
  return loss;
}

typedef struct {
  double loss;
  double accuracy;         // share of loss positions where the most likely token is the target
  double unigram_entropy;  // of the same target tokens: the loss of the best context-free model
  long tokens;
} Validation;

// With expert parallelism every forward is collective over the ep group, but the last validation batch
// can give ranks different numbers of rows (even none): the most forwards of any rank (agreed on
// before any of them), and a rank with fewer runs the missing ones on one row without loss positions,
// so no rank waits in an all-to-all alone.
static int most_forwards(int forwards, const World *world) {
  if (world->ep == 1) return forwards;
  real most = (real)forwards;
  world_max_reals(world, &most, 1);
  return (int)most;
}

static void pad_forwards(Model *model, int forwards, int most, int T) {
  if (most <= forwards) return;
  int *tokens = klt_calloc((size_t)T, sizeof(int)), *no_targets = klt_malloc((size_t)T * sizeof(int));
  unsigned char *doc_start = klt_calloc((size_t)T, 1);
  for (int t = 0; t < T; t++) no_targets[t] = -1;
  doc_start[0] = 1;
  for (int i = forwards; i < most; i++) model_forward(model, tokens, no_targets, doc_start, 1, T, 0);
  free(tokens);
  free(no_targets);
  free(doc_start);
}

static Validation validate(Model *model, Loader *loader, Batch *batch, int max_rows, const World *world,
                           const Config *c) {
  int batches = loader_val_batches(loader);
  if (c->train.val_batches < batches) batches = c->train.val_batches;
  int V = model_config(model)->vocab_size;
  // Counts per token, then the summed loss, the number of loss tokens and of correct predictions.
  double *histogram = klt_calloc((size_t)V + 3, sizeof(double));
  for (int i = 0; i < batches; i++) {
    loader_val_batch(loader, i, batch);
    int forwards = (batch->B + max_rows - 1) / max_rows, most = most_forwards(forwards, world);
    histogram[V] += forward_backward(model, batch, max_rows, 0, false, &histogram[V + 2]);
    pad_forwards(model, forwards, most, batch->T);
    for (long j = 0; j < (long)batch->B * batch->T; j++)
      if (batch->targets[j] >= 0) {
        histogram[batch->targets[j]] += 1;
        histogram[V + 1] += 1;
      }
  }
  world_sum_doubles(world, histogram, (size_t)V + 3);
  Validation v = {.tokens = (long)histogram[V + 1]};
  v.loss = histogram[V] / fmax(histogram[V + 1], 1);
  v.accuracy = histogram[V + 2] / fmax(histogram[V + 1], 1);
  for (int t = 0; t < V; t++)
    if (histogram[t] > 0) {
      double p = histogram[t] / histogram[V + 1];
      v.unigram_entropy -= p * log(p);
    }
  free(histogram);
  return v;
}

int train_run(const Config *c, const ModelConfig *mc, const TrainOptions *options) {
  World world;
  world_init(&world, NULL, NULL, c->parallel.dp, c->parallel.ep, c->parallel.cp);
  const bool main_rank = world_is_main(&world);
  const bool cuda = strcmp(c->train.device, "cuda") == 0;
#ifdef KLT_HAVE_CUDA
  if (cuda) {
    comm_select_device(&world);  // one GPU per rank of the node
    comm_create(&world);         // NCCL over the ranks (none on one rank)
  }
#endif
  if (c->parallel.cp > 1) klt_user_error("[parallel] cp = %d: context parallelism is not available yet; use cp = 1", c->parallel.cp);

  const int G = c->stage.global_batch, T = c->stage.seq_len;
  const int local_batch = G / c->parallel.dp;
  const int micro_rows = local_batch / c->train.micro_batches;

  LoaderConfig lc = {.path = c->data.path, .seq_len = T, .global_batch = G, .dp_rank = world.dp_rank,
                     .dp_size = c->parallel.dp, .seed = (uint64_t)c->train.seed, .stage = stage_number(c->stage.name),
                     .val_fraction = c->data.val_fraction, .vocab_size = (unsigned)mc->vocab_size};
  Model *model = model_create_on(mc, micro_rows, T, (uint64_t)c->train.seed, &world, cuda);
  Optimizer opt;
  optimizer_create(&opt, model, c, &world);  // sharded over the ranks (ZeRO-1)
  // Where to start: a checkpoint to resume (weights, optimizer, data position, step), the weights of a
  // previous stage ([stage] init_from), or the fresh initialization.
  long first_step = 0;
  LoaderState resume_state, *resume = NULL;
  char path[2048] = "";
  if (options->resume) {
    if (options->resume_path) snprintf(path, sizeof path, "%s", options->resume_path);
    else if (!checkpoint_find_latest(c->train.run_dir, path, sizeof path)) {
      if (main_rank) printf("klt-train: --resume: no checkpoint in %s/ckpt yet, starting fresh\n", c->train.run_dir);
      path[0] = '\0';
    }
  }
  if (path[0]) {
    CheckpointMeta meta;
    checkpoint_load(path, &meta, model_params(model), opt.state1, opt.state2, &opt.owned, main_rank);
    if (strcmp(meta.model_name, c->model.name) != 0)
      klt_user_error("checkpoint %s is of model '%s', but the config trains '%s'", path, meta.model_name, c->model.name);
    first_step = meta.step;
    opt.step = meta.optimizer_step;
    resume_state = meta.loader;
    resume = &resume_state;
    if (main_rank) printf("klt-train: resuming from %s at step %ld\n", path, first_step);
  } else if (c->stage.init_from[0]) {
    CheckpointMeta meta;
    checkpoint_load(c->stage.init_from, &meta, model_params(model), NULL, NULL, NULL, main_rank);
    if (main_rank) printf("klt-train: weights from %s (step %ld), fresh optimizer and data order\n", c->stage.init_from, meta.step);
  }
  optimizer_state_to_device(&opt);
  Loader *loader = loader_open(&lc, resume);
  char *text = config_text(c);
  signal(SIGTERM, request_stop);
  signal(SIGINT, request_stop);
  MetricsLog metrics = {0};
  if (main_rank) metrics_open(&metrics, c->train.run_dir);

  ParamCount count = model_count_params(mc);
  const double flops_per_token = model_flops_per_token(mc, T);
  if (main_rank) {
    printf("klt-train: model %s, %.3fM parameters (%.3fM active per token), %d layers\n", c->model.name,
           count.total / 1e6, count.active / 1e6, mc->num_layers);
    printf("klt-train: %d ranks (dp %d, ep %d), global batch %d x %d tokens, %d micro-batches, %lld steps, "
           "optimizer %s, data %s\n",
           world.size, c->parallel.dp, c->parallel.ep, G, T, c->train.micro_batches, c->stage.steps,
           c->optim.optimizer, c->data.path);
    fflush(stdout);
  }

  Batch batch;
  loader_alloc_batch(loader, &batch);
  double run_start = klt_now_seconds();
  Watchdog *watchdog = watchdog_start_with(c->train.step_timeout, world.rank, world.comm);
  const bool profile = getenv("KLT_PROFILE") != NULL;  // see README: where the step's time goes
  const bool profile_comm = profile || getenv("KLT_PROFILE_COMM") != NULL;  // only the collectives' times
  const bool bench = getenv("KLT_BENCH") != NULL;  // throughput runs: no checkpoint or validation at the end
  double optimizer_seconds = 0;
  long profiled_steps = 0;
#ifdef KLT_HAVE_CUDA
  double comm_seconds[3] = {0, 0, 0};  // NCCL gradient reduction, all-to-all, weight all-gather of the steps
#endif
  for (long step = first_step; step < c->stage.steps; step++) {
    watchdog_arm(watchdog, step);
#ifdef KLT_HAVE_CUDA
    comm_profile_reset();
#endif
    double start = klt_now_seconds();
    loader_next_batch(loader, &batch);
    double loss_tokens = (double)count_loss_tokens(&batch);
    world_sum_doubles(&world, &loss_tokens, 1);
    model_zero_grads(model);
    model_reset_step_stats(model);
    double loss = forward_backward(model, &batch, micro_rows, (real)(1.0 / fmax(loss_tokens, 1)), true, NULL);
    world_sum_doubles(&world, &loss, 1);
    loss /= fmax(loss_tokens, 1);
    // Gradients summed over the ranks into each rank's optimizer range (ZeRO-1): data parallel, and with
    // ep > 1 each expert's gradient comes from its owners only (zeros elsewhere), so the sum gives the
    // range's owner every expert's gradient in it.
    optimizer_reduce_gradients(&opt);
    for (int l = 0; l < mc->num_layers; l++) {
      if (model_max_logits(model, l)) world_max_reals(&world, model_max_logits(model, l), (size_t)mc->mla_heads);
      if (model_expert_load(model, l)) world_sum_doubles(&world, model_expert_load(model, l), (size_t)mc->num_experts);
    }
    double grad_norm = sqrt(optimizer_grad_norm_squared(&opt));
    opt.grad_scale = c->optim.grad_clip > 0 ? grad_clip_scale(grad_norm, (real)c->optim.grad_clip) : 1;
    // Load imbalance (max load / mean load) per MoE layer, from the reduced loads, before the bias moves.
    double imbalance[MODEL_MAX_LAYERS];
    int moe_layer[MODEL_MAX_LAYERS], moe_layers = 0;
    for (int l = 0; l < mc->num_layers; l++)
      if (model_expert_load(model, l)) {
        moe_layer[moe_layers] = l;
        imbalance[moe_layers++] = load_imbalance(model_expert_load(model, l), mc->num_experts);
      }
#ifdef KLT_HAVE_CUDA
    double optimizer_start = klt_now_seconds();
#endif
    OptimizerReport report = optimizer_step(&opt, optimizer_position(&opt, step));
#ifdef KLT_HAVE_CUDA
    if (cuda && profile) {
      device_synchronize();
      optimizer_seconds += klt_now_seconds() - optimizer_start;
    }
#endif
    double seconds = klt_now_seconds() - start;
    profiled_steps++;
#ifdef KLT_HAVE_CUDA
    comm_seconds[0] += comm_profile_seconds(COMM_KIND_ALL_REDUCE, NULL);
    comm_seconds[1] += comm_profile_seconds(COMM_KIND_ALL_TO_ALL, NULL);
    comm_seconds[2] += comm_profile_seconds(COMM_KIND_GATHER, NULL);
#endif
    double tokens_per_second = (double)G * T / seconds;

    bool last = step + 1 == c->stage.steps;
    if (main_rank && ((step + 1) % c->log.every == 0 || step == 0 || last)) {
      double memory = resident_megabytes();
#ifdef KLT_HAVE_CUDA
      if (cuda) memory = (double)device_memory_used() / 1e6;  // the GPU's, which is what runs out
#endif
      // Per GPU: the global throughput over the ranks.
      double mfu = cuda ? tokens_per_second / world.size * flops_per_token / HOPPER_BF16_PEAK_FLOPS : NAN;
      char max_logit[32] = "-";  // no MLA layer: no attention logit
      if (isfinite(report.max_logit)) snprintf(max_logit, sizeof max_logit, "%.1f", report.max_logit);
      char utilization[64] = "";
      if (cuda && world.size > 1)
        snprintf(utilization, sizeof utilization, " (%.1fK tok/s per GPU, MFU %.1f%%)",
                 tokens_per_second / world.size / 1e3, 100 * mfu);
      else if (cuda) snprintf(utilization, sizeof utilization, " (MFU %.1f%%)", 100 * mfu);
      printf("step %6ld/%lld | loss %.4f | lr %.2e | grad %.3f | %.1fK tok/s | %.2f GFLOP/s%s | max logit %s "
             "(%d clipped) | load %.2f | mem %.0f MB | %.0f ms\n",
             step + 1, c->stage.steps, loss, report.lr, grad_norm, tokens_per_second / 1e3,
             tokens_per_second * flops_per_token / 1e9, utilization, max_logit, report.clipped_heads, report.load_imbalance,
             memory, seconds * 1e3);
      fflush(stdout);
      const char *names[] = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "flops_per_second", "mfu",
                             "max_attention_logit", "clipped_heads", "load_imbalance", "memory_mb", "step_seconds",
                             "tokens"};
      double values[] = {(double)step + 1, loss, report.lr, grad_norm, tokens_per_second,
                         tokens_per_second * flops_per_token, mfu, report.max_logit,
                         report.clipped_heads, report.load_imbalance, memory, seconds,
                         (double)(step + 1) * G * T};
      metrics_write(&metrics, "step", (int)(sizeof values / sizeof values[0]), names, values);
      for (int i = 0; i < moe_layers; i++) {  // one line per MoE layer: its experts' balance this step
        const char *layer_names[] = {"step", "layer", "load_imbalance"};
        double layer_values[] = {(double)step + 1, moe_layer[i], imbalance[i]};
        metrics_write(&metrics, "moe", 3, layer_names, layer_values);
      }
    }
    // Every rank stops at the same step: a signal seen by any rank stops them all.
    double stop = stop_requested;
    world_sum_doubles(&world, &stop, 1);
    if (bench && last) break;
    if (last || stop > 0 || (c->ckpt.every > 0 && (step + 1) % c->ckpt.every == 0))
      save(c->train.run_dir, step + 1, c, &opt, loader, &world, text);
    if (stop > 0) {
      if (main_rank) printf("klt-train: stopped by a signal after step %ld; resume with --resume\n", step + 1);
      break;
    }
    if (last || (c->train.val_every > 0 && (step + 1) % c->train.val_every == 0)) {
      Validation v = validate(model, loader, &batch, micro_rows, &world, c);
      if (main_rank) {
        printf("validation at step %ld: loss %.4f, accuracy %.4f over %ld tokens (unigram entropy of these tokens "
               "%.4f)\n",
               step + 1, v.loss, v.accuracy, v.tokens, v.unigram_entropy);
        fflush(stdout);
        const char *names[] = {"step", "val_loss", "val_accuracy", "unigram_entropy", "val_tokens"};
        double values[] = {(double)step + 1, v.loss, v.accuracy, v.unigram_entropy, (double)v.tokens};
        metrics_write(&metrics, "validation", 5, names, values);
      }
    }
  }
  watchdog_stop(watchdog);
  if (profile && main_rank && profiled_steps > 0)
    printf("klt profile: optimizer %.2f ms per step (synchronized)\n", 1e3 * optimizer_seconds / profiled_steps);
  if (profile_comm && main_rank && profiled_steps > 0) {
#ifdef KLT_HAVE_CUDA
    if (world.comm)
      // "all-reduce": the gradient reduction to the optimizer ranges (launch/gpu-multi.sh reads fields 5, 8).
      printf("klt profile: NCCL all-reduce %.2f ms, all-to-all %.2f ms per step, weight all-gather %.2f ms (rank 0, "
             "synchronized)\n",
             1e3 * comm_seconds[0] / profiled_steps, 1e3 * comm_seconds[1] / profiled_steps,
             1e3 * comm_seconds[2] / profiled_steps);
#endif
  }
  if (main_rank) printf("klt-train: done in %.1f s\n", klt_now_seconds() - run_start);
  free(text);
  loader_free_batch(&batch);
  metrics_close(&metrics);
  optimizer_free(&opt);
  model_free(model);
  loader_close(loader);
#ifdef KLT_HAVE_CUDA
  comm_destroy(world.comm);
  world.comm = NULL;
#endif
  world_finalize(&world);
  return 0;
}
