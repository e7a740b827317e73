// Muon: Newton-Schulz output has singular values near 1 and keeps the singular vectors, for random and
// badly conditioned inputs of both orientations; muon_step matches an independent naive fp64 version.
#include <criterion/criterion.h>
#include <string.h>

#include "optim/muon.h"
#include "tests/testing.h"

// Eigenvalues of the symmetric (n, n) matrix a (destroyed) by cyclic Jacobi rotations.
static void jacobi_eigenvalues(double *a, int n, double *eigenvalues) {
  for (int sweep = 0; sweep < 100; sweep++) {
    double off = 0;
    for (int i = 0; i < n; i++)
      for (int j = i + 1; j < n; j++) off += a[i * n + j] * a[i * n + j];
    if (off < 1e-30) break;
    for (int p = 0; p < n; p++)
      for (int q = p + 1; q < n; q++) {
        if (fabs(a[p * n + q]) < 1e-300) continue;
        double theta = (a[q * n + q] - a[p * n + p]) / (2 * a[p * n + q]);
        double t = (theta >= 0 ? 1 : -1) / (fabs(theta) + sqrt(theta * theta + 1));
        double c = 1 / sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; k++) {  // columns p, q
          double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; k++) {  // rows p, q
          double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
      }
  }
  for (int i = 0; i < n; i++) eigenvalues[i] = a[i * n + i];
}

// The min(rows, cols) singular values of x (rows, cols), from the eigenvalues of its small Gram matrix.
static void singular_values(const real *x, int rows, int cols, double *out) {
  int m = rows < cols ? rows : cols;
  double *gram = calloc((size_t)m * m, sizeof(double));
  for (int i = 0; i < m; i++)
    for (int j = 0; j < m; j++) {
      double s = 0;
      if (rows <= cols) for (int k = 0; k < cols; k++) s += (double)x[i * cols + k] * x[j * cols + k];
      else for (int k = 0; k < rows; k++) s += (double)x[k * cols + i] * x[k * cols + j];
      gram[i * m + j] = s;
    }
  jacobi_eigenvalues(gram, m, out);
  for (int i = 0; i < m; i++) out[i] = sqrt(fmax(out[i], 0));
  free(gram);
}

// q (n, k), k <= n: orthonormal columns from Gram-Schmidt on a random Gaussian matrix.
static void random_orthonormal_columns(double *q, int n, int k, uint64_t *rng) {
  for (int j = 0; j < k; j++) {
    for (int i = 0; i < n; i++) q[i * k + j] = test_rand_normal(rng);
    for (int pass = 0; pass < 2; pass++)
      for (int l = 0; l < j; l++) {
        double dot = 0;
        for (int i = 0; i < n; i++) dot += q[i * k + j] * q[i * k + l];
        for (int i = 0; i < n; i++) q[i * k + j] -= dot * q[i * k + l];
      }
    double norm = 0;
    for (int i = 0; i < n; i++) norm += q[i * k + j] * q[i * k + j];
    for (int i = 0; i < n; i++) q[i * k + j] /= sqrt(norm);
  }
}

// x (rows, cols) = U diag(s) V^T with s log-spaced from 1 down to 1/condition; U (rows, m) and
// V (cols, m) are returned so the test can check the output keeps them.
static void conditioned_matrix(real *x, double *u, double *v, int rows, int cols, double condition,
                               uint64_t *rng) {
  int m = rows < cols ? rows : cols;
  random_orthonormal_columns(u, rows, m, rng);
  random_orthonormal_columns(v, cols, m, rng);
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      double s = 0;
      for (int k = 0; k < m; k++) s += u[i * m + k] * pow(condition, -(double)k / (m - 1)) * v[j * m + k];
      x[i * cols + j] = s;
    }
}

static void assert_singular_values_in(const real *x, int rows, int cols, double lo, double hi) {
  int m = rows < cols ? rows : cols;
  double *s = calloc(m, sizeof(double));
  singular_values(x, rows, cols, s);
  for (int i = 0; i < m; i++)
    cr_assert(s[i] >= lo && s[i] <= hi, "(%d, %d): singular value %d is %g, outside [%g, %g]", rows, cols,
              i, s[i], lo, hi);
  free(s);
}

static const int SHAPES[][2] = {{16, 40}, {40, 16}, {24, 24}};

