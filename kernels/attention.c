// CPU reference of causal document-masked attention: blocks of queries against blocks of keys, every
// product through gemm(), an online softmax in the forward and probabilities recomputed from the
// saved log-sum-exp in the backward.
#include "kernels/attention.h"

#include <math.h>
#include <stdbool.h>
#include <stddef.h>

#include "common/check.h"
#include "kernels/gemm.h"

// Fixed block sizes keep the score scratch on the stack (64 x 64), so the op allocates nothing.
#define ATTENTION_BLOCK_QUERIES 64
#define ATTENTION_BLOCK_KEYS 64

// Position where the document holding position t of this row begins.
static int attention_document_begin(const unsigned char *row_doc_start, int t) {  // row_doc_start (T)
  if (!row_doc_start) return 0;
  while (t > 0 && !row_doc_start[t]) t--;
  return t;
}

// first_key[r] = first key query i0 + r may see, for the nq queries of a block. Monotone in r, so
// first_key[0] is the first key the whole block needs.
static void attention_block_first_keys(int *first_key, const unsigned char *row_doc_start, int i0, int nq) {
  first_key[0] = attention_document_begin(row_doc_start, i0);
  for (int r = 1; r < nq; r++)
    first_key[r] = (row_doc_start && row_doc_start[i0 + r]) ? i0 + r : first_key[r - 1];
}

static bool attention_allowed(const int *first_key, int i0, int j0, int r, int c) {
  int i = i0 + r, j = j0 + c;
  return j >= first_key[r] && j <= i;
}

void attention_forward(real *out, real *lse, real *max_logit, const real *q, const real *k, const real *v,
                       const unsigned char *doc_start, real scale, int B, int T, int H, int Dqk, int Dv) {
  CHECK(B >= 0 && T >= 0 && H > 0 && Dqk > 0 && Dv > 0, "attention shape B=%d T=%d H=%d Dqk=%d Dv=%d", B, T,
        H, Dqk, Dv);
  const int ld_qk = H * Dqk, ld_v = H * Dv;
  real scores[ATTENTION_BLOCK_QUERIES * ATTENTION_BLOCK_KEYS];  // (nq, nk): logits, then probabilities
  real running_max[ATTENTION_BLOCK_QUERIES], running_sum[ATTENTION_BLOCK_QUERIES];
  int first_key[ATTENTION_BLOCK_QUERIES];
  for (int h = 0; h < H; h++) max_logit[h] = -INFINITY;

  for (int b = 0; b < B; b++) {
    const unsigned char *row_doc_start = doc_start ? doc_start + (size_t)b * T : NULL;
    for (int h = 0; h < H; h++) {
      for (int i0 = 0; i0 < T; i0 += ATTENTION_BLOCK_QUERIES) {
        int nq = T - i0 < ATTENTION_BLOCK_QUERIES ? T - i0 : ATTENTION_BLOCK_QUERIES;
        attention_block_first_keys(first_key, row_doc_start, i0, nq);
        const real *q_block = q + ((size_t)(b * T + i0) * H + h) * Dqk;  // (nq, Dqk), stride ld_qk
        real *out_block = out + ((size_t)(b * T + i0) * H + h) * Dv;    // (nq, Dv), stride ld_v
        for (int r = 0; r < nq; r++) {
          running_max[r] = -INFINITY;
          running_sum[r] = 0;
          for (int d = 0; d < Dv; d++) out_block[(size_t)r * ld_v + d] = 0;
        }
        for (int j0 = first_key[0]; j0 < i0 + nq; j0 += ATTENTION_BLOCK_KEYS) {
          int nk = i0 + nq - j0 < ATTENTION_BLOCK_KEYS ? i0 + nq - j0 : ATTENTION_BLOCK_KEYS;
          const real *k_block = k + ((size_t)(b * T + j0) * H + h) * Dqk;  // (nk, Dqk), stride ld_qk
          const real *v_block = v + ((size_t)(b * T + j0) * H + h) * Dv;   // (nk, Dv), stride ld_v
          gemm(false, true, nq, nk, Dqk, scale, q_block, ld_qk, k_block, ld_qk, 0, scores, nk);
          for (int r = 0; r < nq; r++) {
            real *row = scores + (size_t)r * nk;
            real block_max = -INFINITY;
            for (int c = 0; c < nk; c++)
              if (attention_allowed(first_key, i0, j0, r, c) && row[c] > block_max) block_max = row[c];
            if (block_max == -INFINITY) {  // this key block lies wholly outside the query's window
              for (int c = 0; c < nk; c++) row[c] = 0;
              continue;
            }
            if (block_max > max_logit[h]) max_logit[h] = block_max;
            real new_max = block_max > running_max[r] ? block_max : running_max[r];
            real rescale = exp(running_max[r] - new_max);
            real sum = 0;
            for (int c = 0; c < nk; c++) {
              row[c] = attention_allowed(first_key, i0, j0, r, c) ? exp(row[c] - new_max) : 0;
              sum += row[c];
            }
            running_sum[r] = running_sum[r] * rescale + sum;
            running_max[r] = new_max;
            if (rescale != 1)
              for (int d = 0; d < Dv; d++) out_block[(size_t)r * ld_v + d] *= rescale;
          }
          gemm(false, false, nq, Dv, nk, 1, scores, nk, v_block, ld_v, 1, out_block, ld_v);
        }
        for (int r = 0; r < nq; r++) {  // every query sees at least itself, so running_sum >= 1
          for (int d = 0; d < Dv; d++) out_block[(size_t)r * ld_v + d] /= running_sum[r];
          lse[(size_t)(b * T + i0 + r) * H + h] = running_max[r] + log(running_sum[r]);
        }
      }
    }
  }
}

