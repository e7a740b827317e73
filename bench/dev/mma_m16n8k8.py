# mma.sync m16n8k8 (row.col) on one warp's fragments, in float64, for the emulations of the KDA kernels' thread maps.
# Lane l = 4 g + t holds A's (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4), B's (t, g), (t + 4, g) and C's
# (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
import numpy as np


def mma(a, b, c):
    """a[32][4], b[32][2], c[32][4] (per lane) -> c + A B, per lane."""
    A = np.zeros((16, 8)); B = np.zeros((8, 8))
    for l in range(32):
        g, t = l >> 2, l & 3
        A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4] = a[l]; B[t, g], B[t + 4, g] = b[l]
    C = A @ B; out = []
    for l in range(32):
        g, t = l >> 2, l & 3
        out.append([c[l][0] + C[g, 2 * t], c[l][1] + C[g, 2 * t + 1], c[l][2] + C[g + 8, 2 * t], c[l][3] + C[g + 8, 2 * t + 1]])
    return out
