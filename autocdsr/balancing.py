"""Balancing L_rec against the cross-domain loss(es): the gradients of the balanced step.

Two ways to the same update g_rec + sum_k lambda_k g_cd_k, with lambda_k solved on a Gram set
of parameters:
- balanced_gradients: g_rec and every g_cd_k in full backward passes (1 + K), the Gram
  matrix over any set (the official `reached` set by default), then the combine;
- one_layer_balanced_gradients (weighting.shared=last_layer): the Gram set is the first norm
  and QKV projection of block l, the last layer whose mass enters L_cd, and the one backward
  pass is cut at block l's input: L_rec's backward above it gives g_rec on the Gram set,
  L_cd_k reaches the Gram set through block l's attention alone, lambda is solved, and the
  backward below block l carries L_rec + sum_k lambda_k L_cd_k. The cost over a base step is
  one attention backward of block l; no second full backward, no repeated loss-head backward.

Either way the lambdas may be gated: by the training batch's own cosine (gate), or by the
running cosine with L_rec's gradient on held-out data (HeldOut, weighting.held_out).
"""
from typing import NamedTuple

import torch

from kernels.pareto import gradient_cosine, gram_matrix, pareto_lambda


class TableReads(NamedTuple):
    """How the losses read the item table params[index]: the lookup vectors = table[items]
    [B, L, H] (the encoder's input) and the loss head's scoring rows `head` (the table's
    leading rows). Gradients are taken with respect to these two instead of the table, and
    the table's gradient is the head's plus one index_add of the looked-up rows: autograd
    would write a dense table-sized gradient for each read and then sum them, three sweeps of
    a table that can hold millions of rows."""
    index: int
    items: torch.Tensor
    vectors: torch.Tensor
    head: torch.Tensor


class HeldOut(NamedTuple):
    """The held-out gate's inputs (weighting.held_out): L_rec's gradient on a held-out batch
    over the Gram set, and the running mean [K] of its cosine with each g_cd_k so far."""
    shared: list
    running: torch.Tensor


HELD_OUT_DECAY = 0.9  # the running cosine's memory: about the last ten solver steps


def table_gradient(table, head_grad, lookup_grad, items):
    """The item table's gradient from the head's [R, H] (its first R rows; None: unread) and
    the lookup's [B, L, H] (None: unreached) gradients. Row 0 is padding: it gets nothing."""
    owned = head_grad is None or head_grad.shape[0] < table.shape[0]  # a tensor made here
    if head_grad is None:
        dense = torch.zeros_like(table)
    elif head_grad.shape[0] < table.shape[0]:
        dense = torch.cat([head_grad, head_grad.new_zeros((table.shape[0] - head_grad.shape[0],
                                                           *head_grad.shape[1:]))])
    else:
        dense = head_grad  # autograd's: not written in place
    if lookup_grad is None:
        return dense
    rows = torch.where((items != 0)[..., None], lookup_grad, 0.0)
    rows = rows.reshape(-1, table.shape[-1]).to(dense.dtype)
    add = torch.Tensor.index_add_ if owned else torch.Tensor.index_add
    return add(dense, 0, items.reshape(-1), rows)


def gradients(output, params, reads=None, retain_graph=False):
    """torch.autograd.grad(output, params), zeros where unreached; with reads (TableReads) the
    table's gradient through table_gradient."""
    if reads is None:
        return _materialise(torch.autograd.grad(output, params, retain_graph=retain_graph,
                                                allow_unused=True), params)
    others = [i for i in range(len(params)) if i != reads.index]
    found = torch.autograd.grad(output, [params[i] for i in others] + [reads.head, reads.vectors],
                                retain_graph=retain_graph, allow_unused=True)
    grads = [None] * len(params)
    for i, g in zip(others, found):
        grads[i] = g
    grads[reads.index] = table_gradient(params[reads.index], found[-2], found[-1], reads.items)
    return _materialise(grads, params)