void attention_backward(real *dq, real *dk, real *dv, const real *dout, const real *q, const real *k,
                        const real *v, const real *out, const real *lse, const unsigned char *doc_start,
                        real scale, int B, int T, int H, int Dqk, int Dv) {
  CHECK(B >= 0 && T >= 0 && H > 0 && Dqk > 0 && Dv > 0, "attention shape B=%d T=%d H=%d Dqk=%d Dv=%d", B, T,
        H, Dqk, Dv);
  if (!dq && !dk && !dv) return;
  const int ld_qk = H * Dqk, ld_v = H * Dv;
  real probabilities[ATTENTION_BLOCK_QUERIES * ATTENTION_BLOCK_KEYS];  // (nq, nk), then dS in place
  real dprobabilities[ATTENTION_BLOCK_QUERIES * ATTENTION_BLOCK_KEYS];  // (nq, nk)
  real row_dot[ATTENTION_BLOCK_QUERIES];  // rowsum(dout * out): the softmax backward's shift
  real row_lse[ATTENTION_BLOCK_QUERIES];
  int first_key[ATTENTION_BLOCK_QUERIES];

  for (int b = 0; b < B; b++) {
    const unsigned char *row_doc_start = doc_start ? doc_start + (size_t)b * T : NULL;
    for (int h = 0; h < H; h++) {
      for (int i0 = 0; i0 < T; i0 += ATTENTION_BLOCK_QUERIES) {
        int nq = T - i0 < ATTENTION_BLOCK_QUERIES ? T - i0 : ATTENTION_BLOCK_QUERIES;
        attention_block_first_keys(first_key, row_doc_start, i0, nq);
        size_t qk_offset = ((size_t)(b * T + i0) * H + h) * Dqk, v_offset = ((size_t)(b * T + i0) * H + h) * Dv;
        const real *q_block = q + qk_offset;        // (nq, Dqk), stride ld_qk
        const real *dout_block = dout + v_offset;   // (nq, Dv), stride ld_v
        for (int r = 0; r < nq; r++) {
          const real *o = out + v_offset + (size_t)r * ld_v, *g = dout_block + (size_t)r * ld_v;
          real s = 0;
          for (int d = 0; d < Dv; d++) s += o[d] * g[d];
          row_dot[r] = s;
          row_lse[r] = lse[(size_t)(b * T + i0 + r) * H + h];
        }
        for (int j0 = first_key[0]; j0 < i0 + nq; j0 += ATTENTION_BLOCK_KEYS) {
          int nk = i0 + nq - j0 < ATTENTION_BLOCK_KEYS ? i0 + nq - j0 : ATTENTION_BLOCK_KEYS;
          size_t key_qk_offset = ((size_t)(b * T + j0) * H + h) * Dqk;
          size_t key_v_offset = ((size_t)(b * T + j0) * H + h) * Dv;
          const real *k_block = k + key_qk_offset;  // (nk, Dqk), stride ld_qk
          const real *v_block = v + key_v_offset;   // (nk, Dv), stride ld_v
          gemm(false, true, nq, nk, Dqk, scale, q_block, ld_qk, k_block, ld_qk, 0, probabilities, nk);
          for (int r = 0; r < nq; r++)
            for (int c = 0; c < nk; c++) {
              real *p = probabilities + (size_t)r * nk + c;
              *p = attention_allowed(first_key, i0, j0, r, c) ? exp(*p - row_lse[r]) : 0;
            }
          if (dv) gemm(true, false, nk, Dv, nq, 1, probabilities, nk, dout_block, ld_v, 1, dv + key_v_offset, ld_v);
          if (!dq && !dk) continue;
          gemm(false, true, nq, nk, Dv, 1, dout_block, ld_v, v_block, ld_v, 0, dprobabilities, nk);
          for (int r = 0; r < nq; r++)
            for (int c = 0; c < nk; c++) {
              size_t e = (size_t)r * nk + c;
              probabilities[e] *= dprobabilities[e] - row_dot[r];
            }
          if (dq) gemm(false, false, nq, Dqk, nk, scale, probabilities, nk, k_block, ld_qk, 1, dq + qk_offset, ld_qk);
          if (dk) gemm(true, false, nk, Dqk, nq, scale, probabilities, nk, q_block, ld_qk, 1, dk + key_qk_offset, ld_qk);
        }
      }
    }
  }
}
