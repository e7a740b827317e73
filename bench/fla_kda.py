# fla's Triton chunk_kda (flash-linear-attention, fetched, never committed) on the shapes of bench_kda, and
# the ratio ours / fla. Runs on the GPU machine (torch + triton there); fla's source must be on PYTHONPATH:
#   PYTHONPATH=.deps/fla_src python3 bench/fla_kda.py [--ours bench_kda_output.txt]
# Inputs as the issue states them: bf16 q, k, v (L2 norm of q and k inside the op), fp32 raw gate with the
# gate activation inside the op (softplus: -exp(A_log) softplus(g + dt_bias); bounded: lb sigmoid(...),
# lb = -5, fla's safe_gate), fp32 beta (already a sigmoid), fp32 initial state and final state.
# Forward = chunk_kda(...); forward+backward = the same plus backward of (o, final state) with random
# cotangents, every input's gradient. Median of 20 calls (CUDA events) after warm-up (autotuning).
# With --ours FILE (the output of bench_kda), prints the ratio table ours / fla per shape.
import argparse
import re
import statistics
import sys

import torch

SHAPES = [(8, 4096, 16, 128), (2, 16384, 16, 128), (1, 65536, 16, 128)]
REPS, WARMUP = 20, 5


def median_ms(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def bench_fla(B, T, H, K, gate, warm_only=False):
    from fla.ops.kda import chunk_kda

    dev = torch.device("cuda")
    torch.manual_seed(0)
    V = K

    def leaf(shape, dtype, scale=1.0, shift=0.0):
        return (torch.randn(shape, device=dev, dtype=torch.float32) * scale + shift).to(dtype).requires_grad_(True)

    q, k, v = leaf((B, T, H, K), torch.bfloat16), leaf((B, T, H, K), torch.bfloat16), leaf((B, T, H, V), torch.bfloat16)
    g = leaf((B, T, H, K), torch.float32)
    beta = torch.rand(B, T, H, device=dev).clamp(0.05, 0.95).requires_grad_(True)
    A_log = torch.log(torch.empty(H, device=dev).uniform_(1, 16)).requires_grad_(True)
    dt_bias = leaf((H * K,), torch.float32, 0.1)
    h0 = leaf((B, H, K, V), torch.float32, 0.5)
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    kw = dict(A_log=A_log, dt_bias=dt_bias, use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True,
              initial_state=h0, output_final_state=True)
    if gate == "bounded":
        kw.update(safe_gate=True, lower_bound=-5.0)

    def fwd():
        with torch.no_grad():
            chunk_kda(q, k, v, g, beta, **kw)

    def both():
        o, ht = chunk_kda(q, k, v, g, beta, **kw)
        torch.autograd.backward((o, ht), (do, dht))

    if warm_only:  # compile and autotune both paths, time nothing
        fwd()
        both()
        torch.cuda.synchronize()
        return None
    return median_ms(fwd), median_ms(both)


def read_ours(path):
    # bench_kda's table rows: | B | T | H | K | docs | inputs | fwd ms | ... | fwd+bwd ms | ...; the rows with
    # the gate and L2 norms inside (inputs softplus, bounded) are the ones timed as fla is.
    ours = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 14 and re.fullmatch(r"\d+", cells[0]) and cells[4] == "no" and cells[5] != "op":
            ours[tuple(int(c) for c in cells[:4]) + (cells[5],)] = (float(cells[6]), float(cells[10]))
    return ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="bench_kda output to compare against")
    ap.add_argument("--first", action="store_true", help="only the first shape with the softplus gate")
    ap.add_argument("--warm", action="store_true", help="only compile and autotune (one call of each), no timing")
    args = ap.parse_args()
    print(f"fla {torch.cuda.get_device_name()} torch {torch.__version__}; median of {REPS} after {WARMUP} warm-ups")
    fla = {}
    for shape in SHAPES[:1] if args.first else SHAPES:
        for gate in ("softplus",) if args.first else ("softplus", "bounded"):
            try:
                if args.warm:
                    bench_fla(*shape, gate, warm_only=True)
                    print(f"fla {shape} {gate}: compiled", file=sys.stderr, flush=True)
                    continue
                fla[shape + (gate,)] = bench_fla(*shape, gate)
                print(f"fla {shape} {gate}: fwd {fla[shape + (gate,)][0]:.3f} ms, fwd+bwd {fla[shape + (gate,)][1]:.3f} ms",
                      file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 (an unsupported case or out of memory: say so, go on)
                print(f"fla {shape} {gate}: failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            finally:
                torch.cuda.empty_cache()
    if args.warm:
        return
    ours = read_ours(args.ours) if args.ours else {}
    print("| B | T | H | K | gate | fla fwd ms | fla fwd+bwd ms | ours fwd ms | ours fwd+bwd ms | ours/fla fwd | "
          "ours/fla fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, (f_fwd, f_both) in fla.items():
        o = ours.get(key)
        extra = (f"{o[0]:.3f} | {o[1]:.3f} | {o[0] / f_fwd:.2f} | {o[1] / f_both:.2f}" if o else "- | - | - | -")
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {f_fwd:.3f} | {f_both:.3f} | {extra} |")


if __name__ == "__main__":
    main()
