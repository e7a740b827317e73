#include "optim/qk_clip.h"

#include <math.h>
#include <stddef.h>

#include "common/check.h"

static void scale_rows(real *rows, int count, int width, real factor) {
  size_t n = (size_t)count * width;
  for (size_t i = 0; i < n; i++) rows[i] *= factor;
}

int qk_clip_apply(real *q_proj, real *kv_b_proj, const real *max_logit, real tau, int H, int Dn, int Dr,
                  int Dv, int C, int L) {
  CHECK(tau > 0, "QK-Clip threshold must be positive, got %g", (double)tau);
  CHECK(H > 0 && Dn >= 0 && Dr >= 0 && Dv >= 0 && C > 0 && L > 0, "bad QK-Clip shape");
  int clipped = 0;
  for (int h = 0; h < H; h++) {
    if (!(max_logit[h] > tau)) continue;
    double gamma = (double)tau / (double)max_logit[h];
    real root = (real)sqrt(gamma);
    if (q_proj) {
      real *q_head = q_proj + (size_t)h * (Dn + Dr) * C;  // (Dn + Dr, C)
      scale_rows(q_head, Dn, C, root);
      scale_rows(q_head + (size_t)Dn * C, Dr, C, (real)gamma);
    }
    if (kv_b_proj) scale_rows(kv_b_proj + (size_t)h * (Dn + Dv) * L, Dn, L, root);  // head h's (Dn + Dv, L)
    clipped++;
  }
  return clipped;
}