def balanced_gradients(params, gram_index, loss_rec, loss_cd, mode, lam, solve, reads=None,
                       reduce=None, gate=False, held_out=None):
    """(grads, lam, cosine, ok): the update direction of every parameter.

    loss_cd is a 0-d L_cd (the official step: one lambda), or a [K] vector of cross-domain
    losses (weighting.per_domain: one L_cd_d per query domain), each balanced against L_rec
    by its own two-task problem; lam, cosine and ok then have the shape of loss_cd.

    mode "none" (base): g_rec. solve=False: one pass of L_rec + sum_k lam_k L_cd_k (fixed
    weighting, or lambdas reused from an earlier step). solve=True: g_rec, then each g_cd_k,
    in 1 + K passes; lambda_k from the Gram matrix of (g_cd_k, g_rec) over params[gram_index];
    the update g_rec + sum_k lambda_k g_cd_k, leaving out each k whose solver fell back (so a
    NaN in g_cd_k never reaches the update). gate=True: lambda_k = 0 where the two gradients
    conflict (cosine < 0), i.e. the penalty acts only where lowering L_cd_k does not raise
    L_rec to first order. held_out (HeldOut): the held-out gate of solve_lambdas.

    reads (TableReads; None: the table as any parameter): L_rec's table gradient through
    table_gradient; L_cd reaches the table only through the lookup, so its gradient is taken
    with respect to the lookup vectors and added, times lambda, into the touched rows of
    g_rec's table gradient (index_add): the cd passes never write a dense table gradient.
    (The table must then not be in the Gram set.)

    reduce (data parallelism): returns summed-over-ranks copies of a tensor list; the Gram
    matrices and the losses the solver sees are then the global ones, so every rank gets the
    same lambdas. The returned gradients stay this rank's share (the caller sums them).
    """
    zero = torch.zeros(loss_cd.shape, device=loss_rec.device)
    ok = torch.ones(loss_cd.shape, dtype=torch.bool, device=loss_rec.device)
    if mode == "none":
        return gradients(loss_rec, params, reads), zero, zero, ok
    if not solve:
        return gradients(loss_rec + (lam * loss_cd).sum(), params, reads), lam, zero, ok
    g_rec = gradients(loss_rec, params, reads, retain_graph=True)
    table = -1 if reads is None else reads.index
    others = [i for i in range(len(params)) if i != table]
    wrt = [params[i] for i in others] + ([] if reads is None else [reads.vectors])
    tasks = loss_cd.reshape(-1).unbind()
    g_cd, g_lookup = [], []  # per task: per-parameter gradients, the lookup's gradient
    for k, task in enumerate(tasks):
        g_wrt = torch.autograd.grad(task, wrt, retain_graph=k + 1 < len(tasks), allow_unused=True)
        g_k = [None] * len(params)
        for i, g in zip(others, g_wrt):
            g_k[i] = g
        g_cd.append(_materialise(g_k, params) if reads is None else g_k)
        g_lookup.append(None if reads is None else g_wrt[-1])
    shared_cd = [[g_k[i] if g_k[i] is not None else torch.zeros_like(params[i])
                  for i in gram_index] for g_k in g_cd]
    shared_rec = [g_rec[i] for i in gram_index]
    lam, cosine, ok = solve_lambdas(shared_cd, shared_rec, loss_cd, loss_rec, mode, reduce, gate,
                                    held_out)
    grads = list(g_rec)
    for k, g_k in enumerate(g_cd):
        dense = [i for i in range(len(params)) if g_k[i] is not None]
        weighted = torch._foreach_mul([g_k[i] for i in dense], lam[k])
        for i, w in zip(dense, weighted):
            grads[i] = torch.where(ok[k], grads[i] + w, grads[i])
    if reads is not None and any(g is not None for g in g_lookup):
        items, rows = reads.items, 0.0
        for k, g in enumerate(g_lookup):
            if g is not None:
                rows = rows + torch.where(ok[k], lam[k] * g, 0.0)
        grads[table] = table_gradient(params[table], g_rec[table], rows, items)
    shape = loss_cd.shape
    return grads, lam.reshape(shape), cosine.reshape(shape), ok.reshape(shape)