Test(muon, newton_schulz_singular_values_of_random_matrices) {
  uint64_t rng = 11;
  for (int c = 0; c < 3; c++) {
    int rows = SHAPES[c][0], cols = SHAPES[c][1];
    size_t n = (size_t)rows * cols;
    real *in = test_alloc(n), *out = test_alloc(n), *scratch = test_alloc(muon_scratch_elements(rows, cols));
    test_fill_normal(in, n, 3.0, &rng);
    muon_newton_schulz(out, in, rows, cols, 5, scratch);
    // A square Gaussian matrix has singular values near 0; only the rectangular ones are well conditioned.
    if (rows != cols) assert_singular_values_in(out, rows, cols, 0.5, 1.5);
    else assert_singular_values_in(out, rows, cols, 0.0, 1.5);
    free(in); free(out); free(scratch);
  }
}

// Condition number 1e4: each step multiplies a tiny singular value by at most a = 3.4445, and
// 3.4445^5 < 1e4, so five steps cannot reach the smallest ones; ten steps bring all into [0.5, 1.5],
// and five steps do so for every singular value above 1e-2 of the largest. In both cases the output
// keeps the input's singular vectors: U^T out V is diagonal.
Test(muon, newton_schulz_on_badly_conditioned_matrices) {
  uint64_t rng = 12;
  for (int c = 0; c < 2; c++) {
    int rows = SHAPES[c][0], cols = SHAPES[c][1], m = rows < cols ? rows : cols;
    size_t n = (size_t)rows * cols;
    real *in = test_alloc(n), *out = test_alloc(n), *scratch = test_alloc(muon_scratch_elements(rows, cols));
    double *u = calloc((size_t)rows * m, sizeof(double)), *v = calloc((size_t)cols * m, sizeof(double));
    conditioned_matrix(in, u, v, rows, cols, 1e4, &rng);
    for (int steps = 5; steps <= 10; steps += 5) {
      muon_newton_schulz(out, in, rows, cols, steps, scratch);
      double off = 0, diag_min = 1e300, diag_max = 0, diag_min_large = 1e300;
      for (int a = 0; a < m; a++)
        for (int b = 0; b < m; b++) {
          double s = 0;
          for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++) s += u[i * m + a] * out[i * cols + j] * v[j * m + b];
          if (a != b) off = fmax(off, fabs(s));
          else {
            diag_min = fmin(diag_min, s);
            diag_max = fmax(diag_max, s);
            if (pow(1e4, -(double)a / (m - 1)) >= 1e-2) diag_min_large = fmin(diag_min_large, s);
          }
        }
      cr_assert_lt(off, 1e-10, "(%d, %d) %d steps: singular vectors not kept (%g)", rows, cols, steps, off);
      cr_assert_leq(diag_max, 1.5, "(%d, %d) %d steps: largest singular value %g", rows, cols, steps, diag_max);
      cr_assert_geq(diag_min_large, 0.5, "(%d, %d) %d steps: %g", rows, cols, steps, diag_min_large);
      if (steps == 10) {
        cr_assert_geq(diag_min, 0.5, "(%d, %d) 10 steps: smallest singular value %g", rows, cols, diag_min);
        assert_singular_values_in(out, rows, cols, 0.5, 1.5);
      } else {
        cr_assert_lt(diag_min, 0.5, "five steps were expected not to lift a 1e-4 singular value");
      }
    }
    free(in); free(out); free(scratch); free(u); free(v);
  }
}

Test(muon, newton_schulz_in_place_equals_out_of_place) {
  uint64_t rng = 13;
  int rows = 9, cols = 5;
  size_t n = (size_t)rows * cols;
  real *in = test_alloc(n), *out = test_alloc(n), *scratch = test_alloc(muon_scratch_elements(rows, cols));
  test_fill_normal(in, n, 1.0, &rng);
  muon_newton_schulz(out, in, rows, cols, 5, scratch);
  muon_newton_schulz(in, in, rows, cols, 5, scratch);
  cr_assert_eq(memcmp(in, out, n * sizeof(real)), 0);
  free(in); free(out); free(scratch);
}

