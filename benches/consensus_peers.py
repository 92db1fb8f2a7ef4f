"""Peers for `kiln bench consensus` (compiler/driver/src/bench_consensus.rs): the consensus benchmarks of
CONSENSUS.md on the same data (a counter-based hash both sides compute), timed in PyTorch eager on the GPU
with CUDA events and in numpy on the CPU. Prints one JSON object for `kiln bench consensus --torch-json`.

    python3 benches/consensus_peers.py                 # the full sizes (needs torch and a GPU)
    python3 benches/consensus_peers.py --numpy-only --games 8 --size 6 --iters 50 --numpy-games 8

The solver is the algorithm of stdlib/consensus.kiln's `zero_sum_rm_plus` op for op: alternating regret
matching+ (the row player updates first, the column player answers its new strategy), linearly weighted
averages, and per iteration the NashConv of the average and of the last iterate, keeping the best profile
seen, with the same masking of finished games (tol -1: none finishes, every game runs every iteration).
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np

MASK32 = 0xFFFFFFFF
# The seeds of the three data sets (the Rust side uses the same).
SEED_GAMES, SEED_EMBEDDINGS, SEED_UPDATES = 1, 2, 3


def unit(index, seed, xp=np):
    """The benchmark data: a value in [0, 1) per element index (an int64 array), a 32-bit integer hash
    whose every product stays below 2^63, so numpy, torch and Rust compute it bit for bit."""
    x = (index + seed * 0x9E3779B1) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    x = x ^ (x >> 16)
    return (x >> 8).to(xp.float32) / 16777216.0 if xp is not np else (x >> 8).astype(np.float32) / np.float32(16777216.0)


class Ops:
    """The few array operations whose spelling differs between numpy and torch."""

    def __init__(self, xp):
        self.xp = xp
        self.torch = xp is not np

    def sum(self, a):
        return a.sum(-1, keepdim=True) if self.torch else a.sum(-1, keepdims=True)

    def amax(self, a):
        return a.amax(-1) if self.torch else a.max(-1)

    def relu(self, a):
        return a.clamp(min=0.0) if self.torch else np.maximum(a, np.float32(0.0))

    def floor_at(self, a, v):
        return a.clamp(min=v) if self.torch else np.maximum(a, np.float32(v))

    def minimum(self, a, b):
        return self.xp.minimum(a, b)

    def where(self, c, a, b):
        return self.xp.where(c, a, b)

    def full(self, like, shape, v):
        if self.torch:
            return self.xp.full(shape, v, dtype=like.dtype, device=like.device)
        return np.full(shape, v, dtype=like.dtype)


def solve_rm_plus(A, iters, tol, check_every, xp=np):
    """stdlib `zero_sum_rm_plus` (bimatrix_solve with B = -A, method rm_plus): returns the best profile
    (x, y), its value xᵀAy, its NashConv and the iterations each game ran."""
    o = Ops(xp)
    G, M, N = A.shape
    B = -A

    def rm(q, k):
        total = o.sum(q)
        return o.where(total > 0.0, q / o.floor_at(total, 1e-30), 1.0 / k)

    def row_values(y):
        return (A @ y[:, :, None])[:, :, 0]

    def col_values(x):
        return (x[:, None, :] @ B)[:, 0, :]

    def nashconv(x, y):
        ux, uy = row_values(y), col_values(x)
        return (o.amax(ux) - o.sum(ux * x)[:, 0]) + (o.amax(uy) - o.sum(uy * y)[:, 0])

    ax, ay = o.full(A, (G, M), 0.0), o.full(A, (G, N), 0.0)
    sx, sy = o.full(A, (G, M), 0.0), o.full(A, (G, N), 0.0)
    done, used = o.full(A, (G,), 0.0), o.full(A, (G,), 0.0)
    bx, by = o.full(A, (G, M), 1.0 / M), o.full(A, (G, N), 1.0 / N)
    bnc = nashconv(bx, by)
    t = 0.0
    for _ in range(iters):
        x, y = rm(ax, M), rm(ay, N)
        ux = row_values(y)
        ax1 = o.relu(ax + ux - o.sum(ux * x))
        uy = col_values(rm(ax1, M))
        ay1 = o.relu(ay + uy - o.sum(uy * y))
        w = t + 1.0
        sx1, sy1 = sx + w * x, sy + w * y
        xa, ya = sx1 / o.sum(sx1), sy1 / o.sum(sy1)
        nc_avg, nc_last = nashconv(xa, ya), nashconv(x, y)
        avg_wins = (nc_avg <= nc_last)[:, None]
        nc = o.minimum(nc_avg, nc_last)
        better = (nc < bnc) & (done < 0.5)
        bx = o.where(better[:, None], o.where(avg_wins, xa, x), bx)
        by = o.where(better[:, None], o.where(avg_wins, ya, y), by)
        bnc = o.where(better, nc, bnc)
        live = done < 0.5
        g = live[:, None]
        finished = (bnc <= tol) & live if w % check_every == 0.0 else live & False
        ax, ay = o.where(g, ax1, ax), o.where(g, ay1, ay)
        sx, sy = o.where(g, sx1, sx), o.where(g, sy1, sy)
        done = o.where(finished, 1.0, done)
        used = o.where(live, w, used)
        t = w
    value = o.sum(bx * row_values(by))[:, 0]
    return bx, by, value, bnc, used


def games_numpy(games, m, n):
    return unit(np.arange(games * m * n, dtype=np.int64), SEED_GAMES).reshape(games, m, n)


def numpy_solver(args):
    """numpy on the CPU on the first `--numpy-games` games (the subset checked against kiln), scaled to
    all games by the ratio of the counts (numpy's batched products loop over the games)."""
    games = min(args.numpy_games, args.games)
    A = games_numpy(games, args.size, args.size)
    start = time.perf_counter()
    _, _, value, nc, used = solve_rm_plus(A, args.numpy_iters, args.tol, args.check_every)
    ms = (time.perf_counter() - start) * 1e3
    per_iter = ms / args.numpy_iters
    return {
        "games": games, "iters": args.numpy_iters, "ms_total": ms, "ms_per_iteration_measured": per_iter,
        "ms_per_iteration": per_iter * args.games / games,
        "scaling": f"measured on {games} games for {args.numpy_iters} iterations, per iteration times {args.games}/{games}",
        "threads": "numpy's defaults (BLAS threads for the batched products)",
    }, {"games": games, "iters": args.numpy_iters, "value": value.tolist(), "nashconv": nc.tolist(),
        "iters_used": used.tolist()}


def cuda_timed(torch, fn, runs, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def torch_unit(torch, start, end, seed):
    return unit(torch.arange(start, end, dtype=torch.int64, device="cuda"), seed, torch)


def torch_solver(torch, args):
    g, m = args.games, args.size
    A = torch_unit(torch, 0, g * m * m, SEED_GAMES).view(g, m, m)
    solve_rm_plus(A, 5, args.tol, args.check_every, torch)
    ms = cuda_timed(torch, lambda: solve_rm_plus(A, args.iters, args.tol, args.check_every, torch), args.solver_runs, 0)
    _, _, value, nc, used = solve_rm_plus(A, args.iters, args.tol, args.check_every, torch)
    k = min(args.check_games, g)
    return {"ms_total": ms, "ms_per_iteration": ms / args.iters, "runs": args.solver_runs}, {
        "games": k, "iters": args.iters, "value": value[:k].tolist(), "nashconv": nc[:k].tolist(),
        "iters_used": used[:k].tolist(), "all_ran_every_iteration": bool((used == args.iters).all())}


def torch_cosine(torch, args):
    n, d = args.cos_n, args.cos_d
    E = torch_unit(torch, 0, n * d, SEED_EMBEDDINGS).view(n, d) * 2.0 - 1.0

    def cos():
        e = E * torch.rsqrt((E * E).sum(-1, keepdim=True) + 1e-12)
        return e @ e.T

    out = {"n": n, "d": d, "flops": 2 * n * n * d}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        ms = cuda_timed(torch, cos, args.runs)
        out["tf32_on" if tf32 else "f32"] = {"median_ms": ms, "tflop_per_s": out["flops"] / (ms * 1e-3) / 1e12,
                                             "allow_tf32": tf32,
                                             "float32_matmul_precision": torch.get_float32_matmul_precision()}
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def torch_median(torch, args):
    k, p = args.median_k, args.median_p
    U = torch.empty(k, p, dtype=torch.float32, device="cuda")
    chunk = 1 << 26
    for row in range(k):
        for s in range(0, p, chunk):
            e = min(p, s + chunk)
            U[row, s:e] = torch_unit(torch, row * p + s, row * p + e, SEED_UPDATES)
    nbytes = (k * p + p) * 4
    ms = cuda_timed(torch, lambda: torch.median(U, dim=0), args.runs)
    copy_ms = cuda_timed(torch, lambda: U.clone(), args.runs)
    return {"k": k, "p": p, "bytes": nbytes, "median_ms": ms, "gb_per_s": nbytes / (ms * 1e-3) / 1e9,
            "copy_gb_per_s": 2 * k * p * 4 / (copy_ms * 1e-3) / 1e9,
            "note": "torch.median returns the lower of the two middle values (K even); kiln the mean of both"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed runs of the cosine and median cases")
    ap.add_argument("--solver-runs", type=int, default=3, help="timed runs of the solver (each all --iters)")
    ap.add_argument("--games", type=int, default=10000)
    ap.add_argument("--size", type=int, default=64, help="actions per player (square games)")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--tol", type=float, default=-1.0, help="-1: no game finishes early")
    ap.add_argument("--check-every", type=int, default=None, help="default: --iters")
    ap.add_argument("--check-games", type=int, default=64, help="games whose results kiln compares")
    ap.add_argument("--numpy-games", type=int, default=256)
    ap.add_argument("--numpy-iters", type=int, default=None, help="default: --iters")
    ap.add_argument("--cos-n", type=int, default=16384)
    ap.add_argument("--cos-d", type=int, default=768)
    ap.add_argument("--median-k", type=int, default=16)
    ap.add_argument("--median-p", type=int, default=134217728)
    ap.add_argument("--numpy-only", action="store_true", help="no torch: the numpy solver alone")
    ap.add_argument("--print-data", type=int, default=0, metavar="N",
                    help="print the first N values of each data set (for the Rust test) and exit")
    args = ap.parse_args(argv)
    if args.numpy_iters is None:
        args.numpy_iters = args.iters
    if args.check_every is None:
        args.check_every = args.iters
    if args.print_data:
        idx = np.arange(args.print_data, dtype=np.int64)
        print(json.dumps({str(s): unit(idx, s).tolist() for s in (SEED_GAMES, SEED_EMBEDDINGS, SEED_UPDATES)}))
        return
    out = {"numpy": np.__version__, "data": "unit(index, seed): the hash of benches/consensus_peers.py, payoffs in [0, 1), "
           "embeddings 2u - 1, updates u",
           "zero_sum_rm_plus": {"games": args.games, "m": args.size, "n": args.size, "iters": args.iters,
                                "tol": args.tol, "check_every": args.check_every}}
    numpy_timing, numpy_check = numpy_solver(args)
    out["zero_sum_rm_plus"]["numpy"] = numpy_timing
    out["zero_sum_rm_plus"]["numpy_check"] = numpy_check
    if not args.numpy_only:
        import torch
        out["device"] = torch.cuda.get_device_name()
        out["torch"] = torch.__version__
        torch.backends.cuda.matmul.allow_tf32 = False
        timing, check = torch_solver(torch, args)
        out["zero_sum_rm_plus"]["torch_eager"] = timing
        out["zero_sum_rm_plus"]["torch_check"] = check
        out["cosine_similarity"] = torch_cosine(torch, args)
        out["coordinate_median"] = torch_median(torch, args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
