#!/usr/bin/env python3
"""Runs the GPU check exported by `tests/gpu_check.rs` (see there) on an NVIDIA GPU.

Loads each PTX module through the driver (CuPy's RawModule), launches every check's
kernel on the exported inputs and compares the output buffers with the expected bytes:
exactly for integers and f8 bytes, within `max_ulps` for floats (any NaN equals any NaN).
Prints one line per check and exits non-zero when one fails.

Usage: python3 tools/gpu_check.py DIR
"""
import json
import sys

import cupy as cp
import numpy as np


def ordinal(bits, width):
    """Maps sign-magnitude float bits to integers ordered like the floats."""
    bits = bits.astype(np.int64)
    sign = 1 << (width - 1)
    return np.where(bits & sign, -(bits & (sign - 1)), bits)


def compare(dtype, got, want, max_ulps):
    """Returns (mismatches, worst ulps, first bad index)."""
    if dtype in ("f32", "bf16", "f16"):
        width = 32 if dtype == "f32" else 16
        view = np.uint32 if width == 32 else np.uint16
        g = np.frombuffer(got, dtype=view)
        w = np.frombuffer(want, dtype=view)
        if dtype == "f32":
            g_nan = np.isnan(g.view(np.float32))
            w_nan = np.isnan(w.view(np.float32))
        elif dtype == "f16":
            g_nan = np.isnan(g.view(np.float16))
            w_nan = np.isnan(w.view(np.float16))
        else:
            g_nan = ((g & 0x7F80) == 0x7F80) & ((g & 0x7F) != 0)
            w_nan = ((w & 0x7F80) == 0x7F80) & ((w & 0x7F) != 0)
        ulps = np.abs(ordinal(g, width) - ordinal(w, width))
        ulps = np.where(g_nan & w_nan, 0, ulps)
        ulps = np.where(g_nan != w_nan, 1 << 40, ulps)
    else:
        g = np.frombuffer(got, dtype=np.uint8).astype(np.int64)
        w = np.frombuffer(want, dtype=np.uint8).astype(np.int64)
        ulps = np.abs(g - w)
        if dtype in ("e4m3", "e5m2"):
            nan = (lambda b: (b & 0x7F) == 0x7F) if dtype == "e4m3" else (lambda b: (b & 0x7F) > 0x7C)
            both = nan(g) & nan(w)
            ulps = np.where(both, 0, ulps)
    bad = np.nonzero(ulps > max_ulps)[0]
    worst = int(ulps.max()) if len(ulps) else 0
    return len(bad), worst, (int(bad[0]) if len(bad) else None), g, w


def main():
    root = sys.argv[1]
    manifest = json.load(open(f"{root}/manifest.json"))
    inputs = open(f"{root}/inputs.bin", "rb").read()
    expected = open(f"{root}/expected.bin", "rb").read()
    modules = {name: cp.RawModule(path=f"{root}/{file}") for name, file in manifest["modules"].items()}
    failures = 0
    for check in manifest["checks"]:
        kernel = modules[check["module"]].get_function(check["kernel"])
        buffers = []
        for spec in check["buffers"]:
            if spec.get("zero"):
                buffers.append(cp.zeros(spec["bytes"], dtype=cp.uint8))
            else:
                data = np.frombuffer(inputs, dtype=np.uint8, count=spec["bytes"], offset=spec["offset"])
                buffers.append(cp.asarray(data.copy()))
        scalars = []
        for s in check["scalars"]:
            scalars.append({"i64": np.int64, "i32": np.int32, "f32": np.float32, "u8": np.uint8}[s["type"]](s["value"]))
        kernel(tuple(check["grid"]), (check["block"], 1, 1), tuple(buffers) + tuple(scalars))
        cp.cuda.runtime.deviceSynchronize()
        for c in check["compare"]:
            got = cp.asnumpy(buffers[c["buffer"]]).tobytes()
            spec = c["expected"]
            want = expected[spec["offset"]:spec["offset"] + spec["bytes"]]
            bad, worst, first, g, w = compare(c["dtype"], got, want, c["max_ulps"])
            status = "ok" if bad == 0 else "FAIL"
            detail = ""
            if bad:
                failures += 1
                detail = f" first at element {first}: got {g[first]:#x}, expected {w[first]:#x}"
            print(f"{status:4} {check['name']:<40} buffer {c['buffer']} {c['dtype']:<5} "
                  f"worst {worst} ulp (allowed {c['max_ulps']}), {bad} over{detail}")
    print(f"{failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