def one_layer_balanced_gradients(params, gram_index, above_index, loss_rec, tasks, tasks_below,
                                 block_input, reads, head=(), mode="pareto", reduce=None,
                                 gate=False, held_out=None):
    """(grads, lam, cosine, ok) as balanced_gradients, at about the cost of one backward
    pass: the Gram set params[gram_index] is the first norm and QKV of block l, the last
    layer whose mass enters L_cd, and the backward is cut at block l's input x_l.

    1. L_rec backward from the top to x_l: the gradients of every parameter at or above x_l
       (params[above_index], the Gram set among them; L_cd does not reach the others), of the
       head's own reads, and d x_l from L_rec.
    2. Each L_cd_k backward to the Gram set and x_l: one attention backward of layer l (its
       mass is the only part of L_cd that reaches them).
    3. lambda_k from the Gram matrices (g_cd_k, g_rec) over the Gram set.
    4. One backward below x_l of d x_l(L_rec) + sum_k lambda_k d x_l(L_cd_k), together with
       lambda_k times tasks_below (L_cd_k's terms of the layers under l, or None), down to
       the parameters below and the item lookup.

    reads (TableReads): the item table's two reads; its gradient is the head's (step 1) plus
    the lookup's rows (step 4), assembled by table_gradient. head: [(tensor, index)] what else
    the loss head reads directly (the item bias) and the index in params of the parameter
    each is the leading rows of.

    A non-finite L_cd_k cannot be left out of the backward below x_l (0 x NaN is NaN): the
    update is then non-finite and the caller's finite check skips the step, where the
    two-pass step would fall back to g_rec.
    """
    head_tensors = [t for t, _ in head]
    above = [params[i] for i in above_index]
    first = torch.autograd.grad(loss_rec, [block_input, reads.head, *head_tensors, *above],
                                retain_graph=True, allow_unused=True)
    d_x_rec, d_table_head = first[0], first[1]
    d_head, g_above = first[2:2 + len(head)], first[2 + len(head):]
    g_above = _materialise(g_above, above)
    where = {index: n for n, index in enumerate(above_index)}
    gram_params = [params[i] for i in gram_index]
    shared_rec = [g_above[where[i]] for i in gram_index]
    shared_cd, d_x_cd = [], []
    for task in tasks.reshape(-1).unbind():
        part = torch.autograd.grad(task, [*gram_params, block_input], retain_graph=True,
                                   allow_unused=True)
        shared_cd.append(_materialise(part[:-1], gram_params))
        d_x_cd.append(part[-1])
    lam, cosine, ok = solve_lambdas(shared_cd, shared_rec, tasks, loss_rec, mode, reduce, gate,
                                    held_out)
    weights = torch.where(ok, lam, 0.0)
    grads = [None] * len(params)
    for n, index in enumerate(above_index):
        grads[index] = g_above[n]
    for k, part in enumerate(shared_cd):
        for n, index in enumerate(gram_index):
            grads[index] = grads[index] + weights[k] * part[n]
    d_x = d_x_rec
    for k, g in enumerate(d_x_cd):
        if g is not None:
            d_x = d_x + (weights[k] * g).to(d_x.dtype)
    below_index = [i for i in range(len(params)) if i not in where and i != reads.index]
    outputs, seeds = [block_input], [d_x]
    if tasks_below is not None:
        outputs += list(tasks_below.reshape(-1).unbind())
        seeds += list(weights.to(tasks_below.dtype).unbind())
    g_below = torch.autograd.grad(outputs, [params[i] for i in below_index] + [reads.vectors],
                                  seeds, allow_unused=True)
    for index, g in zip(below_index, g_below):
        grads[index] = g
    grads[reads.index] = table_gradient(params[reads.index], d_table_head, g_below[-1],
                                        reads.items)
    grads = _materialise(grads, params)
    for (tensor, index), g in zip(head, d_head):
        if g is not None:  # the head reads the leading rows of its parameter
            rows = params[index].shape[0] - g.shape[0]
            g = torch.cat([g, g.new_zeros((rows, *g.shape[1:]))]) if rows else g
            grads[index] = grads[index] + g
    shape = tasks.shape
    return grads, lam.reshape(shape), cosine.reshape(shape), ok.reshape(shape)


