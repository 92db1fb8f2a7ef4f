#!/usr/bin/env python3
"""Runs the attention prefill check exported by `tests/flash_attention.rs` on an NVIDIA GPU.

For each case: random q, k, v (PyTorch, `[B, S, H, D]` as kiln stores them), the kernel
loaded from its PTX (CuPy's RawModule, JIT-compiled by the driver) and launched once, its
output compared with PyTorch's `scaled_dot_product_attention` (math backend) in f32 rounded to the input
dtype (GQA by repeating the key/value heads; relative error max |a - b| / max |b| at most
2e-2), then the kernel and PyTorch's flash backend (on the same memory, as `[B, H, S, D]`
views) timed with CUDA events (median of 20 after 3 warm-ups). TFLOP/s count the two
products, `4 · B · H · S · T · D`, half of it for causal cases. Prints one JSON line per
case; exits non-zero when a result is wrong.

Usage: python3 gpu-kernels/tools/flash_gpu_check.py DIR [--small]
(`--small`: no timing, and the cases of at most 2^34 multiply-adds, for compute-sanitizer.)
"""
import json
import sys

import cupy as cp
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gemm_gpu_check import median_ms


def main():
    root = sys.argv[1]
    small = "--small" in sys.argv[2:]
    manifest = json.load(open(f"{root}/manifest.json"))
    torch.manual_seed(0)
    failures = 0
    for case in manifest["cases"]:
        (b, s, h, d), (_, t, kv, _), _ = case["inputs"]
        flops = 4 * b * h * s * t * d // (2 if case["causal"] else 1)
        if small and flops > 1 << 36:
            continue
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[case["dtype"]]
        q = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
        k = torch.randn(b, t, kv, d, device="cuda", dtype=dtype)
        v = torch.randn(b, t, kv, d, device="cuda", dtype=dtype)
        # [B, S, H, D] -> [B, H, S, D]; key/value heads repeated for GQA.
        heads = lambda x: x.transpose(1, 2)
        rep = lambda x: heads(x).repeat_interleave(h // kv, dim=1)
        # The math backend: plain matmuls and softmax in f32 (PyTorch's memory-efficient
        # f32 kernel trips compute-sanitizer's racecheck on its own shared memory).
        with sdpa_kernel(SDPBackend.MATH):
            want = torch.nn.functional.scaled_dot_product_attention(
                heads(q).float(), rep(k).float(), rep(v).float(), is_causal=case["causal"])
        want = want.transpose(1, 2).to(dtype)
        out = torch.full((b, s, h, d), float("nan"), device="cuda", dtype=dtype)
        tensors = {"input": [q, k, v], "output": [out]}
        module = cp.RawModule(path=f"{root}/{case['ptx']}")
        kernel = module.get_function(case["kernel"])
        args = []
        for p in case["params"]:
            kind = "input" if "input" in p else "output"
            args.append(cp.uint64(tensors[kind][p[kind]].data_ptr()))
        args = tuple(args)
        grid, block = tuple(case["grid"]), (case["block"], 1, 1)
        # Shared arrays beyond 48 KiB live in dynamic shared memory: the kernel opts in
        # once and every launch passes the bytes.
        dynamic = case.get("dynamic_shared_bytes", 0)
        if dynamic:
            kernel.max_dynamic_shared_size_bytes = dynamic

        def launch():
            kernel(grid, block, args, shared_mem=dynamic)

        launch()
        torch.cuda.synchronize()
        err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
        ok = err <= 2e-2
        failures += 0 if ok else 1
        if small:
            print(json.dumps({"case": case["function"], "ok": ok, "rel_err": err}), flush=True)
            continue
        kq, kk, kv_ = heads(q), heads(k), heads(v)

        def reference():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(
                    kq, kk, kv_, is_causal=case["causal"], enable_gqa=h != kv)

        kiln_ms = median_ms(launch)
        torch_ms = median_ms(reference)
        print(json.dumps({
            "case": case["function"], "kernel": case["kernel"],
            "b": b, "s": s, "t": t, "h": h, "kv": kv, "d": d, "causal": case["causal"],
            "ok": ok, "rel_err": err,
            "kiln_ms": kiln_ms, "torch_flash_ms": torch_ms, "ratio_vs_torch": torch_ms / kiln_ms,
            "kiln_tflops": flops / kiln_ms / 1e9, "torch_tflops": flops / torch_ms / 1e9,
        }), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
