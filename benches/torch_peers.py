"""PyTorch peers for `kiln bench kernels` (compiler/driver/src/bench.rs): the same shapes and dtypes, timed with CUDA
events (warm-up, median), eager and torch.compile. Prints one JSON object.

    python3 benches/torch_peers.py [RUNS]
"""

import json
import statistics
import sys

import torch

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 50
dev = "cuda"


def timed(fn, *args):
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    samples = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def add_rms_norm(x, r, w):
    h = x + r
    hf = h.float()
    n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)
    return h, n.to(h.dtype) * w


def swiglu_act(g, u):
    return torch.nn.functional.silu(g) * u


def rotary(q, cos, sin):
    half = q.shape[-1] // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos + rot * sin


def linear_chain(x, *weights):
    for w in weights:
        x = torch.nn.functional.linear(x, w)
    return x


def main():
    t = 16384
    bf = torch.bfloat16
    x = torch.randn(256 << 20, device=dev, dtype=bf)
    cases = {
        "copy": (lambda a: a.clone(), (x,), 2 * 2 * x.numel()),
        "add_rms_norm": (add_rms_norm, (torch.randn(t, 4096, device=dev, dtype=bf), torch.randn(t, 4096, device=dev, dtype=bf),
                                        torch.randn(4096, device=dev, dtype=bf)), 4 * t * 4096 * 2 + 4096 * 2),
        "swiglu_act": (swiglu_act, (torch.randn(t, 14336, device=dev, dtype=bf), torch.randn(t, 14336, device=dev, dtype=bf)), 3 * t * 14336 * 2),
    }
    pos = torch.arange(t, device=dev) % 4096
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    ang = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[:, None, :]
    cases["rotary"] = (rotary, (torch.randn(t, 32, 128, device=dev, dtype=bf), emb.cos().to(bf), emb.sin().to(bf)), 2 * t * 32 * 128 * 2 + t * 8)
    # Decode shapes whose weight fits in L2 run as a chain of four weights (as kiln's do).
    for name, m, n, k, chain in [("gemm_4096", 4096, 4096, 4096, 1), ("gemm_8192", 8192, 8192, 8192, 1),
                                 ("gemm_4096x14336", 4096, 14336, 4096, 1), ("decode_m1_4096", 1, 4096, 4096, 4),
                                 ("decode_m16_4096", 16, 4096, 4096, 4), ("decode_m1_14336", 1, 14336, 4096, 1),
                                 ("decode_m16_14336", 16, 14336, 4096, 1)]:
        nbytes = chain * (n * k * 2 if m <= 16 else (m * k + n * k + m * n) * 2)
        weights = [torch.randn(n, k, device=dev, dtype=bf) for _ in range(chain)]
        cases[name] = (linear_chain, (torch.randn(m, k, device=dev, dtype=bf), *weights), nbytes)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": RUNS, "eager": {}, "compiled": {}}
    for name, (fn, args, nbytes) in cases.items():
        ms = timed(fn, *args)
        out["eager"][name] = {"median_ms": ms, "gb_per_s": nbytes / (ms * 1e-3) / 1e9}
        if name != "copy" and not name.startswith(("gemm", "decode")):
            cfn = torch.compile(fn)
            ms = timed(cfn, *args)
            out["compiled"][name] = {"median_ms": ms, "gb_per_s": nbytes / (ms * 1e-3) / 1e9}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
