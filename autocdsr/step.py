"""One optimizer step of any objective, free of host synchronisation: the single
implementation that training and the benchmarks run.

forward (autocast on CUDA) -> L_rec, L_cd -> gradients (base: one pass; AutoCDSR: two passes,
Gram matrix, on-device solver, combine; or one pass of L_rec + lambda L_cd when lambda is
fixed or reused) -> clip to train.grad_clip -> non-finite check -> AdamW.

Nothing reads a value back to the host: a non-finite step is skipped on the device (the
update, the moments and the step count are left as they were; counted), the learning rate
lives in a device tensor that the loop fills from the scheduler before the step, and every
logged scalar is a 0-d device tensor. `torch.compile(step.function, fullgraph=True)` traces it
whole (tests/test_step.py); `TrainStep(..., compile=True)` runs it compiled, and
`TrainStep(..., cuda_graph=True)` captures it as CUDA graphs and replays them
(autocdsr.graph_step).

Two ways to apply AdamW, on the optimizer's own state (checkpoints and the scheduler work
with the torch.optim.AdamW object either way): compiled, the update is written out with
_foreach ops (adamw_update; torch.optim.AdamW.step breaks the graph by design, and the
compiler fuses the written-out update); eager with an optimizer built with fused=True, torch's
fused AdamW kernel, whose found_inf input skips a non-finite step on the device.
"""
import torch

from kernels.pareto import gradient_cosine, gram_matrix, pareto_lambda

from .graph_step import CapturedStep
from .losses import recommendation_loss
from .objectives import cross_domain_loss, cross_domain_loss_per_domain, domain_query_counts


def balanced_gradients(params, gram_index, loss_rec, loss_cd, mode, lam, solve, lookup=None,
                       reduce=None, gate=False):
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
    L_rec to first order.

    lookup = (table index in params, items [B, L], item_vectors [B, L, H] = table[items]):
    L_cd reaches the item table only through this lookup, so its gradient is taken with
    respect to the [B, L, H] lookup output and added, times lambda, into the touched rows of
    g_rec's table gradient (index_add): the cd passes never write a dense table gradient
    and the combine never sweeps the table. (The table must then not be in the Gram set.)

    reduce (data parallelism): returns summed-over-ranks copies of a tensor list; the Gram
    matrices and the losses the solver sees are then the global ones, so every rank gets the
    same lambdas. The returned gradients stay this rank's share (the caller sums them).
    """
    zero = torch.zeros(loss_cd.shape, device=loss_rec.device)
    ok = torch.ones(loss_cd.shape, dtype=torch.bool, device=loss_rec.device)
    if mode == "none":
        return _materialise(torch.autograd.grad(loss_rec, params, allow_unused=True), params), \
            zero, zero, ok
    if not solve:
        grads = torch.autograd.grad(loss_rec + (lam * loss_cd).sum(), params, allow_unused=True)
        return _materialise(grads, params), lam, zero, ok
    g_rec = _materialise(torch.autograd.grad(loss_rec, params, retain_graph=True,
                                             allow_unused=True), params)
    table = -1 if lookup is None else lookup[0]
    others = [i for i in range(len(params)) if i != table]
    wrt = [params[i] for i in others] + ([] if lookup is None else [lookup[2]])
    tasks = loss_cd.reshape(-1).unbind()
    g_cd, g_lookup = [], []  # per task: per-parameter gradients, the lookup's gradient
    for k, task in enumerate(tasks):
        g_wrt = torch.autograd.grad(task, wrt, retain_graph=k + 1 < len(tasks), allow_unused=True)
        g_k = [None] * len(params)
        for i, g in zip(others, g_wrt):
            g_k[i] = g
        g_cd.append(_materialise(g_k, params) if lookup is None else g_k)
        g_lookup.append(None if lookup is None else g_wrt[-1])
    shared_cd = [[g_k[i] if g_k[i] is not None else torch.zeros_like(params[i])
                  for i in gram_index] for g_k in g_cd]
    shared_rec = [g_rec[i] for i in gram_index]
    losses = torch.cat([loss_cd.detach().float().reshape(-1), loss_rec.detach().float()[None]])
    if reduce is not None:  # one flat all-reduce: every task's Gram part and the losses
        n = len(gram_index)
        summed = reduce([g for part in shared_cd for g in part] + shared_rec + [losses])
        shared_cd = [summed[k * n:(k + 1) * n] for k in range(len(tasks))]
        shared_rec, losses = summed[len(tasks) * n:-1], summed[-1]
    gram, pair_losses = _pair_problems(gram_matrix(shared_cd + [shared_rec]), losses)
    lam, ok = pareto_lambda(gram, pair_losses, mode)                    # [K], [K]
    cosine = gradient_cosine(gram).float()
    if gate:
        lam = torch.where(cosine >= 0, lam, 0.0)
    grads = list(g_rec)
    for k, g_k in enumerate(g_cd):
        dense = [i for i in range(len(params)) if g_k[i] is not None]
        weighted = torch._foreach_mul([g_k[i] for i in dense], lam[k])
        for i, w in zip(dense, weighted):
            grads[i] = torch.where(ok[k], grads[i] + w, grads[i])
    if lookup is not None and any(g is not None for g in g_lookup):
        _, items, vectors = lookup
        rows = 0.0
        for k, g in enumerate(g_lookup):
            if g is not None:
                rows = rows + torch.where(ok[k], lam[k] * g, 0.0)
        rows = torch.where((items != 0)[..., None], rows, 0.0)  # row 0 is padding (no gradient)
        grads[table] = g_rec[table].index_add(0, items.reshape(-1),
                                              rows.reshape(-1, vectors.shape[-1]).to(g_rec[table].dtype))
    shape = loss_cd.shape
    return grads, lam.reshape(shape), cosine.reshape(shape), ok.reshape(shape)


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


def clip_scale(grads, max_norm):
    """(scale, total norm): clipping multiplies every gradient by scale, as
    torch.nn.utils.clip_grad_norm_ does (applied later, fused into the update)."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    return (max_norm / (total + 1e-6)).clamp(max=1.0), total


