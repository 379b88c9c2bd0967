"""The official AutoCDSR code's Pareto solver, ported faithfully on host floats: Sener &
Koltun's MinNormSolver with its Frank-Wolfe loop, and the ParetoMTL preference step. The
oracle of kernels.pareto (it shares no code or constants with it). Losses are ordered
(cd, rec)."""
import math

import torch

PREFERENCE_VECTORS = ((0.0, 1.0), (1.0, 0.0), (0.7071, 0.7071))
CURRENT_PREFERENCE = 1
MAX_ITER = 250
STOP_CRIT = 1e-5
MGDA_MAX_LAMBDA = 10.0  # not in the paper code (two tasks only there): this project's rule


def min_norm_element_from2(v1v1, v1v2, v2v2):
    """min_c |c x1 + (1-c) x2|^2 from the three inner products; returns (c, cost).
    The paper code clips the vertex cases to c = 0.999 / 0.001, kept here on purpose."""
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def min_norm_2d(dps, n):
    """Best two-point combination over all pairs (i < j); returns ((i, j), c, cost)."""
    dmin, sol = math.inf, None
    for i in range(n):
        for j in range(i + 1, n):
            c, d = min_norm_element_from2(dps[i][i], dps[i][j], dps[j][j])
            if math.isnan(d):
                continue
            if d < dmin:
                dmin, sol = d, ((i, j), c, d)
    return sol


def find_min_norm_element_fw(dps):
    """Frank-Wolfe min-norm element of the convex hull, from the Gram matrix `dps` (lists).
    Returns (weights, cost) exactly as the paper code's find_min_norm_element_FW."""
    n = len(dps)
    init = min_norm_2d(dps, n)
    if init is None:
        raise FloatingPointError("no finite two-point solution")
    sol = [0.0] * n
    sol[init[0][0]] = init[1]
    sol[init[0][1]] = 1 - init[1]
    if n < 3:
        return sol, init[2]
    cost = init[2]
    for _ in range(MAX_ITER):
        grad = [sum(dps[i][j] * sol[j] for j in range(n)) for i in range(n)]
        t = min(range(n), key=lambda i: grad[i])  # first minimum, as np.argmin
        v1v1 = sum(sol[i] * grad[i] for i in range(n))
        v1v2 = sum(sol[i] * dps[i][t] for i in range(n))
        v2v2 = dps[t][t]
        nc, cost = min_norm_element_from2(v1v1, v1v2, v2v2)
        new = [nc * s for s in sol]
        new[t] += 1 - nc
        if sum(abs(a - b) for a, b in zip(new, sol)) < STOP_CRIT:
            return sol, cost
        sol = new
    return sol, cost


def pareto_weights(gram, losses):
    """ParetoMTL step on the L2-normalised gradients: returns the (cd, rec) weights before
    the sum-|w| normalisation (which does not change lambda)."""
    norms = [math.sqrt(gram[t][t]) for t in range(2)]
    g = [[gram[i][j] / (norms[i] * norms[j]) for j in range(2)] for i in range(2)]
    loss_norm = math.sqrt(losses[0] ** 2 + losses[1] ** 2)
    current = PREFERENCE_VECTORS[CURRENT_PREFERENCE]
    w = [(p[0] - current[0], p[1] - current[1]) for p in PREFERENCE_VECTORS]
    active = [r for r in w if (r[0] * losses[0] + r[1] * losses[1]) / loss_norm > 0]
    # The task vectors are the two gradients and, per active constraint r, r . (g_cd, g_rec):
    # their Gram matrix follows from the 2x2 one.
    rows = [(1.0, 0.0), (0.0, 1.0)] + active
    dps = [[sum(a[i] * g[i][j] * b[j] for i in range(2) for j in range(2)) for b in rows]
           for a in rows]
    sol, _ = find_min_norm_element_fw(dps)
    weight = [sol[0], sol[1]]
    for s, r in zip(sol[2:], active):
        weight[0] += s * r[0]
        weight[1] += s * r[1]
    return weight


def gram_matrix(grads):
    """Host Gram matrix (list of lists of floats) of T per-parameter gradient lists."""
    return [[sum(float(torch.dot(a.flatten().double(), b.flatten().double()))
                 for a, b in zip(gi, gj)) for gj in grads] for gi in grads]


def pareto_lambda(gram, losses, mode="pareto"):
    """lambda for the (cd, rec) pair as host floats; returns (lam, ok) with lam = 0 on failure.

    gram: [[G_cc, G_cr], [G_rc, G_rr]] of the unnormalised gradients; losses: (L_cd, L_rec).
    """
    try:
        if mode == "pareto":
            w_cd, w_rec = pareto_weights(gram, losses)
            lam = w_cd / w_rec
        elif mode == "mgda":
            g_cc, g_rc, g_rr = gram[0][0], gram[1][0], gram[1][1]
            alpha = (g_cc - g_rc) / (g_rr + g_cc - 2 * g_rc)
            alpha = min(max(alpha, 1.0 / (1.0 + MGDA_MAX_LAMBDA)), 1.0)  # lambda <= 10
            lam = (1 - alpha) / alpha
        else:
            raise ValueError(f"mode must be 'pareto' or 'mgda', got {mode!r}")
    except (ZeroDivisionError, FloatingPointError):
        return 0.0, False
    if not math.isfinite(lam) or not (gram[0][0] > 0 and gram[1][1] > 0):
        return 0.0, False  # a zero (or non-finite) gradient: no balancing this step
    return lam, True
