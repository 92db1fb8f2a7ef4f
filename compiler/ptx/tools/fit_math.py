#!/usr/bin/env python3
"""Derives the polynomial coefficients of kiln's f32 math routines (`src/numeric/coefficients.rs`).

Each routine approximates a smooth part of its function on a reduced interval with a
polynomial fitted by the Remez exchange algorithm (weighted minimax over a basis of
powers), computed in 30-digit arithmetic with mpmath, then rounded to f32. The real
error of the f32 evaluation is measured by the Rust tests (`tests/math_accuracy.rs`),
not here: this script only prints the minimax error of the exact-coefficient fit.

Usage: python3 compiler/ptx/tools/fit_math.py   (needs `mpmath`)
"""
import struct
from mpmath import mp, mpf, matrix, lu_solve, cos, pi, exp, log, log1p, sin, tanh, erf, erfc, sqrt

mp.dps = 30


def remez(target, basis, weight, lo, hi, iterations=25, grid=3000):
    """Minimises max |weight(x) * (target(x) - sum c_j basis_j(x))| over [lo, hi]."""
    n = len(basis)
    points = [(lo + hi) / 2 - (hi - lo) / 2 * cos(pi * i / n) for i in range(n + 1)]
    xs = [lo + (hi - lo) * mpf(i) / grid for i in range(grid + 1)]
    best = None
    for _ in range(iterations):
        a = matrix(n + 1, n + 1)
        b = matrix(n + 1, 1)
        for i, x in enumerate(points):
            for j, phi in enumerate(basis):
                a[i, j] = phi(x)
            a[i, n] = (-1) ** i / weight(x)
            b[i] = target(x)
        sol = lu_solve(a, b)
        coeffs = [sol[j] for j in range(n)]

        def err(x):
            return weight(x) * (target(x) - sum(c * phi(x) for c, phi in zip(coeffs, basis)))

        values = [err(x) for x in xs]
        worst = max(abs(v) for v in values)
        if best is None or worst < best[1]:
            best = (coeffs, worst)
        # one extremum per run of equal sign
        extrema = []
        start = 0
        for i in range(1, len(xs) + 1):
            if i == len(xs) or (values[i] > 0) != (values[start] > 0):
                k = max(range(start, i), key=lambda m: abs(values[m]))
                extrema.append(k)
                start = i
        while len(extrema) > n + 1:
            # drop the smaller end
            if abs(values[extrema[0]]) < abs(values[extrema[-1]]):
                extrema.pop(0)
            else:
                extrema.pop()
        if len(extrema) < n + 1:
            break
        points = [xs[k] for k in extrema]
    return best


def f32(x):
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def show(name, coeffs, error):
    print(f"// {name}: minimax error {float(error):.3e} (2^{float(log(error, 2)):.2f})")
    print("[" + ", ".join(f"{f32(c)!r}" for c in coeffs) + "]")


def power(k):
    return lambda x: x ** k


def main():
    # exp: e^r = 1 + r * E(r) on |r| <= ln2/2 (+ slack); relative error of e^r.
    r_max = log(2) / 2 * mpf("1.0005")
    coeffs, e = remez(lambda r: exp(r) - 1, [power(k + 1) for k in range(6)],
                      lambda r: 1 / exp(r), -r_max, r_max)
    show("exp E(r), r^0..r^5", coeffs, e)

    # log: log1p(f) = f + f^2 * R(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1]; relative error.
    lo, hi = sqrt(mpf(1) / 2) - 1, sqrt(mpf(2)) - 1
    tiny = mpf("1e-30")
    coeffs, e = remez(lambda f: log1p(f) - f, [power(k + 2) for k in range(9)],
                      lambda f: 1 / abs(log1p(f)) if abs(f) > tiny else mpf(10) ** 30, lo, hi)
    show("log R(f), f^0..f^8", coeffs, e)

    # sin: sin r = r + r^3 * S(r^2) on 0 < r <= 0.7916; relative error.
    r_max = mpf("0.7916")
    coeffs, e = remez(lambda r: sin(r) - r, [power(2 * k + 3) for k in range(3)],
                      lambda r: 1 / sin(r), mpf("1e-6"), r_max)
    show("sin S(z), z^0..z^2", coeffs, e)

    # cos: cos r = 1 + r^2 * C(r^2); relative error.
    coeffs, e = remez(lambda r: cos(r) - 1, [power(2 * k + 2) for k in range(4)],
                      lambda r: 1 / cos(r), mpf("1e-6"), r_max)
    show("cos C(z), z^0..z^3", coeffs, e)

    # tanh: tanh x = x + x^3 * T(x^2) on 0 < x <= 0.625; relative error.
    x_max = mpf("0.625")
    coeffs, e = remez(lambda x: tanh(x) - x, [power(2 * k + 3) for k in range(6)],
                      lambda x: 1 / tanh(x), mpf("1e-6"), x_max)
    show("tanh T(z), z^0..z^5", coeffs, e)

    # erf near 0: erf x = x + x * Q(x^2) on 0 < x <= 1; relative error.
    coeffs, e = remez(lambda x: erf(x) - x, [power(2 * k + 1) for k in range(7)],
                      lambda x: 1 / erf(x), mpf("1e-6"), mpf(1))
    show("erf Q(z), z^0..z^6", coeffs, e)

    # erf tail: erfc x = exp(M(x) - x^2) on 1 <= x <= 4; absolute error of erf (weight erfc).
    for degree in (7,):
        coeffs, e = remez(lambda x: log(erfc(x)) + x * x, [power(k) for k in range(degree + 1)],
                          lambda x: erfc(x), mpf(1), mpf(4))
        show(f"erfc M(x), x^0..x^{degree}", coeffs, e)


if __name__ == "__main__":
    main()
