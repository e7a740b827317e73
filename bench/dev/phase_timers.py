# Writes a copy of kernels/kda_chunk.cu with clock64 phase timers in the per-chunk kernels (thread 0 of each
# block, after a __syncthreads) and a one-time print of the mean cycles per phase (6th backward call).
# Usage: python3 bench/dev/phase_timers.py kernels/kda_chunk.cu OUT.cu   (anchors: comments in the kernels)
# A kernel whose anchors are not all found is left untimed (and said so on stderr).
import sys
s = open(sys.argv[1]).read()
def region(start, s):
    a = s.index(start); b = s.index("\n// ------", a)
    return a, b
def patch(s, start, marks, kid, end_id):
    a, b = region(start, s)
    r = s[a:b]
    for anchor, n in marks:  # an anchor may be a tuple of alternatives (the first found is used)
        alts = anchor if isinstance(anchor, tuple) else (anchor,)
        i = next((r.index(x) for x in alts if x in r), None)
        if i is None: raise ValueError(anchor)
        r = r[:i] + f"PH({kid},{n});\n  " + r[i:]
    j = r.rindex("}")
    r = r[:j] + f"PH({kid},{end_id});\n" + r[j:]
    return s[:a] + r + s[b:]
phases = [0, 0, 0]  # phases timed per kernel: intra, wy_backward, pairwise
def timed(s, start, marks, kid, end_id):
    try:
        s = patch(s, start, marks, kid, end_id)
        phases[kid] = end_id
    except ValueError:
        print(f"phase_timers: {start.split('(')[0]} left untimed (an anchor is missing)", file=sys.stderr)
    return s
s = timed(s, "kda_intra_kernel(Scratch", [("load_rows_l2norm(qh", 0), ("// Pairwise products inside", 1),
          ("// Eight units on the tensor cores", 2),
          ("float *KKg = sc.KK", 3), ("// qg, kl, el.", 4), ("// M = (I + diag(beta) KK)^-1", 5), ("// M^T for the backward", 6)], 0, 7)
wy = [("const size_t cK = (size_t)ch * CH * K, cV", 0), ("// Y = M^T dX on the tensor cores", 1), ("// dL = -Y X^T", 2),
      ("// dbeta_i = Y_i", 3)]
s = timed(s, "kda_wy_backward_kernel(bf16_t", wy, 1, len(wy))
# the pairwise kernel (units in rounds): loads, wl | dA, the rounds, dg and the norms
s = timed(s, "kda_pairwise_backward_kernel(bf16_t", [("// dL and dA (bf16) come by cp.async", 0),
          ("float wl[CH * CH / NT]", 1), ("for (int round = 0", 2), ("if (tid < K) {\n    // dg_t", 3)], 2, 4)
head = '''
__device__ long long kda_prof[3][4096][12];
#define PH(K, n) do { __syncthreads(); if (threadIdx.x == 0 && blockIdx.x < 4096) kda_prof[K][blockIdx.x][n] = clock64(); } while (0)
#include <stdio.h>
static void prof_dump(int nblk) {
  static long long h[3][4096][12];
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpyFromSymbol(h, kda_prof, sizeof(h)));
  const char *names[3] = {"intra", "wy_backward", "pairwise"};
  const int last[3] = {PHASES_TIMED};
  if (nblk > 4096) nblk = 4096;
  for (int k = 0; k < 3; k++) {
    double tot = 0, d[12] = {0};
    for (int b = 0; b < nblk; b++) for (int n = 1; n <= last[k]; n++) d[n] += (double)(h[k][b][n] - h[k][b][n - 1]) / nblk;
    if (last[k] == 0) continue;
    for (int n = 1; n <= last[k]; n++) tot += d[n];
    fprintf(stderr, "PHASES %s: %.0f cycles a block:", names[k], tot);
    for (int n = 1; n <= last[k]; n++) fprintf(stderr, " p%d %.0f (%.0f%%)", n, d[n], 100 * d[n] / tot);
    fprintf(stderr, "\\n");
  }
}
'''
i = s.index("#define CH 64")  # after the includes
s = s[:i] + head + s[i:]
# the dump: after the backward's per-chunk kernels of an uncut run (the shapes timed are not cut into segments)
i = s.index("    per_chunk(all);\n    return;") + len("    per_chunk(all);\n")
s = s[:i] + "    static int calls = 0;\n    if (++calls == 6) prof_dump(chunks);\n" + s[i:]
s = s.replace("{PHASES_TIMED}", "{%d, %d, %d}" % tuple(phases))
open(sys.argv[2], "w").write(s)
