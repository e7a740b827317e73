// Benchmark of the CUDA chunkwise KDA (bf16 q, k, v, out; fp32 g, beta, states; the L2 norms of q and k inside
// the op): forward and forward+backward, median of 20 timed calls after 3 warm-ups (CUDA events), with the bytes
// each must move at least (inputs and outputs at their dtypes, each once: q k v bf16, g fp32 (or the raw gate f
// bf16), beta fp32, out bf16, initial and final state fp32; the backward adds dout, dfinal_state and every
// gradient), the time that floor takes at 3.35 TB/s (H100 SXM HBM3) and the bandwidth achieved against it.
// Each shape runs with three kinds of inputs (column "inputs"):
//   op        the chunkwise op alone: q, k of unit norm, g already the log decay, U(-1, -0.01);
//   softplus  as fla's chunk_kda is timed (bench/fla_kda.py): raw q, k and the raw gate f in, the gate
//             g = -exp(A_log) softplus(f + dt_bias) (A = exp(A_log) ~ U(1, 16) per head) timed with the op,
//             forward and backward, as the model's layer runs it;
//   bounded   the same with fla's bounded gate g = -5 sigmoid(exp(A_log) (f + dt_bias)).
//   bench_kda [--op] [--reverse]       B x T x H x K = 8x4096x16x128, 2x16384x16x128, 1x65536x16x128
//   bench_kda [--op] B T H [K [DOC_LEN]]   one shape (V = K); DOC_LEN > 0 starts a document every DOC_LEN tokens
// --op: only the "op" rows (kernel A/B comparisons, bench/dev/kda_ab.sh).
// --profile: after each row's timing, one more forward+backward between cudaProfilerStart and Stop, for
//   `ncu --profile-from-start off` (bench/dev/kda_kernel_times.sh).
// --reverse: the kinds of inputs in the other order (bounded, softplus, op), to tell a real difference between
//   two rows from drift over the command.
// --dump DIR: each row's results (out, final state, every gradient) into DIR, one file an array (see dump).
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef KLT_HAVE_CUDA
#include <cuda_profiler_api.h>

#include "kernels/activation.h"
#include "kernels/kda.h"

#define HBM_TBS 3.35
#define REPS 20
#define WARMUP 3

static int compare_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

static double uniform(uint64_t *state) {
  *state = *state * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(*state >> 11) / 9007199254740992.0;
}

// rows x D bf16, each row of unit L2 norm (as the layer hands q and k to the kernel); or unnormalized.
static bf16 *random_bf16(size_t rows, int D, bool normalize, uint64_t *state) {
  bf16 *h = malloc(rows * D * sizeof(bf16));
  float *row = malloc(D * sizeof(float));
  for (size_t r = 0; r < rows; r++) {
    double ss = 0;
    for (int c = 0; c < D; c++) row[c] = (float)(uniform(state) * 3.4 - 1.7), ss += row[c] * row[c];
    const float mul = normalize ? (float)(1 / sqrt(ss + 1e-6)) : 1.0f;
    for (int c = 0; c < D; c++) h[r * D + c] = bf16_from_float(row[c] * mul);
  }
  bf16 *d = device_alloc(rows * D * sizeof(bf16));
  device_upload(d, h, rows * D * sizeof(bf16));
  free(h), free(row);
  return d;
}
static float *random_float(size_t n, double lo, double hi, uint64_t *state) {
  float *h = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) h[i] = (float)(lo + (hi - lo) * uniform(state));
  float *d = device_alloc(n * sizeof(float));
  device_upload(d, h, n * sizeof(float));
  free(h);
  return d;
}

#define GATE_LOWER_BOUND -5.0f  // fla's lower_bound in bench/fla_kda.py

struct buffers {
  int B, T, H, K, V;
  float scale;
  bf16 *q, *k, *v, *dout, *out, *dq, *dk, *dv;
  float *g, *beta, *s0, *sT, *dsT, *dg, *dbeta, *ds0;
  float *saved;  // the forward's per-chunk results, used by the backward (as in training)
  unsigned char *doc;
  // With the gate inside (`inside`): the raw gate f and the gate's parameters in, their gradients out; g above
  // is then the op's input, computed in each call (q and k are raw then).
  bool inside;
  KdaGateForm form;
  bf16 *f, *df;
  float *A_log, *dt_bias, *dA_log, *ddt_bias;
};

static void run_forward(const struct buffers *x) {
  if (x->inside) {
    kda_gate_forward_cuda(x->g, x->f, x->A_log, x->dt_bias, x->form, GATE_LOWER_BOUND, x->B * x->T, x->H, x->K);
  }
  kda_chunk_forward_cuda(x->out, x->sT, x->q, x->k, x->v, x->g, x->beta, x->s0, x->doc, x->scale, x->B, x->T, x->H,
                         x->K, x->V, x->saved);
}
static void run_both(const struct buffers *x) {
  run_forward(x);
  kda_chunk_backward_cuda(x->dq, x->dk, x->dv, x->dg, x->dbeta, x->ds0, x->dout, x->dsT, x->q, x->k, x->v, x->g,
                          x->beta, x->s0, x->doc, x->scale, x->B, x->T, x->H, x->K, x->V, x->saved);
  if (x->inside) {
    kda_gate_backward_cuda(x->df, x->dA_log, x->ddt_bias, x->dg, x->f, x->A_log, x->dt_bias, x->form,
                           GATE_LOWER_BOUND, x->B * x->T, x->H, x->K);
  }
}

