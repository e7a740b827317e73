// Benchmark of the CUDA flash attention at MLA shapes (Dqk 192, Dv 128): forward and forward+backward,
// median of 20 timed calls (CUDA events), TFLOP/s counting causal FLOPs (forward 2 B H T^2/2 (Dqk + Dv),
// backward 2.5 times that) and the fraction of the H100's dense bf16 peak (989 TFLOP/s).
//   bench_attention              the small config (B 4, T 4096, H 8) and B 1, T 16384
//   bench_attention B T H [Dqk Dv [DOC_LEN]]   one shape; DOC_LEN > 0 starts a document every DOC_LEN tokens
//                                              (then FLOPs count only the pairs within documents)
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef KLT_HAVE_CUDA
#include "kernels/attention.h"

#define PEAK_TFLOPS 989.0
#define REPS 20

static int compare_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

static bf16 *random_bf16(size_t n, uint64_t *state) {
  bf16 *h = malloc(n * sizeof(bf16));
  for (size_t i = 0; i < n; i++) {  // uniform in [-1.7, 1.7): about unit variance
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    h[i] = bf16_from_float((float)((double)(*state >> 11) / 9007199254740992.0 * 3.4 - 1.7));
  }
  bf16 *d = device_alloc(n * sizeof(bf16));
  device_upload(d, h, n * sizeof(bf16));
  free(h);
  return d;
}

struct buffers {
  bf16 *q, *k, *v, *dout, *out, *dq, *dk, *dv;
  float *lse, *max_logit;
  unsigned char *doc;
};

static void run_forward(const struct buffers *x, float scale, int B, int T, int H, int Dqk, int Dv) {
  attention_forward_cuda(x->out, x->lse, x->max_logit, x->q, x->k, x->v, x->doc, scale, B, T, H, Dqk, Dv);
}
static void run_both(const struct buffers *x, float scale, int B, int T, int H, int Dqk, int Dv) {
  run_forward(x, scale, B, T, H, Dqk, Dv);
  attention_backward_cuda(x->dq, x->dk, x->dv, x->dout, x->q, x->k, x->v, x->out, x->lse, x->doc, scale, B, T, H, Dqk,
                          Dv);
}

// Median milliseconds of REPS calls, each timed on its own.
static float time_median(void (*fn)(const struct buffers *, float, int, int, int, int, int), const struct buffers *x,
                         float scale, int B, int T, int H, int Dqk, int Dv) {
  cudaStream_t stream = device_stream();
  cudaEvent_t start[REPS], stop[REPS];
  for (int i = 0; i < 3; i++) fn(x, scale, B, T, H, Dqk, Dv);
  for (int i = 0; i < REPS; i++) {
    CUDA_CHECK(cudaEventCreate(&start[i]));
    CUDA_CHECK(cudaEventCreate(&stop[i]));
  }
  for (int i = 0; i < REPS; i++) {
    CUDA_CHECK(cudaEventRecord(start[i], stream));
    fn(x, scale, B, T, H, Dqk, Dv);
    CUDA_CHECK(cudaEventRecord(stop[i], stream));
  }
  CUDA_CHECK(cudaEventSynchronize(stop[REPS - 1]));
  float ms[REPS];
  for (int i = 0; i < REPS; i++) {
    CUDA_CHECK(cudaEventElapsedTime(&ms[i], start[i], stop[i]));
    cudaEventDestroy(start[i]), cudaEventDestroy(stop[i]);
  }
  qsort(ms, REPS, sizeof(float), compare_float);
  return 0.5f * (ms[REPS / 2 - 1] + ms[REPS / 2]);
}

