"""The AutoCDSR objective: the cross-domain attention loss and the balanced step.

Balanced step (DESIGN §4): two backward passes (g_rec retaining the graph, then g_cd
retaining nothing), the Gram matrix over the shared parameters, lambda from the on-device
solver, and every parameter's gradient set to g_rec + lambda * g_cd. Nothing in it reads a
value back to the host; lambda, the cosine and L_cd are kept on the device and copied out in
batches by the caller.
"""
import torch

from kernels.pareto import gradient_cosine, gram_matrix, pareto_lambda


def cross_domain_loss(masses, layers, domains):
    """Mean over the chosen layers of the mean mass over (b, h, non-padding query).

    In bottleneck layers the mass tensor includes the IB positions (which have mass 0 by
    definition) and the mean runs over the ordinary tokens only.
    """
    valid = (domains >= 0).float()                                  # [B, L]
    terms = []
    for index in layers:
        mass = masses[index]
        if mass.shape[-1] != valid.shape[-1]:                       # IB positions prepended
            mass = mass[..., mass.shape[-1] - valid.shape[-1]:]
        heads = mass.shape[1]
        terms.append((mass * valid[:, None]).sum() / (valid.sum() * heads).clamp(min=1))
    return torch.stack(terms).mean()


def shared_parameters(model, shared="all_but_items"):
    """Names of the parameters whose gradients enter the Gram matrix."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if shared == "all":
        return names
    return [n for n in names if n != "encoder.item_embedding.weight"]


class BalancedStep:
    """Computes the combined gradient into .grad for mode pareto / mgda / fixed / none."""

    def __init__(self, model, mode="pareto", lam=0.1, every=1, shared="all_but_items"):
        self.mode, self.every = mode, every
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        shared_names = set(shared_parameters(model, shared))
        self.shared_index = [i for i, (n, _) in enumerate(self.named) if n in shared_names]
        device = self.named[0][1].device
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
        params = [p for _, p in self.named]
        if self.mode == "none" or loss_cd is None:
            loss_rec.backward()
        elif not self.solves_this_step():
            # fixed mode, or reusing the last lambda: one backward of the weighted sum.
            (loss_rec + self.lam * loss_cd).backward()
        else:
            g_rec = torch.autograd.grad(loss_rec, params, retain_graph=True, allow_unused=True)
            g_cd = torch.autograd.grad(loss_cd, params, allow_unused=True)
            shared_rec = [g_rec[i] for i in self.shared_index]
            shared_cd = [g_cd[i] for i in self.shared_index]
            gram = gram_matrix([shared_cd, shared_rec])
            losses = torch.stack([loss_cd.detach().float(), loss_rec.detach().float()])
            lam, ok = pareto_lambda(gram, losses, self.mode)
            self.lam = lam
            self.cosine = gradient_cosine(gram)
            self.fallbacks = self.fallbacks + (~ok).long()
            for p, gr, gc in zip(params, g_rec, g_cd):
                if gr is None and gc is None:
                    continue
                if gr is None:
                    p.grad = lam.to(gc.dtype) * gc
                elif gc is None:
                    p.grad = gr
                else:
                    p.grad = gr + lam.to(gr.dtype) * gc
        self.steps += 1
        return self.lam