def solve_lambdas(shared_cd, shared_rec, loss_cd, loss_rec, mode, reduce=None, gate=False,
                  held_out=None):
    """(lam, cosine, ok), each [K]: the K two-task problems (L_cd_k, L_rec) solved on the Gram
    set. shared_cd: K lists of per-parameter gradients over the Gram set, shared_rec: one.
    reduce (data parallelism): the Gram parts and the losses are summed over the ranks in one
    flat all-reduce first, so every rank solves the same global problems. gate: lambda_k = 0
    where the two gradients conflict (cosine < 0).

    held_out (HeldOut): the held-out gate. Descending lambda_k g_cd_k changes the held-out
    L_rec by -lr lambda_k <g_cd_k, g_held> to first order: the penalty helps held-out data
    where that inner product is positive. The cosine is noisy batch to batch, so its running
    mean (decay HELD_OUT_DECAY) decides: lambda_k = 0 while it is < 0. The returned cosine is
    then that running mean (the caller's next `running`)."""
    losses = torch.cat([loss_cd.detach().float().reshape(-1), loss_rec.detach().float()[None]])
    held = [] if held_out is None else list(held_out.shared)
    if reduce is not None:
        n, tasks = len(shared_rec), len(shared_cd)
        summed = reduce([g for part in shared_cd for g in part] + shared_rec + held + [losses])
        shared_cd = [summed[k * n:(k + 1) * n] for k in range(tasks)]
        shared_rec, held, losses = (summed[tasks * n:(tasks + 1) * n],
                                    summed[(tasks + 1) * n:-1], summed[-1])
    # one Gram matrix over [cd_1..cd_K, rec(, held)]: each g_cd_k's norm is computed once
    tasks = len(shared_cd)
    full = gram_matrix(shared_cd + [shared_rec] + ([held] if held_out is not None else []))
    gram, pair_losses = _pair_problems(full[:tasks + 1, :tasks + 1], losses)
    lam, ok = pareto_lambda(gram, pair_losses, mode)
    cosine = gradient_cosine(gram).float()
    if gate:
        lam = torch.where(cosine >= 0, lam, 0.0)
    if held_out is not None:
        without_rec = torch.cat([full[:tasks], full[tasks + 1:]])  # slices: no index tensor
        without_rec = torch.cat([without_rec[:, :tasks], without_rec[:, tasks + 1:]], dim=1)
        held_gram, _ = _pair_problems(without_rec, losses)
        running = HELD_OUT_DECAY * held_out.running.reshape(-1).float() + \
            (1 - HELD_OUT_DECAY) * gradient_cosine(held_gram).float()
        lam, cosine = torch.where(running >= 0, lam, 0.0), running
    return lam, cosine, ok


def _pair_problems(gram, losses):
    """The K two-task problems (cd_k, rec) of a [K + 1, K + 1] Gram matrix whose last task is
    rec, and losses [K + 1] in the same order: ([K, 2, 2] Gram matrices, [K, 2] losses)."""
    rec = gram.shape[0] - 1
    grams = [torch.stack([torch.stack([gram[k, k], gram[k, rec]]),
                          torch.stack([gram[rec, k], gram[rec, rec]])]) for k in range(rec)]
    return torch.stack(grams), torch.stack([torch.stack([losses[k], losses[rec]])
                                            for k in range(rec)])


def _materialise(grads, params):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