// The step written out directly from the formulas: explicit transpose to rows <= cols, triple loops.
static void naive_muon_step(double *w, double *mom, const double *g, int rows, int cols, double mu,
                            int nesterov, double wd, int steps, double lr) {
  int n = rows * cols;
  int transposed = rows > cols, r = transposed ? cols : rows, c = transposed ? rows : cols;
  double *u = calloc(n, sizeof(double)), *x = calloc(n, sizeof(double)), *y = calloc(n, sizeof(double));
  double *a = calloc(r * r, sizeof(double)), *b = calloc(r * r, sizeof(double));
  for (int i = 0; i < n; i++) {
    mom[i] = mu * mom[i] + g[i];
    u[i] = nesterov ? g[i] + mu * mom[i] : mom[i];
  }
  double norm = 0;
  for (int i = 0; i < n; i++) norm += u[i] * u[i];
  norm = sqrt(norm) + 1e-7;
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      if (transposed) x[j * c + i] = u[i * cols + j] / norm;
      else x[i * c + j] = u[i * cols + j] / norm;
    }
  for (int s = 0; s < steps; s++) {
    for (int i = 0; i < r; i++)
      for (int j = 0; j < r; j++) {
        double t = 0;
        for (int k = 0; k < c; k++) t += x[i * c + k] * x[j * c + k];
        a[i * r + j] = t;
      }
    for (int i = 0; i < r; i++)
      for (int j = 0; j < r; j++) {
        double t = 0;
        for (int k = 0; k < r; k++) t += a[i * r + k] * a[k * r + j];
        b[i * r + j] = -4.7750 * a[i * r + j] + 2.0315 * t;
      }
    for (int i = 0; i < r; i++)
      for (int j = 0; j < c; j++) {
        double t = 0;
        for (int k = 0; k < r; k++) t += b[i * r + k] * x[k * c + j];
        y[i * c + j] = 3.4445 * x[i * c + j] + t;
      }
    memcpy(x, y, n * sizeof(double));
  }
  double scale = 0.2 * sqrt(rows > cols ? rows : cols);
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      double o = transposed ? x[j * c + i] : x[i * c + j];
      w[i * cols + j] -= lr * (scale * o + wd * w[i * cols + j]);
    }
  free(u); free(x); free(y); free(a); free(b);
}

Test(muon, step_matches_naive_fp64) {
  uint64_t rng = 14;
  const int shapes[][2] = {{6, 11}, {11, 6}, {7, 7}};
  for (int c = 0; c < 3; c++)
    for (int nesterov = 0; nesterov <= 1; nesterov++) {
      int rows = shapes[c][0], cols = shapes[c][1];
      size_t n = (size_t)rows * cols;
      real *w = test_alloc(n), *mom = test_alloc(n), *g = test_alloc(n);
      real *scratch = test_alloc(muon_scratch_elements(rows, cols));
      test_fill_normal(w, n, 0.5, &rng);
      test_fill_normal(mom, n, 0.1, &rng);
      test_fill_normal(g, n, 0.1, &rng);
      real *w_ref = test_copy(w, n), *mom_ref = test_copy(mom, n);
      MuonConfig config = {.momentum = 0.95, .nesterov = nesterov, .weight_decay = 0.1, .ns_steps = 5};
      muon_step(w, mom, g, rows, cols, &config, 0.02, scratch);
      naive_muon_step(w_ref, mom_ref, g, rows, cols, 0.95, nesterov, 0.1, 5, 0.02);
      cr_assert_lt(test_rel_error(mom, mom_ref, n), 1e-14, "(%d, %d) nesterov %d momentum", rows, cols, nesterov);
      cr_assert_lt(test_rel_error(w, w_ref, n), 1e-12, "(%d, %d) nesterov %d weight", rows, cols, nesterov);
      free(w); free(mom); free(g); free(scratch); free(w_ref); free(mom_ref);
    }
}

// Moonlight's Lemma 1 with the 0.2 factor: the update's RMS is about 0.2 whatever the shape.
Test(muon, update_rms_is_about_one_fifth) {
  uint64_t rng = 15;
  for (int c = 0; c < 2; c++) {
    int rows = SHAPES[c][0], cols = SHAPES[c][1];
    size_t n = (size_t)rows * cols;
    real *w = test_alloc(n), *mom = test_alloc(n), *g = test_alloc(n);
    real *scratch = test_alloc(muon_scratch_elements(rows, cols));
    test_fill_normal(g, n, 1e-3, &rng);
    MuonConfig config = muon_config_default();
    config.weight_decay = 0;
    muon_step(w, mom, g, rows, cols, &config, 1.0, scratch);
    double rms = sqrt(test_dot(w, w, n) / n);
    cr_assert(rms > 0.15 && rms < 0.25, "(%d, %d): update RMS %g", rows, cols, rms);
    free(w); free(mom); free(g); free(scratch);
  }
}
