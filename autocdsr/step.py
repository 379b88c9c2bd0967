"""One optimizer step of any objective, free of host synchronisation: the single
implementation that training and the benchmarks run.

forward (autocast on CUDA) -> L_rec, L_cd -> gradients (base: one pass; AutoCDSR: two passes,
Gram matrix, on-device solver, combine; or one pass of L_rec + lambda L_cd when lambda is
fixed or reused) -> clip to train.grad_clip -> non-finite check -> AdamW.

Nothing reads a value back to the host: a non-finite step is skipped on the device (the
update, the moments and the step count are left as they were; counted), the learning rate
lives in a device tensor that the loop fills from the scheduler before the step, and every
logged scalar is a 0-d device tensor. `compile_step(step.run)` traces it whole with
fullgraph=True (tests/test_step.py); `TrainStep(..., compile=True)` runs it compiled, and
`TrainStep(..., cuda_graph=True)` captures it as CUDA graphs and replays them
(autocdsr.graph_step). The balancing maths are autocdsr.balancing, the optimizer update
autocdsr.optim.
"""
from typing import NamedTuple

import torch

from .balancing import HeldOut, TableReads, balanced_gradients, one_layer_balanced_gradients
from .data.batches import HELD_OUT_PREFIX
from .graph_step import CapturedStep
from .optim import adamw_update, clip_scale
from .losses import DomainPools, domain_loss_weights, recommendation_loss
from .models import Intermediates
from .objectives import cross_domain_loss, cross_domain_loss_per_domain, domain_query_counts


def compile_step(function, backend="inductor"):
    """torch.compile(function, fullgraph=True) run with the two compiler settings the step
    needs, set only while it runs (not process-wide): Dynamo traces torch.autograd.grad, and
    compiled dropout draws eager's random numbers, so a compiled run equals an eager one."""
    compiled = torch.compile(function, fullgraph=True, backend=backend)
    import torch._inductor.config as inductor_config

    def run(*args):
        with torch._dynamo.config.patch(trace_autograd_ops=True), \
                inductor_config.patch(fallback_random=True):
            return compiled(*args)
    return run


class Forward(NamedTuple):
    """What a step's forward pass hands to the gradients."""
    loss_rec: torch.Tensor       # 0-d float32
    loss_cd: torch.Tensor        # 0-d: the global L_cd (logged)
    tasks: torch.Tensor          # what is balanced: L_cd, or [num_domains] L_cd_d
    reads: TableReads            # the item table's two reads: the lookup, the head's rows
    head: list                   # [(tensor, param index)] what else the head reads (the bias)
    block_input: torch.Tensor = None  # last_layer: the input of the last mass layer's block
    tasks_below: torch.Tensor = None  # last_layer: the tasks' terms of the layers below it


# the 0-d statistics every step returns, by the names metrics.json's history gives their means
STEP_STATS = ("train_loss", "cd_mass", "lambda", "cosine", "skipped")


