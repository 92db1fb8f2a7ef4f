"""Independent f64 references for kiln's consensus kernels (stdlib/consensus.kiln).

Reads one JSON request on stdin, {"cases": [{"kind": ..., ...}, ...]}, and writes
{"results": [...]} on stdout, one result per case, in order. The references are numpy,
scipy (linprog with HiGHS), QuantEcon (Lemke-Howson, Howson's polymatrix solver) and
pref_voting; nothing here shares code with kiln. Used by tests/suite/consensus.rs.
"""

import json
import sys

import numpy as np


def lp_value(case):
    """The value of each zero-sum game A [G][M][N] (row player maximizes), by linear
    programming: max v subject to Aᵀx >= v, Σx = 1, x >= 0."""
    from scipy.optimize import linprog

    values = []
    for a in case["A"]:
        a = np.asarray(a, dtype=np.float64)
        m, n = a.shape
        c = np.zeros(m + 1)
        c[-1] = -1.0
        a_ub = np.hstack([-a.T, np.ones((n, 1))])
        a_eq = np.zeros((1, m + 1))
        a_eq[0, :m] = 1.0
        res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0],
                      bounds=[(0, None)] * m + [(None, None)], method="highs")
        assert res.status == 0, res.message
        values.append(-res.fun)
    return {"value": values}


def nashconv(case):
    """NashConv r_x + r_y of profiles (x, y) in bimatrix games (A, B)."""
    out = []
    for a, b, x, y in zip(case["A"], case["B"], case["x"], case["y"]):
        a, b, x, y = (np.asarray(v, dtype=np.float64) for v in (a, b, x, y))
        rx = (a @ y).max() - x @ a @ y
        ry = (x @ b).max() - x @ b @ y
        out.append(rx + ry)
    return {"nashconv": out}


def lemke_howson(case):
    """One exact equilibrium of each bimatrix game by QuantEcon's Lemke-Howson."""
    from quantecon.game_theory import NormalFormGame, Player
    from quantecon.game_theory import lemke_howson as lh

    xs, ys = [], []
    for a, b in zip(case["A"], case["B"]):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        # QuantEcon stores each player's payoffs with its own actions first.
        g = NormalFormGame((Player(a), Player(b.T)))
        x, y = lh(g)
        xs.append(list(x))
        ys.append(list(y))
    return {"x": xs, "y": ys}


def polymatrix(case):
    """An exact equilibrium of each consensus game (S [K][K], P [N][K], λ) by QuantEcon's
    Howson solver, with the game written as a polymatrix game: player i against j has the
    matrix λ S + P_i / (N - 1) (the preference term spread over the N - 1 opponents)."""
    from quantecon.game_theory import PolymatrixGame, polym_lcp_solver

    sigmas = []
    for s, p in zip(case["S"], case["P"]):
        s = np.asarray(s, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        n, k = p.shape
        lam = case["lam"]
        mats = {}
        for i in range(n):
            for j in range(n):
                if i != j:
                    mats[(i, j)] = lam * s + p[i][:, None] / (n - 1)
        game = PolymatrixGame(mats, nums_actions=[k] * n)
        ne = polym_lcp_solver(game)
        sigmas.append([list(row) for row in ne])
    return {"sigma": sigmas}


def robust(case):
    """Coordinate median, trimmed mean, Krum scores and selections of U [K][P]."""
    u = np.asarray(case["U"], dtype=np.float64)
    k = u.shape[0]
    trim = case["trim"]
    f = case["f"]
    m = case["m"]
    srt = np.sort(u, axis=0)
    trimmed = srt[trim:k - trim].mean(axis=0)
    d = ((u[:, None, :] - u[None, :, :]) ** 2).sum(-1)
    scores = []
    for i in range(k):
        others = np.sort(np.delete(d[i], i))
        scores.append(others[: k - f - 2].sum())
    scores = np.asarray(scores)
    order = np.argsort(scores, kind="stable")
    chosen = order[:m]
    return {
        "median": list(np.median(u, axis=0)),
        "trimmed_mean": list(trimmed),
        "krum_scores": list(scores),
        "krum": int(order[0]),
        "multi_krum_selected": sorted(int(i) for i in chosen),
        "multi_krum": list(u[chosen].mean(axis=0)),
    }


def geometric_median(case):
    """The minimum of Σ w_k ‖U_k - z‖ by scipy's BFGS from a long f64 Weiszfeld run."""
    from scipy.optimize import minimize

    u = np.asarray(case["U"], dtype=np.float64)
    w = np.asarray(case["w"], dtype=np.float64)

    def objective(z):
        return float((w * np.sqrt(((u - z) ** 2).sum(-1))).sum())

    z = (w[:, None] * u).sum(0) / w.sum()
    for _ in range(20000):
        dist = np.maximum(np.sqrt(((u - z) ** 2).sum(-1)), 1e-15)
        c = w / dist
        z = (c[:, None] * u).sum(0) / c.sum()
    res = minimize(objective, z, method="BFGS", options={"gtol": 1e-12})
    best = min(objective(z), float(res.fun))
    return {"objective": best}


def votes(case):
    """Borda, plurality, pairwise support, Condorcet winner and Copeland scores by
    pref_voting, for R [G][V][C] (positions) with integer voter counts w [G][V]."""
    from pref_voting.profiles import Profile

    out = {"borda": [], "plurality": [], "support": [], "condorcet": [], "copeland": []}
    for r, w in zip(case["R"], case["w"]):
        r = np.asarray(r)
        c = r.shape[1]
        rankings = [list(np.argsort(row)) for row in r]
        prof = Profile([[int(x) for x in rk] for rk in rankings], rcounts=[int(x) for x in w])
        cands = list(range(c))
        borda = prof.borda_scores()
        plur = prof.plurality_scores()
        cop = prof.copeland_scores()
        cw = prof.condorcet_winner()
        out["borda"].append([float(borda[x]) for x in cands])
        out["plurality"].append([float(plur[x]) for x in cands])
        out["support"].append([[float(prof.support(a, b)) if a != b else 0.0 for b in cands]
                               for a in cands])
        out["condorcet"].append(-1 if cw is None else int(cw))
        out["copeland"].append([float(cop[x]) for x in cands])
    return out


def degroot(case):
    """A step-by-step f64 replay of consensus_round."""
    e0 = np.asarray(case["E"], dtype=np.float64)
    tau, alpha, tol, rounds = case["tau"], case["alpha"], case["tol"], case["rounds"]
    finals, centers, winners, used = [], [], [], []
    for e in e0:
        x = e.copy()
        ran = 0
        for _ in range(rounds):
            n = x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-12)
            s = n @ n.T / tau
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            x = (1 - alpha) * x + alpha * (w @ x)
            ran += 1
            if np.sqrt(((x - x.mean(0)) ** 2).sum(-1)).max() <= tol:
                break
        center = x.mean(0)
        c = center / np.sqrt((center ** 2).sum() + 1e-12)
        en = e / np.sqrt((e * e).sum(-1, keepdims=True) + 1e-12)
        finals.append(x.tolist())
        centers.append(center.tolist())
        winners.append(int(np.argmax(en @ c)))
        used.append(ran)
    return {"E": finals, "center": centers, "winner": winners, "used": used}


KINDS = {
    "lp_value": lp_value,
    "nashconv": nashconv,
    "lemke_howson": lemke_howson,
    "polymatrix": polymatrix,
    "robust": robust,
    "geometric_median": geometric_median,
    "votes": votes,
    "degroot": degroot,
}


def main():
    request = json.load(sys.stdin)
    results = [KINDS[case["kind"]](case) for case in request["cases"]]
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    main()
