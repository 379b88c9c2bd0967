"""The optimizer update of the training step, on torch.optim.AdamW's own state.

Two ways to apply AdamW (checkpoints and the scheduler work with the torch.optim.AdamW object
either way): eager, torch's fused AdamW kernel, whose grad_scale input applies the clipping
and whose found_inf input skips a non-finite step on the device; compiled or graph-captured,
adamw_update, the same update written out with _foreach ops, because in torch 2.13
optimizer.step() (capturable, foreach or fused) breaks a fullgraph trace by design.
"""
import torch


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
