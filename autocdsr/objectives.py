"""The AutoCDSR objective: the cross-domain attention loss and the balanced step.

L_cd = mean over the objective's layers of the mean mass over (b, h, query), the queries being
the real tokens that have a domain (padding and hidden-domain [MASK]s left out).

Balanced step: two backward passes (g_rec retaining the graph, then g_cd retaining nothing),
the Gram matrix over the model's Gram parameters, lambda from the on-device solver, and every
parameter's gradient set to g_rec + lambda * g_cd, or to g_rec alone where the solver fell back
(a zero or non-finite gradient: counted, and a NaN in g_cd never reaches the update). Nothing
in it reads a value back to the host; lambda, the cosine and L_cd stay on the device and the
caller copies them out in batches.
"""
import torch

from kernels.pareto import gradient_cosine, gram_matrix, pareto_lambda


def cross_domain_loss(masses, query_mask):
    """masses: list of [B, H, L] float32; query_mask: [B, L] bool (the queries that count)."""
    weight = query_mask.float()
    terms = [(mass * weight[:, None]).sum() / (weight.sum() * mass.shape[1]).clamp(min=1)
             for mass in masses]
    return torch.stack(terms).mean()


class BalancedStep:
    """Computes the combined gradient into .grad for mode pareto / mgda / fixed / none."""

    def __init__(self, model, mode="pareto", lam=0.1, every=1, shared="reached"):
        self.mode, self.every = mode, every
        self.params = [p for p in model.parameters() if p.requires_grad]
        gram_ids = {id(p) for p in model.gram_parameters(shared)}
        self.gram_index = [i for i, p in enumerate(self.params) if id(p) in gram_ids]
        device = self.params[0].device
        self.lam = torch.tensor(float(lam) if mode == "fixed" else 0.0, device=device)
        self.cosine = torch.zeros((), device=device)
        self.fallbacks = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = 0

    def state_dict(self):
        return {"lam": self.lam, "fallbacks": self.fallbacks, "steps": self.steps}

    def load_state_dict(self, state):
        self.lam = state["lam"].to(self.lam.device)
        self.fallbacks = state["fallbacks"].to(self.fallbacks.device)
        self.steps = state["steps"]

    def solves_this_step(self):
        return self.mode in ("pareto", "mgda") and self.steps % self.every == 0

    def backward(self, loss_rec, loss_cd):
        """Fill .grad of every parameter; return the lambda used (a 0-d device tensor)."""
        params = self.params
        if self.mode == "none" or loss_cd is None:
            loss_rec.backward()
        elif not self.solves_this_step():
            # fixed mode, or reusing the last lambda: one backward of the weighted sum.
            (loss_rec + self.lam * loss_cd).backward()
        else:
            g_rec = torch.autograd.grad(loss_rec, params, retain_graph=True, allow_unused=True)
            g_cd = torch.autograd.grad(loss_cd, params, allow_unused=True)
            gram = gram_matrix([[g_cd[i] for i in self.gram_index],
                                [g_rec[i] for i in self.gram_index]])
            losses = torch.stack([loss_cd.detach().float(), loss_rec.detach().float()])
            lam, ok = pareto_lambda(gram, losses, self.mode)
            self.lam = lam
            self.cosine = gradient_cosine(gram)
            self.fallbacks = self.fallbacks + (~ok).long()
            for p, gr, gc in zip(params, g_rec, g_cd):
                if gc is None:
                    p.grad = gr
                    continue
                # where, not lam * gc: on a fallback step gc may hold NaN, and 0 * NaN = NaN.
                weighted = torch.where(ok, lam.to(gc.dtype) * gc, 0.0)
                p.grad = weighted if gr is None else gr + weighted
        self.steps += 1
        return self.lam