@torch.no_grad()
def adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay,
                 keep):
    """torch.optim.AdamW's update with every effect multiplied by `keep` (a 0-d float, 1 or
    0): keep = 0 leaves the parameters, both moments and the step count exactly as they were.
    grads must be finite (zeroed where the step is skipped)."""
    beta1, beta2 = betas
    torch._foreach_add_(steps, keep)
    step = steps[0]
    tiny = torch.finfo(torch.float32).tiny  # step 0 (only while keep = 0) must not divide by 0
    bias1 = (1 - beta1 ** step).clamp(min=tiny)
    bias2 = (1 - beta2 ** step).clamp(min=tiny)
    lr_now = lr * keep
    torch._foreach_mul_(params, 1 - lr_now * weight_decay)
    delta = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(delta, (1 - beta1) * keep)
    torch._foreach_add_(exp_avgs, delta)
    delta = torch._foreach_sub(torch._foreach_mul(grads, grads), exp_avg_sqs)
    torch._foreach_mul_(delta, (1 - beta2) * keep)
    torch._foreach_add_(exp_avg_sqs, delta)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2.sqrt())
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, -lr_now / bias1)
    torch._foreach_add_(params, update)


def make_optimizer(model, train_cfg, fused=True):
    """AdamW over every trainable parameter. fused=True: torch's fused kernel (one kernel,
    device-side skip), for the eager step. fused=False: plain and capturable (the step count
    on the parameters' device), for the compiled and the graph-captured steps, which write
    the update out themselves (adamw_update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if not fused:
        return torch.optim.AdamW(params, capturable=params[0].is_cuda, **kw)
    return torch.optim.AdamW(params, fused=True, **kw)


class TrainStep:
    """model + torch.optim.AdamW (its state, hyper-parameters and scheduler) + the objective.

    step(batch) -> dict of 0-d device tensors: loss (L_rec), cd (L_cd), lam, cosine, skipped
    (1.0 where the step was non-finite and skipped); with per_domain also lam_per_domain and
    cosine_per_domain ([num_domains]; lam and cosine are then their means). Running counters
    on the device: `fallbacks` (solver problems that fell back to g_rec), `skipped`,
    `bad_in_row`.

    The weighting variants beyond the paper: layers (the layers whose mass enters L_cd, and
    so the Gram set; empty = all of the model's mass layers), per_domain (one lambda per query
    domain), gate (no penalty where the gradients conflict); see balanced_gradients.
    """

    def __init__(self, model, optimizer, *, loss="full", objective="base", mode="pareto",
                 lam=0.1, every=1, shared="reached", grad_clip=1.0, num_negatives=1000,
                 logits="dot", temperature=1.0, amp_dtype=None, compile=False, cuda_graph=False,
                 comm=None, layers=(), per_domain=False, gate=False):
        self.model, self.optimizer = model, optimizer
        self.loss_kwargs = dict(num_negatives=num_negatives, logits=logits,
                                temperature=temperature)
        self.loss, self.amp_dtype, self.grad_clip = loss, amp_dtype, grad_clip
        self.comm = comm  # autocdsr.distributed.Comm, or None for one process
        if (compile or cuda_graph) and comm is not None and comm.active:
            raise ValueError("train.compile / train.cuda_graph are not supported with data "
                             "parallelism yet")
        self.mode = "none" if objective == "base" else mode
        if per_domain and self.mode not in ("pareto", "mgda"):
            raise ValueError("per_domain needs a solver (mode pareto or mgda): a fixed lambda "
                             "has nothing to solve per domain")
        self.every, self.gate = every, gate
        self.layers = model.mass_layers(layers)
        self.num_tasks = model.num_domains if per_domain else 0  # 0: the one global L_cd
        self.params = [p for p in model.parameters() if p.requires_grad]
        gram_ids = {id(p) for p in model.gram_parameters(shared, self.layers)}
        self.gram_index = [i for i, p in enumerate(self.params) if id(p) in gram_ids]
        self.table_index = next(i for i, p in enumerate(self.params)
                                if p is model.item_embedding.weight)
        self.table_in_gram = self.table_index in self.gram_index
        group = optimizer.param_groups[0]
        if len(optimizer.param_groups) != 1 or group["params"] != self.params:
            raise ValueError("TrainStep needs one AdamW param group holding every trainable parameter")
        self.hyper = dict(betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
        device = self.params[0].device
        for p in self.params:  # the state torch.optim.AdamW would create on its first step
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.lr = torch.zeros((), device=device)
        shape = (self.num_tasks,) if self.num_tasks else ()
        self.lam = torch.full(shape, float(lam) if mode == "fixed" else 0.0, device=device)
        self.cosine = torch.zeros(shape, device=device)
        self.fallbacks = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_in_row = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = 0
        fused = optimizer.defaults.get("fused")
        self.cuda_graph = cuda_graph
        if cuda_graph and (device.type != "cuda" or fused):
            raise ValueError("a graph-captured step needs the model on a CUDA device and an "
                             "optimizer from make_optimizer(..., fused=False)")
        self.function = self.run_eager if fused else self.run
        if compile:
            torch._dynamo.config.trace_autograd_ops = True  # trace torch.autograd.grad
            # compiled dropout draws eager's random numbers: a compiled run equals an eager one
            import torch._inductor.config as inductor_config
            inductor_config.fallback_random = True
            self.function = torch.compile(self.run, fullgraph=True)
        if cuda_graph:
            self.function = CapturedStep(self.function)

    # ---------------------------------------------------------------- the traced function
    def losses(self, batch):
        """(L_rec, L_cd, L_cd per task, item_vectors): item_vectors is the item-table lookup
        of the batch; the per-task losses are [num_domains] with per_domain, else L_cd itself.
        Under data parallelism the losses are this rank's share of the global ones."""
        model, domains = self.model, batch["domains"]
        query_mask = model.cd_query_mask(domains)
        rec_count = cd_count = domain_counts = None
        if self.comm is not None and self.comm.active:  # global counts normalise the losses
            counts = [batch["target_weight"].sum()[None], query_mask.float().sum()[None]]
            if self.num_tasks:
                counts.append(domain_query_counts(query_mask, domains, self.num_tasks))
            counts = self.comm.summed([torch.cat(counts)])[0]
            rec_count, cd_count, domain_counts = counts[0], counts[1], counts[2:]
        # a captured graph must not keep autocast's cast-weight cache across replays
        with torch.autocast(batch["items"].device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None, cache_enabled=not self.cuda_graph):
            item_vectors = model.item_embedding(batch["items"])
            hidden, masses = model(batch["items"], batch["domains"], batch["seq_lens"],
                                   item_vectors)
            loss_rec = recommendation_loss(self.loss, hidden, model.item_weights(),
                                           batch["targets"], batch["target_slots"],
                                           batch["target_weight"], **self.loss_kwargs,
                                           denominator=rec_count, bias=model.item_biases())
        masses = model.objective_masses(masses, self.layers)  # float32
        loss_cd = cross_domain_loss(masses, query_mask, denominator=cd_count)
        tasks = loss_cd
        if self.num_tasks:
            tasks = cross_domain_loss_per_domain(masses, query_mask, domains, self.num_tasks,
                                                 domain_counts)
        return loss_rec.float(), loss_cd, tasks, item_vectors

    def gradients(self, batch, lam, solve):
        """(grads, clip scale, finite flag, scalars): everything but the parameter update."""
        loss_rec, loss_cd, tasks, item_vectors = self.losses(batch)
        lookup = None if self.table_in_gram else (self.table_index, batch["items"], item_vectors)
        distributed = self.comm is not None and self.comm.active
        grads, lam, cosine, ok = balanced_gradients(
            self.params, self.gram_index, loss_rec, tasks, self.mode, lam, solve, lookup,
            self.comm.summed if distributed else None, self.gate)
        loss_rec, loss_cd = loss_rec.detach(), loss_cd.detach()
        if distributed:  # every gradient once, the two logged losses riding along
            losses = torch.stack([loss_rec, loss_cd])
            self.comm.sum_(grads + [losses])
            loss_rec, loss_cd = losses.unbind()
        scale, norm = clip_scale(grads, self.grad_clip)
        finite = torch.isfinite(norm) & torch.isfinite(loss_rec)
        return grads, scale, finite, {"loss": loss_rec, "cd": loss_cd, "lam": lam.detach(),
                                      "cosine": cosine, "ok": ok, "finite": finite}

    def run(self, batch, lr, lam, solve):
        """The whole step on tensors, as one traceable function (solve, a Python bool, selects
        the two-pass branch); the update is adamw_update, which a compiler fuses."""
        grads, scale, finite, out = self.gradients(batch, lam, solve)
        grads = [torch.where(finite, g * scale, 0.0) for g in grads]
        state = [self.optimizer.state[p] for p in self.params]
        adamw_update(self.params, grads, [s["exp_avg"] for s in state],
                     [s["exp_avg_sq"] for s in state], [s["step"] for s in state], lr,
                     keep=finite.float(), **self.hyper)
        return out

    def run_eager(self, batch, lr, lam, solve):
        """The same step uncompiled, with torch's fused AdamW kernel: one pass over parameters
        and moments that also applies the clip scale (grad_scale) and skips a non-finite step
        on the device (found_inf)."""
        grads, scale, finite, out = self.gradients(batch, lam, solve)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.grad_scale = 1.0 / scale  # the kernel divides by it: clipping, fused
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        return out

    # ---------------------------------------------------------------- the host side
    def solves_this_step(self):
        return self.mode in ("pareto", "mgda") and self.steps % self.every == 0

    def __call__(self, batch):
        solve = self.solves_this_step()
        self.lr.fill_(self.optimizer.param_groups[0]["lr"])
        out = self.function(batch, self.lr, self.lam, solve)
        if solve:  # copies: a captured step's outputs are overwritten by its next replay
            self.lam, self.cosine = out["lam"].clone(), out["cosine"].clone()
            self.fallbacks = self.fallbacks + (~out["ok"]).long().sum()
        bad = (~out["finite"]).long()
        self.skipped = self.skipped + bad
        self.bad_in_row = (self.bad_in_row + bad) * bad
        self.steps += 1
        stats = {"loss": out["loss"], "cd": out["cd"], "lam": self.lam.float().mean(),
                 "cosine": self.cosine.float().mean(), "skipped": bad.float()}
        if self.num_tasks:
            stats["lam_per_domain"] = self.lam.float()
            stats["cosine_per_domain"] = self.cosine.float()
        return stats

    def state_dict(self):
        return {"lam": self.lam, "cosine": self.cosine, "fallbacks": self.fallbacks,
                "skipped": self.skipped, "bad_in_row": self.bad_in_row, "steps": self.steps}

    def load_state_dict(self, state):
        for key in ("lam", "cosine", "fallbacks", "skipped", "bad_in_row"):
            if key in state:
                setattr(self, key, state[key].to(self.lam.device))
        self.steps = state["steps"]
