#!/usr/bin/env python3
"""Runs the tensor-core GEMM check exported by `tests/mma_gemm_ptxas.rs` on an NVIDIA GPU.

For each case: random bf16 inputs (PyTorch; FP8 cases: f8e4m3 operands and f32 scales, the
reference `(x @ w.T) * scale_a * scale_b` in f32 rounded to bf16, timed beside
torch._scaled_mm), the case's kernels loaded from their PTX
(CuPy's RawModule, JIT-compiled by the driver) and launched in order (a split-K GEMM: the
partial kernel and the sum kernel, with a workspace allocated here), the output compared with PyTorch's product in f32
rounded to bf16 (relative error max |a - b| / max |b| at most 1e-2), then both timed with
CUDA events (median of 20 after 3 warm-ups). Prints one JSON line per case; exits non-zero
when a result is wrong.

Usage: python3 gpu-kernels/tools/gemm_gpu_check.py DIR [--small]
(`--small`: only the cases of at most 2^30 multiply-adds and no timing, for running under
compute-sanitizer.)
"""
import json
import sys

import cupy as cp
import torch


def median_ms(fn, runs=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    root = sys.argv[1]
    small = "--small" in sys.argv[2:]
    manifest = json.load(open(f"{root}/manifest.json"))
    torch.manual_seed(0)
    failures = 0
    for case in manifest["cases"]:
        x_shape, w_shape = case["inputs"][:2]
        if small and x_shape[0] * w_shape[0] * w_shape[1] > 1 << 30:
            continue
        fp8 = case.get("fp8", False)
        if fp8:
            # f8e4m3 operands in [-2, 2], positive scales (0-d, or [T, 1] and [N]).
            e4m3 = torch.float8_e4m3fn
            x = (torch.rand(x_shape, device="cuda") * 4 - 2).to(e4m3)
            w = (torch.rand(w_shape, device="cuda") * 4 - 2).to(e4m3)
            sa_shape, sb_shape = case["inputs"][2:]
            sa = torch.rand(sa_shape, device="cuda") + 0.5
            sb = torch.rand(sb_shape, device="cuda") + 0.5
            want = ((x.float() @ w.float().T) * sa * sb).bfloat16()
            # torch._scaled_mm takes per-tensor scales, or row-wise [M, 1] and [1, N] ones.
            m, n = x_shape[0], w_shape[0]
            if sa.dim() == 0 and sb.dim() == 0:
                scale_a, scale_b = sa, sb
            else:
                scale_a = sa.reshape(-1, 1).expand(m, 1).contiguous()
                scale_b = sb.reshape(1, -1).expand(1, n).contiguous()
            ref = lambda: torch._scaled_mm(x, w.t(), scale_a=scale_a, scale_b=scale_b,
                                           out_dtype=torch.bfloat16)
        else:
            x = torch.randn(x_shape, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(w_shape, device="cuda", dtype=torch.bfloat16)
            if case["transposed_weight"]:
                ref = lambda: torch.nn.functional.linear(x, w)
                want = (x.float() @ w.float().T).bfloat16()
            else:
                ref = lambda: x @ w
                want = (x.float() @ w.float()).bfloat16()
        out = torch.full(tuple(want.shape), float("nan"), device="cuda", dtype=torch.bfloat16)
        tensors = {"input": [x, w, sa, sb] if fp8 else [x, w], "output": [out]}
        # Workspaces start as NaN bytes, so that a partial sum never written shows.
        temps = {}
        prepared = []
        for step in case["launches"]:
            module = cp.RawModule(path=f"{root}/{step['ptx']}")
            kernel = module.get_function(step["kernel"])
            args = []
            for p in step["params"]:
                if "sym" in p:
                    args.append(cp.int64(case["T"]))
                elif "temp" in p:
                    if p["temp"] not in temps:
                        temps[p["temp"]] = torch.full(
                            (p["bytes"],), 0xFF, device="cuda", dtype=torch.uint8)
                    args.append(cp.uint64(temps[p["temp"]].data_ptr()))
                else:
                    kind = "input" if "input" in p else "output"
                    args.append(cp.uint64(tensors[kind][p[kind]].data_ptr()))
            # Shared memory past the static 48 KiB: the dynamic window, opted into.
            shared = step.get("dynamic_shared_bytes", 0)
            if shared:
                kernel.max_dynamic_shared_size_bytes = shared
            prepared.append(
                (kernel, tuple(step["grid"]), (step["block"], 1, 1), tuple(args), shared))

        def launch():
            for kernel, grid, block, args, shared in prepared:
                kernel(grid, block, args, shared_mem=shared)

        launch()
        torch.cuda.synchronize()
        err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
        ok = err <= 1e-2
        failures += 0 if ok else 1
        m, n = want.shape[-2], want.shape[-1]
        k = x_shape[-1]
        if small:
            print(json.dumps({"case": case["function"], "ok": ok, "rel_err": err}), flush=True)
            continue
        kiln_ms = median_ms(launch)
        try:
            torch_ms = median_ms(ref)
        except RuntimeError as e:  # a torch._scaled_mm without this scale layout
            print(json.dumps({"case": case["function"], "torch_error": str(e)[:200]}), flush=True)
            torch_ms = float("nan")
        flops = 2 * m * n * k
        weight_bytes = w.numel() * w.element_size()
        print(json.dumps({
            "case": case["function"], "kernels": [s["kernel"] for s in case["launches"]],
            "m": m, "n": n, "k": k,
            "ok": ok, "rel_err": err,
            "kiln_ms": kiln_ms, "torch_ms": torch_ms, "ratio_vs_torch": torch_ms / kiln_ms,
            "kiln_tflops": flops / kiln_ms / 1e9, "torch_tflops": flops / torch_ms / 1e9,
            "kiln_weight_tbps": weight_bytes / kiln_ms / 1e9,
        }), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
