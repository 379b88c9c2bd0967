"""What the attention does: the attention mass between domains, per layer, measured on
evaluation histories with the attention probabilities materialised (kernels.attention.reference).

pair_mass[layer][a][b] = mean over the real queries of domain a (over heads too) of the
attention they pay to keys of domain b. Labels are the data's domain tokens, then "IB" (the
bottleneck tokens, AutoCDSR+ layers) and "[MASK]" (hidden-domain masks) where present.
"""
import numpy as np
import torch

from kernels import WILDCARD_DOMAIN
from kernels.attention import unpack_qkv
from kernels.attention.reference import reference_probabilities

from .data.batches import eval_batch, to_device


def _capture_attention_inputs(model):
    """Forward hooks recording each attention layer's inputs (x, domains, seq_lens, causal,
    num_bottleneck) for one forward pass; returns (records, remove)."""
    records = []
    handles = [block.attn.register_forward_hook(
        lambda module, args, output: records.append((module, args)))
        for block in model.encoder.blocks]
    return records, lambda: [h.remove() for h in handles]


def _labels(domains, num_domains):
    """[B, L] label index: domain id, num_domains = IB, num_domains + 1 = [MASK], -1 = padding."""
    labels = torch.where(domains == WILDCARD_DOMAIN, num_domains + 1, domains.long())
    return torch.where(domains < 0, -1, labels)


@torch.no_grad()
def domain_pair_mass(model, data, split, max_len, max_rows=512, batch_size=128, device="cpu"):
    """{"labels": [...], "layers": [[[mass]]]} over the first max_rows rows of split."""
    model.eval()
    num_domains = data.num_domains
    size = num_domains + 2
    sums = torch.zeros(len(model.encoder.blocks), size, size, dtype=torch.float64)
    counts = torch.zeros(len(model.encoder.blocks), size, dtype=torch.float64)
    rows_all = np.arange(min(max_rows, len(split)))
    for lo in range(0, len(rows_all), batch_size):
        rows = rows_all[lo:lo + batch_size]
        batch = to_device(eval_batch(split, rows, max_len, model.arch, model.tokens), device)
        records, remove = _capture_attention_inputs(model)
        try:
            model(batch["items"], batch["domains"], batch["seq_lens"])
        finally:
            remove()
        for layer, (module, (x, domains, seq_lens, causal, nb, *_)) in enumerate(records):
            b, length, _ = x.shape
            q, k, _ = unpack_qkv(module.qkv(x).view(b, length, 3, module.heads, -1))
            probs, _ = reference_probabilities(q.float(), k.float(), domains, causal=causal,
                                               num_bottleneck=nb, seq_lens=seq_lens)
            labels = _labels(domains, num_domains)
            onehot = torch.nn.functional.one_hot(labels.clamp(min=0), size).double()
            onehot = onehot * (labels >= 0)[..., None]
            to_label = torch.einsum("bhij,bjc->bic", probs.double(), onehot)   # summed over h
            sums[layer] += torch.einsum("bia,bic->ac", onehot, to_label).cpu()
            counts[layer] += onehot.sum(dim=(0, 1)).cpu() * probs.shape[1]
    mean = sums / counts.clamp(min=1)[..., None]
    present = (counts.sum(0) > 0).tolist()
    names = [str(t) for t in data.domain_tokens] + ["IB", "[MASK]"]
    keep = [i for i in range(size) if present[i]]
    return {"labels": [names[i] for i in keep],
            "layers": [[[float(mean[l, a, c]) for c in keep] for a in keep]
                       for l in range(mean.shape[0])],
            "rows": int(len(rows_all))}


@torch.no_grad()
def user_cd_mass(model, split, max_len, batch_size=256, device="cpu"):
    """[len(split)] each evaluation history's cross-domain mass: the mean over the objective's
    layers, the heads and the counted queries (as L_cd, per user)."""
    model.eval()
    out = []
    for lo in range(0, len(split), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(split)))
        batch = to_device(eval_batch(split, rows, max_len, model.arch, model.tokens), device)
        _, masses = model(batch["items"], batch["domains"], batch["seq_lens"])
        weight = model.cd_query_mask(batch["domains"]).float()
        per_layer = [(m * weight[:, None]).sum(dim=(1, 2)) / (weight.sum(1) * m.shape[1]).clamp(min=1)
                     for m in model.objective_masses(masses)]
        out.append(torch.stack(per_layer).mean(0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


STRATA = ("both hit", "only cross-domain hits", "only single-domain hits", "neither")


def outcome_strata(cross_hits, single_hits):
    """[n] stratum index per user from two boolean hit arrays (cross-domain, single-domain)."""
    return np.select([cross_hits & single_hits, cross_hits & ~single_hits,
                      ~cross_hits & single_hits], [0, 1, 2], default=3)