// Median milliseconds of REPS calls, each timed on its own.
static float time_median(void (*fn)(const struct buffers *), const struct buffers *x) {
  cudaStream_t stream = device_stream();
  cudaEvent_t start[REPS], stop[REPS];
  for (int i = 0; i < WARMUP; i++) fn(x);
  for (int i = 0; i < REPS; i++) {
    CUDA_CHECK(cudaEventCreate(&start[i]));
    CUDA_CHECK(cudaEventCreate(&stop[i]));
  }
  for (int i = 0; i < REPS; i++) {
    CUDA_CHECK(cudaEventRecord(start[i], stream));
    fn(x);
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

static const char *INPUTS[] = {"op", "softplus", "bounded"};
static bool profile;            // --profile
static const char *dump_dir;    // --dump DIR

// The row's results (of its last forward+backward) into DIR/BxTxHxK_inputs_name.bin, one file an array, so that
// two builds' files can be compared with cmp (bench/dev/kda_ab.sh: bitwise against this tree).
static void dump(const char *label, const char *name, const void *d, size_t bytes) {
  if (!d) return;
  char path[1024];
  snprintf(path, sizeof path, "%s/%s_%s.bin", dump_dir, label, name);
  void *h = malloc(bytes);
  device_download(h, d, bytes);
  FILE *f = fopen(path, "wb");
  if (!f || fwrite(h, 1, bytes, f) != bytes) {
    fprintf(stderr, "bench_kda: cannot write %s\n", path);
    exit(1);
  }
  fclose(f);
  free(h);
}

// inputs: 0 the op alone, 1 softplus gate and L2 norms inside, 2 bounded gate and L2 norms inside.
static void bench(int B, int T, int H, int K, int doc_len, int inputs) {
  const int V = K;
  uint64_t state = 12345;
  const size_t rows = (size_t)B * T * H, nk = rows * K, nv = rows * V, ns = (size_t)B * H * K * V;
  struct buffers x = {.B = B, .T = T, .H = H, .K = K, .V = V, .scale = 1.0f / sqrtf((float)K)};
  x.inside = inputs > 0, x.form = inputs == 2 ? KDA_GATE_BOUNDED : KDA_GATE_SOFTPLUS;
  x.q = random_bf16(rows, K, !x.inside, &state), x.k = random_bf16(rows, K, !x.inside, &state);
  x.v = random_bf16(rows, V, false, &state), x.dout = random_bf16(rows, V, false, &state);
  x.g = random_float(nk, -1.0, -0.01, &state), x.beta = random_float(rows, 0.05, 0.95, &state);
  x.s0 = random_float(ns, -0.5, 0.5, &state), x.dsT = random_float(ns, -0.5, 0.5, &state);
  x.out = device_alloc(nv * 2), x.dq = device_alloc(nk * 2), x.dk = device_alloc(nk * 2), x.dv = device_alloc(nv * 2);
  x.sT = device_alloc(ns * 4), x.ds0 = device_alloc(ns * 4), x.dg = device_alloc(nk * 4);
  x.saved = device_alloc(kda_chunk_saved_floats(B, T, H, K, K) * 4);
  x.dbeta = device_alloc(rows * 4);
  if (x.inside) {
    x.f = random_bf16(rows, K, false, &state);  // U(-1.7, 1.7): about unit variance, as fla_kda.py's randn
    float *A_log = malloc(H * sizeof(float));
    for (int h = 0; h < H; h++) A_log[h] = (float)log(1.0 + 15.0 * uniform(&state));
    x.A_log = device_alloc(H * sizeof(float));
    device_upload(x.A_log, A_log, H * sizeof(float));
    free(A_log);
    x.dt_bias = random_float((size_t)H * K, -0.17, 0.17, &state);  // sd 0.1
    x.df = device_alloc(nk * 2);
    x.dA_log = device_alloc(H * 4), x.ddt_bias = device_alloc((size_t)H * K * 4);
  }
  x.doc = NULL;
  if (doc_len > 0) {
    unsigned char *doc = calloc((size_t)B * T, 1);
    for (size_t t = 0; t < (size_t)B * T; t++) doc[t] = (t % T) % doc_len == 0;
    x.doc = device_alloc((size_t)B * T);
    device_upload(x.doc, doc, (size_t)B * T);
    free(doc);
  }
  const float fwd_ms = time_median(run_forward, &x);
  const float both_ms = time_median(run_both, &x);
  if (dump_dir) {
    device_synchronize();
    char label[128];
    snprintf(label, sizeof label, "%dx%dx%dx%d_%s", B, T, H, K, INPUTS[inputs]);
    dump(label, "out", x.out, nv * 2), dump(label, "final_state", x.sT, ns * 4);
    dump(label, "dq", x.dq, nk * 2), dump(label, "dk", x.dk, nk * 2), dump(label, "dv", x.dv, nv * 2);
    dump(label, "dg", x.dg, nk * 4), dump(label, "dbeta", x.dbeta, rows * 4);
    dump(label, "dinitial_state", x.ds0, ns * 4);
    if (x.inside) {
      dump(label, "df", x.df, nk * 2), dump(label, "dA_log", x.dA_log, H * 4);
      dump(label, "ddt_bias", x.ddt_bias, (size_t)H * K * 4);
    }
  }
  if (profile) {
    device_synchronize();
    CUDA_CHECK(cudaProfilerStart());
    run_both(&x);
    device_synchronize();
    CUDA_CHECK(cudaProfilerStop());
  }
  // Forward: q k v out (bf16), g (fp32; inside: f bf16), beta, initial and final state, document starts.
  const double gate = x.inside ? 2.0 : 4.0;  // bytes per gate element
  const double doc_bytes = x.doc ? (double)B * T : 0;
  const double fwd_bytes = 2.0 * (2 * nk + 2 * nv) + gate * nk + 4.0 * rows + 8.0 * ns + doc_bytes;
  // Backward: the forward's inputs again, dout, dfinal_state, and dq dk dv (bf16) dg (or df) dbeta dinitial_state.
  const double bwd_bytes = 2.0 * (2 * nk + nv) + gate * nk + 4.0 * rows + 4.0 * ns + doc_bytes + 2.0 * nv + 4.0 * ns +
                           2.0 * (2 * nk + nv) + gate * nk + 4.0 * rows + 4.0 * ns;
  const double both_bytes = fwd_bytes + bwd_bytes;
  const double fwd_floor = fwd_bytes / (HBM_TBS * 1e12) * 1e3, both_floor = both_bytes / (HBM_TBS * 1e12) * 1e3;
  printf("| %d | %5d | %2d | %3d | %4s | %8s | %8.3f | %7.1f | %7.3f | %5.2f | %9.3f | %7.1f | %7.3f | %5.2f |\n", B, T,
         H, K, doc_len > 0 ? "yes" : "no", INPUTS[inputs], fwd_ms, fwd_bytes / 1e6, fwd_floor,
         fwd_bytes / (fwd_ms * 1e-3) / 1e12, both_ms, both_bytes / 1e6, both_floor,
         both_bytes / (both_ms * 1e-3) / 1e12);
  fflush(stdout);
  device_free(x.q), device_free(x.k), device_free(x.v), device_free(x.dout), device_free(x.out);
  device_free(x.dq), device_free(x.dk), device_free(x.dv), device_free(x.g), device_free(x.beta);
  device_free(x.s0), device_free(x.sT), device_free(x.dsT), device_free(x.ds0), device_free(x.dg);
  device_free(x.dbeta), device_free(x.saved);
  if (x.inside) {
    device_free(x.f), device_free(x.A_log), device_free(x.dt_bias), device_free(x.df);
    device_free(x.dA_log), device_free(x.ddt_bias);
  }
  if (x.doc) device_free(x.doc);
}

int main(int argc, char **argv) {
  bool op_only = false, reverse = false;
  for (; argc >= 2 && strncmp(argv[1], "--", 2) == 0; argc--, argv++) {
    if (strcmp(argv[1], "--profile") == 0) profile = true;
    else if (strcmp(argv[1], "--op") == 0) op_only = true;
    else if (strcmp(argv[1], "--reverse") == 0) reverse = true;
    else if (strcmp(argv[1], "--dump") == 0) {
      if (argc < 3) {
        fprintf(stderr, "bench_kda: --dump needs a directory\n");
        return 1;
      }
      dump_dir = argv[2], argc--, argv++;
    } else {
      fprintf(stderr, "bench_kda: unknown option %s (--op, --profile, --reverse, --dump DIR)\n", argv[1]);
      return 1;
    }
  }
  device_select(0);
  printf("chunkwise KDA, V = K, median of %d calls after %d warm-ups; floor = the bytes below at %.2f TB/s\n", REPS,
         WARMUP, HBM_TBS);
  printf("| B | T | H | K | docs | inputs | fwd ms | fwd MB | fwd floor ms | fwd TB/s | fwd+bwd ms | fwd+bwd MB | "
         "fwd+bwd floor ms | fwd+bwd TB/s |\n");
  printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  const int shapes[3][3] = {{8, 4096, 16}, {2, 16384, 16}, {1, 65536, 16}};
  for (int s = 0; s < (argc >= 4 ? 1 : 3); s++)
    for (int n = 0; n < (op_only ? 1 : 3); n++) {
      const int inputs = reverse && !op_only ? 2 - n : n;
      if (argc >= 4)
        bench(atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), argc >= 5 ? atoi(argv[4]) : 128,
              argc >= 6 ? atoi(argv[5]) : 0, inputs);
      else
        bench(shapes[s][0], shapes[s][1], shapes[s][2], 128, 0, inputs);
    }
  return 0;
}
#else
int main(void) {
  printf("bench_kda: built without CUDA (KLT_HAVE_CUDA unset); nothing to measure\n");
  return 0;
}
#endif
