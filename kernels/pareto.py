"""On-device Gram matrix and Pareto solver for the balanced AutoCDSR step.

Everything is tensor ops on the gradients' device: no .item(), no host branch on a value, so
the step can be captured by torch.compile(fullgraph=True) or a CUDA graph.

The ParetoMTL step needs the min-norm element of the convex hull of the two L2-normalised
gradients and the active constraint directions r . (g_cd, g_rec). All of them lie in the plane
spanned by the two gradients, and their hull never contains the origin unless the gradients
are parallel, so the minimum lies on an edge: the best two-point combination over all pairs
is exact, with no iterations. The two-point formula is the paper code's (including its
0.999 / 0.001 clipping at the vertices), so the result matches kernels.reference_pareto.
"""
import functools
import itertools

import torch

# The ParetoMTL preference vectors over the (cd, rec) losses and the current one, as in the
# official AutoCDSR code (kernels.reference_pareto keeps its own copy: the oracle shares nothing).
PREFERENCE_VECTORS = ((0.0, 1.0), (1.0, 0.0), (0.7071, 0.7071))
CURRENT_PREFERENCE = 1
MAX_TASK_VECTORS = 8
# mgda: alpha (the weight on g_rec) = 0 means the cd gradient alone is the min-norm point and
# lambda = (1 - alpha) / alpha would be infinite; alpha is floored so lambda <= this.
MGDA_MAX_LAMBDA = 10.0


def _squared_norms(tensors):
    """[n] float32 squared norms, one multi-tensor norm kernel (per dtype group)."""
    return torch.stack(torch._foreach_norm(tensors)).float().pow(2)


def gram_matrix(grads):
    """[T, T] Gram matrix of T gradient lists (one tensor per parameter, None = zero).

    No concatenated copy of the gradients and few kernel launches: per-parameter squared
    norms come from one multi-tensor norm per task (computed once), and each inner product
    from the polarisation identity <a, b> = (|a + b|^2 - |a|^2 - |b|^2) / 2 over the
    parameters both tasks have.
    """
    num_tasks = len(grads)
    ref = next(g for task in grads for g in task if g is not None)
    zero = torch.zeros((), device=ref.device, dtype=torch.float32)
    present = [[p for p, g in enumerate(task) if g is not None] for task in grads]
    norms = [dict(zip(idx, _squared_norms([grads[t][p] for p in idx]).unbind())) if idx else {}
             for t, idx in enumerate(present)]
    entries = [[zero] * num_tasks for _ in range(num_tasks)]
    for i in range(num_tasks):
        entries[i][i] = torch.stack(list(norms[i].values())).sum() if norms[i] else zero
        for j in range(i + 1, num_tasks):
            common = [p for p in present[i] if p in norms[j]]
            if common:
                both = _squared_norms(torch._foreach_add([grads[i][p] for p in common],
                                                         [grads[j][p] for p in common])).sum()
                alone = torch.stack([norms[i][p] + norms[j][p] for p in common]).sum()
                entries[i][j] = entries[j][i] = 0.5 * (both - alone)
    return torch.stack([torch.stack(row) for row in entries])


@functools.lru_cache(maxsize=None)
def _pair_indices(n, device):
    """Index tensors of all pairs i < j, built once per device: a host-to-device copy in
    every step would be a synchronisation point."""
    pairs = list(itertools.combinations(range(n), 2))
    return (torch.tensor([i for i, _ in pairs], device=device),
            torch.tensor([j for _, j in pairs], device=device))


@functools.lru_cache(maxsize=None)
def _constraint_rows(device):
    """([3, 2] constraint directions p_j - p_current, [5, 2] task-vector rows), cached."""
    prefs = torch.tensor(PREFERENCE_VECTORS, dtype=torch.float64, device=device)
    constraints = prefs - prefs[CURRENT_PREFERENCE]
    rows = torch.cat([torch.eye(2, dtype=torch.float64, device=device), constraints])
    return constraints, rows


def min_norm_element_from2(v1v1, v1v2, v2v2):
    """Tensor version of the paper code's two-point min-norm element: (c, cost)."""
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    cost = v2v2 + gamma * (v1v2 - v2v2)
    first_vertex = v1v2 >= v1v1
    second_vertex = ~first_vertex & (v1v2 >= v2v2)
    gamma = torch.where(first_vertex, 0.999, torch.where(second_vertex, 0.001, gamma))
    cost = torch.where(first_vertex, v1v1, torch.where(second_vertex, v2v2, cost))
    return gamma, cost


def min_norm_element_exact(v1v1, v1v2, v2v2):
    """Unclipped two-point min-norm element: c in [0, 1] and its cost."""
    gamma = (-1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))).clamp(0.0, 1.0)
    gamma = torch.where(torch.isnan(gamma), 1.0, gamma)  # coincident points: either vertex
    cost = gamma * gamma * v1v1 + 2 * gamma * (1 - gamma) * v1v2 + (1 - gamma) ** 2 * v2v2
    return gamma, cost