class TrainStep:
    """model + torch.optim.AdamW (its state, hyper-parameters and scheduler) + the objective.

    step(batch) -> dict of 0-d device tensors, named as metrics.json's history names their epoch
    means: train_loss (L_rec), cd_mass (L_cd), lambda, cosine, skipped (1.0 where the step was
    non-finite and skipped); with per_domain also lambda_per_domain and cosine_per_domain
    ([num_domains]; lambda and cosine are then their means). Running counters
    on the device: `fallbacks` (solver problems that fell back to g_rec), `skipped`,
    `bad_in_row`.

    The weighting variants beyond the paper: layers (the layers whose mass enters L_cd, and
    so the Gram set; empty = all of the model's mass layers), per_domain (one lambda per query
    domain), gate (no penalty where the gradients conflict), held_out (no penalty while the
    running cosine with a held-out batch's L_rec gradient is negative: each batch then carries
    a held-out batch under HELD_OUT_PREFIX keys, autocdsr.data.batches.held_out_batch, and
    `cosine` is that running cosine); see balanced_gradients and solve_lambdas.
    """

    def __init__(self, model, optimizer, *, loss="full", objective="base", mode="pareto",
                 lam=0.1, every=1, shared="reached", grad_clip=1.0, num_negatives=1000,
                 logits="dot", temperature=1.0, amp_dtype=None, compile=False, cuda_graph=False,
                 comm=None, layers=(), per_domain=False, gate=False, held_out=False,
                 negatives="uniform", domain_items=None, domain_balance=0.0,
                 domain_weight_max=20.0, domain_counts=None):
        self.model, self.optimizer = model, optimizer
        if negatives != "uniform" and domain_items is None:
            raise ValueError(f"negatives={negatives} draws from each domain's items: pass "
                             "domain_items (the dataset's)")
        if domain_balance and domain_counts is None:
            raise ValueError(f"domain_balance={domain_balance} weighs targets by their domain's "
                             "size: pass domain_counts (the dataset's training events per domain)")
        model_device = next(model.parameters()).device
        pools = None if negatives == "uniform" else DomainPools.build(domain_items, model_device)
        self.domain_weights = None if not domain_balance else domain_loss_weights(
            domain_counts, domain_balance, domain_weight_max).to(model_device)
        self.loss_kwargs = dict(num_negatives=num_negatives, logits=logits,
                                temperature=temperature, negatives=negatives, pools=pools)
        self.loss, self.amp_dtype, self.grad_clip = loss, amp_dtype, grad_clip
        self.comm = comm  # autocdsr.distributed.Comm, or None for one process
        if (compile or cuda_graph) and comm is not None and comm.active:
            raise ValueError("train.compile / train.cuda_graph are not supported with data "
                             "parallelism yet")
        self.mode = "none" if objective == "base" else mode
        if per_domain and self.mode not in ("pareto", "mgda"):
            raise ValueError("per_domain needs a solver (mode pareto or mgda): a fixed lambda "
                             "has nothing to solve per domain")
        if held_out and (gate or self.mode not in ("pareto", "mgda")):
            raise ValueError("held_out gates the solver's lambda: it needs mode pareto or mgda "
                             "and gate=False")
        self.every, self.gate, self.held_out = every, gate, held_out
        self.layers = model.mass_layers(layers)
        self.num_tasks = model.num_domains if per_domain else 0  # 0: the one global L_cd
        self.params = [p for p in model.parameters() if p.requires_grad]
        gram_ids = {id(p) for p in model.gram_parameters(shared, self.layers)}
        self.gram_index = [i for i, p in enumerate(self.params) if id(p) in gram_ids]
        self.table_index = next(i for i, p in enumerate(self.params)
                                if p is model.item_embedding.weight)
        self.table_in_gram = self.table_index in self.gram_index
        self.one_layer = shared == "last_layer"
        above = {id(p) for p in model.parameters_from(self.layers[-1])}
        self.above_index = [i for i, p in enumerate(self.params) if id(p) in above]
        self.bias_index = next((i for i, p in enumerate(self.params) if p is model.item_bias),
                               None)
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
            self.function = compile_step(self.run)
        if cuda_graph:
            self.function = CapturedStep(self.function)

    @classmethod
    def from_config(cls, model, optimizer, cfg, **overrides):
        """The step a run's config describes (objective, weighting.*, train.* loss settings),
        with overrides on top (amp_dtype, comm, domain_items (train.negatives=domain or mixed),
        domain_counts (train.domain_balance > 0), or a config key's value, e.g. shared=...)."""
        weighting, train = cfg.weighting, cfg.train
        settings = dict(
            loss=train.loss, objective=cfg.objective, mode=weighting.mode, lam=weighting.lam,
            every=weighting.every, shared=weighting.shared, grad_clip=train.grad_clip,
            num_negatives=train.num_negatives, logits=train.logits,
            temperature=train.temperature, compile=train.compile, cuda_graph=train.cuda_graph,
            layers=list(weighting.layers), per_domain=weighting.per_domain, gate=weighting.gate,
            held_out=weighting.held_out, negatives=train.negatives,
            domain_balance=train.domain_balance, domain_weight_max=train.domain_weight_max)
        return cls(model, optimizer, **{**settings, **overrides})

    # ---------------------------------------------------------------- the traced function
    def target_weights(self, batch):
        """[C] each target slot's loss weight: the batch's (1 for a target, 0 for a filler
        slot), times its domain's weight where domain_balance is set."""
        weight = batch["target_weight"]
        if self.domain_weights is None:
            return weight
        domains = batch["target_domains"].reshape(-1).index_select(0, batch["target_slots"])
        return weight * self.domain_weights[domains.clamp(min=0)]  # fillers: -1, weight 0

    def losses(self, batch):
        """The forward pass (a Forward): the per-task losses are [num_domains] with
        per_domain, else L_cd itself. Under data parallelism the losses are this rank's share
        of the global ones."""
        model, domains = self.model, batch["domains"]
        query_mask = model.cd_query_mask(domains)
        target_weights = self.target_weights(batch)
        rec_count = cd_count = domain_counts = None
        if self.comm is not None and self.comm.active:  # global counts normalise the losses
            counts = [target_weights.sum()[None], query_mask.float().sum()[None]]
            if self.num_tasks:
                counts.append(domain_query_counts(query_mask, domains, self.num_tasks))
            counts = self.comm.summed([torch.cat(counts)])[0]
            rec_count, cd_count, domain_counts = counts[0], counts[1], counts[2:]
        # a captured graph must not keep autocast's cast-weight cache across replays
        with torch.autocast(batch["items"].device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None, cache_enabled=not self.cuda_graph):
            keep = Intermediates(block_inputs=[] if self.one_layer else None)
            hidden, masses = model(batch["items"], batch["domains"], batch["seq_lens"], keep)
            item_vectors, block_inputs = keep.item_vectors, keep.block_inputs
            weights, bias = model.item_weights(), model.item_biases()
            loss_rec = recommendation_loss(self.loss, hidden, weights, batch["targets"],
                                           batch["target_slots"], target_weights,
                                           **self.loss_kwargs, denominator=rec_count, bias=bias,
                                           target_domains=batch["target_domains"])
        reads = TableReads(self.table_index, batch["items"], item_vectors, weights)
        head = [] if bias is None else [(bias, self.bias_index)]
        def balanced(layers):  # what the solver balances, over these layers' masses
            chosen = model.objective_masses(masses, layers)  # float32
            if self.num_tasks:
                return cross_domain_loss_per_domain(chosen, query_mask, domains, self.num_tasks,
                                                    domain_counts)
            return cross_domain_loss(chosen, query_mask, denominator=cd_count)

        loss_cd = cross_domain_loss(model.objective_masses(masses, self.layers), query_mask,
                                    denominator=cd_count)
        tasks = balanced(self.layers) if self.num_tasks else loss_cd  # not computed twice
        block_input = tasks_below = None
        if self.one_layer:
            block_input, below = block_inputs[self.layers[-1]], self.layers[:-1]
            # L_cd is a mean over its layers: the lower layers' share of it
            tasks_below = balanced(below) * (len(below) / len(self.layers)) if below else None
        return Forward(loss_rec.float(), loss_cd, tasks, reads, head,
                       block_input, tasks_below)

    def held_out_gradient(self, batch):
        """L_rec's gradient over the Gram set on the held-out batch the training batch carries
        (a forward and a backward of its rows; dropout as in training), and the running cosine
        so far: the held-out gate's HeldOut."""
        held = {key[len(HELD_OUT_PREFIX):]: value for key, value in batch.items()
                if key.startswith(HELD_OUT_PREFIX)}
        with torch.autocast(held["items"].device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None, cache_enabled=not self.cuda_graph):
            hidden, _ = self.model(held["items"], held["domains"], held["seq_lens"])
            loss = recommendation_loss(self.loss, hidden, self.model.item_weights(),
                                       held["targets"], held["target_slots"],
                                       self.target_weights(held), **self.loss_kwargs,
                                       bias=self.model.item_biases(),
                                       target_domains=held["target_domains"])
        gram = [self.params[i] for i in self.gram_index]
        found = torch.autograd.grad(loss.float(), gram, allow_unused=True)
        shared = [torch.zeros_like(p) if g is None else g for g, p in zip(found, gram)]
        return HeldOut(shared, batch["gate_running"])

    def gradients(self, batch, lam, solve):
        """(grads, clip scale, finite flag, scalars): everything but the parameter update."""
        fwd = self.losses(batch)
        distributed = self.comm is not None and self.comm.active
        reduce = self.comm.summed if distributed else None
        held_out = self.held_out_gradient(batch) if solve and self.held_out else None
        if solve and self.one_layer and self.mode != "none":
            grads, lam, cosine, ok = one_layer_balanced_gradients(
                self.params, self.gram_index, self.above_index, fwd.loss_rec, fwd.tasks,
                fwd.tasks_below, fwd.block_input, fwd.reads, fwd.head, self.mode, reduce,
                self.gate, held_out)
        else:  # a table in the Gram set (shared=all) gets its gradient as any parameter
            reads = None if self.table_in_gram else fwd.reads
            grads, lam, cosine, ok = balanced_gradients(
                self.params, self.gram_index, fwd.loss_rec, fwd.tasks, self.mode, lam, solve,
                reads, reduce, self.gate, held_out)
        loss_rec, loss_cd = fwd.loss_rec.detach(), fwd.loss_cd.detach()
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
        """Whether this step solves for lambda (else it reuses the last one)."""
        return self.mode in ("pareto", "mgda") and self.steps % self.every == 0

    def __call__(self, batch):
        solve = self.solves_this_step()
        self.lr.fill_(self.optimizer.param_groups[0]["lr"])
        if self.held_out:  # the held-out gate's running cosine is an input of the step
            if not any(key.startswith(HELD_OUT_PREFIX) for key in batch):
                raise ValueError("held_out=True needs batches that carry a held-out batch "
                                 "(autocdsr.data.batches.held_out_batch)")
            batch = {**batch, "gate_running": self.cosine}
        out = self.function(batch, self.lr, self.lam, solve)
        if solve:  # copies: a captured step's outputs are overwritten by its next replay
            self.lam, self.cosine = out["lam"].clone(), out["cosine"].clone()
            self.fallbacks = self.fallbacks + (~out["ok"]).long().sum()
        bad = (~out["finite"]).long()
        self.skipped = self.skipped + bad
        self.bad_in_row = (self.bad_in_row + bad) * bad
        self.steps += 1
        stats = {"train_loss": out["loss"], "cd_mass": out["cd"], "lambda": self.lam.float().mean(),
                 "cosine": self.cosine.float().mean(), "skipped": bad.float()}
        if self.num_tasks:
            stats["lambda_per_domain"] = self.lam.float()
            stats["cosine_per_domain"] = self.cosine.float()
        return stats

    def state_dict(self):
        """The step's resumable state (lambda, cosine, counters, step count)."""
        return {"lam": self.lam, "cosine": self.cosine, "fallbacks": self.fallbacks,
                "skipped": self.skipped, "bad_in_row": self.bad_in_row, "steps": self.steps}

    def load_state_dict(self, state):
        """Restore state_dict()'s state."""
        for key in ("lam", "cosine", "fallbacks", "skipped", "bad_in_row"):
            if key in state:
                setattr(self, key, state[key].to(self.lam.device))
        self.steps = state["steps"]