static void bench(int B, int T, int H, int Dqk, int Dv, int doc_len) {
  uint64_t state = 12345;
  const size_t nq = (size_t)B * T * H * Dqk, nv = (size_t)B * T * H * Dv;
  struct buffers x;
  x.q = random_bf16(nq, &state), x.k = random_bf16(nq, &state), x.v = random_bf16(nv, &state);
  x.dout = random_bf16(nv, &state);
  x.out = device_alloc(nv * 2), x.dq = device_alloc(nq * 2), x.dk = device_alloc(nq * 2), x.dv = device_alloc(nv * 2);
  x.lse = device_alloc((size_t)B * T * H * 4), x.max_logit = device_alloc(H * 4);
  float *lowest = malloc(H * sizeof(float));
  for (int h = 0; h < H; h++) lowest[h] = -INFINITY;
  device_upload(x.max_logit, lowest, H * sizeof(float));
  free(lowest);
  x.doc = NULL;
  if (doc_len > 0) {
    unsigned char *doc = calloc((size_t)B * T, 1);
    for (size_t t = 0; t < (size_t)B * T; t++) doc[t] = (t % T) % doc_len == 0;
    x.doc = device_alloc((size_t)B * T);
    device_upload(x.doc, doc, (size_t)B * T);
    free(doc);
  }
  const float scale = 1.0f / sqrtf((float)Dqk);
  const float fwd_ms = time_median(run_forward, &x, scale, B, T, H, Dqk, Dv);
  const float both_ms = time_median(run_both, &x, scale, B, T, H, Dqk, Dv);
  // Causal FLOPs: 2 B H (T^2 / 2) (Dqk + Dv) for one document per row; with documents, the sum of
  // L^2 / 2 over the documents' lengths L replaces T^2 / 2 (the work the mask leaves).
  double pairs = (double)T * T / 2;
  if (doc_len > 0) {
    pairs = 0;
    for (int t0 = 0; t0 < T; t0 += doc_len) {
      double L = T - t0 < doc_len ? T - t0 : doc_len;
      pairs += L * L / 2;
    }
  }
  const double fwd_flops = 2.0 * B * H * pairs * (Dqk + Dv), both_flops = 3.5 * fwd_flops;
  const double fwd_tf = fwd_flops / (fwd_ms * 1e-3) / 1e12, both_tf = both_flops / (both_ms * 1e-3) / 1e12;
  const double bwd_ms = both_ms - fwd_ms, bwd_tf = 2.5 * fwd_flops / (bwd_ms * 1e-3) / 1e12;
  printf("| %d | %5d | %2d | %3d | %3d | %5s | %8.3f | %6.1f | %5.1f%% | %8.3f | %6.1f | %8.3f | %6.1f | %5.1f%% |\n", B,
         T, H, Dqk, Dv, doc_len > 0 ? "yes" : "no", fwd_ms, fwd_tf, 100 * fwd_tf / PEAK_TFLOPS, bwd_ms, bwd_tf,
         both_ms, both_tf, 100 * both_tf / PEAK_TFLOPS);
  fflush(stdout);
  device_free(x.q), device_free(x.k), device_free(x.v), device_free(x.dout), device_free(x.out);
  device_free(x.dq), device_free(x.dk), device_free(x.dv), device_free(x.lse), device_free(x.max_logit);
  if (x.doc) device_free(x.doc);
}

int main(int argc, char **argv) {
  device_select(0);
  printf("causal attention, bf16, median of %d calls; TFLOP/s on causal FLOPs; %% of %.0f TFLOP/s (H100 dense bf16)\n",
         REPS, PEAK_TFLOPS);
  printf("| B | T | H | Dqk | Dv | docs | fwd ms | fwd TFLOP/s | fwd %%peak | bwd ms | bwd TFLOP/s | fwd+bwd ms | "
         "fwd+bwd TFLOP/s | fwd+bwd %%peak |\n");
  printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  if (argc >= 4) {
    int Dqk = argc >= 6 ? atoi(argv[4]) : 192, Dv = argc >= 6 ? atoi(argv[5]) : 128;
    bench(atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), Dqk, Dv, argc >= 7 ? atoi(argv[6]) : 0);
    return 0;
  }
  bench(4, 4096, 8, 192, 128, 0);
  bench(1, 16384, 8, 192, 128, 0);
  return 0;
}
#else
int main(void) {
  printf("bench_attention: built without CUDA (KLT_HAVE_CUDA unset); nothing to measure\n");
  return 0;
}
#endif