def min_norm_pairwise(dps, valid):
    """Min-norm element of the hull of the valid task vectors, when it lies on an edge.

    dps: [..., n, n] Gram matrix, valid: [..., n] bool, n <= MAX_TASK_VECTORS.
    Returns the [..., n] weights (at most two non-zero entries). With two vectors this is
    the paper code's clipped two-point formula (its answer for two tasks); with three or
    more, the paper code's Frank-Wolfe loop refines the clipped start to the exact minimum,
    so the unclipped formula is used. Ties go to the first pair in (i < j) order.
    """
    n = dps.shape[-1]
    if n > MAX_TASK_VECTORS:
        raise ValueError(f"at most {MAX_TASK_VECTORS} task vectors, got {n}")
    first, second = _pair_indices(n, dps.device)
    diag = torch.diagonal(dps, dim1=-2, dim2=-1)
    v1v1, v1v2, v2v2 = diag[..., first], dps[..., first, second], diag[..., second]
    gamma, cost = min_norm_element_from2(v1v1, v1v2, v2v2)
    exact_gamma, exact_cost = min_norm_element_exact(v1v1, v1v2, v2v2)
    refine = (valid.sum(dim=-1, keepdim=True) >= 3)
    gamma = torch.where(refine, exact_gamma, gamma)
    cost = torch.where(refine, exact_cost, cost)
    usable = valid[..., first] & valid[..., second] & ~torch.isnan(cost)
    cost = torch.where(usable, cost, torch.inf)
    best = torch.argmin(cost, dim=-1, keepdim=True)
    gamma = torch.gather(gamma, -1, best)
    sol = torch.zeros_like(diag)
    sol = sol.scatter(-1, first[best], gamma).scatter_add(-1, second[best], 1 - gamma)
    return sol


def pareto_weights(gram, losses):
    """(cd, rec) weights of the ParetoMTL step; gram [..., 2, 2] unnormalised, losses [..., 2]."""
    gram = gram.double()
    losses = losses.double()
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1))
    normalised = gram / (norms[..., :, None] * norms[..., None, :])
    constraints, rows = _constraint_rows(gram.device)                      # [3, 2], [5, 2]
    unit_losses = losses / torch.linalg.vector_norm(losses, dim=-1, keepdim=True)
    active = (unit_losses @ constraints.T) > 0                             # [..., 3]
    dps = rows @ normalised @ rows.T                                       # [..., 5, 5]
    valid = torch.cat([torch.ones_like(active[..., :2]), active], dim=-1)
    sol = min_norm_pairwise(dps, valid)
    return sol @ rows                                                      # [..., 2]


def pareto_lambda(gram, losses, mode="pareto"):
    """lambda (weight of L_cd relative to L_rec) and an ok flag, both tensors on the device.

    gram: [..., 2, 2] Gram matrix of the unnormalised (cd, rec) gradients; losses: [..., 2]
    (L_cd, L_rec). Leading dimensions batch independent problems. Where the inputs are
    degenerate (a zero gradient, NaN / inf), lam = 0 and ok = False: the caller then steps on
    g_rec alone. mgda's lambda is at most MGDA_MAX_LAMBDA (alpha floored, ok stays True).
    """
    if mode == "pareto":
        w_cd, w_rec = pareto_weights(gram, losses).unbind(-1)
        lam = w_cd / w_rec
    elif mode == "mgda":
        gram = gram.double()
        g_cc, g_rc, g_rr = gram[..., 0, 0], gram[..., 1, 0], gram[..., 1, 1]
        alpha = ((g_cc - g_rc) / (g_rr + g_cc - 2 * g_rc)).clamp(1.0 / (1.0 + MGDA_MAX_LAMBDA), 1.0)
        lam = (1 - alpha) / alpha
    else:
        raise ValueError(f"mode must be 'pareto' or 'mgda', got {mode!r}")
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    ok = torch.isfinite(lam) & (diag > 0).all(dim=-1)  # a zero gradient: no balancing
    lam = torch.where(ok, lam, 0.0).to(torch.float32)
    return lam, ok


def gradient_cosine(gram):
    """Cosine of the two gradients from their Gram matrix (NaN-free: 0 where undefined)."""
    denom = torch.sqrt(gram[..., 0, 0] * gram[..., 1, 1])
    cos = gram[..., 0, 1] / denom
    return torch.where(torch.isfinite(cos), cos, 0.0)


@functools.lru_cache(maxsize=None)
def _compiled_solver(mode):
    return torch.compile(functools.partial(pareto_lambda, mode=mode), fullgraph=True, dynamic=False)


def pareto_lambda_fused(gram, losses, mode="pareto"):
    """pareto_lambda compiled (fullgraph) into a few fused kernels on CUDA, where the eager
    version's ~50 tiny launches dominate its cost; eager elsewhere. Not yet the training
    default: bench/bench_solver.py checks and times it on the next GPU run."""
    if gram.device.type != "cuda":
        return pareto_lambda(gram, losses, mode)
    return _compiled_solver(mode)(gram, losses)
