"""SASRec (causal, next item) and BERT4Rec (bidirectional, cloze) over one encoder, with
item scores tied to the item embedding table.

The model owns its token semantics (`tokens`, a TokenSpec: padding, [MASK], the wildcard,
the bottleneck domain; batching and evaluation take their ids from it) and tells the
objective what it needs:
- `objective_masses`: the per-layer masses the cross-domain loss acts on (every layer, or
  the bottleneck layers), over ordinary tokens; `cd_query_mask`: which queries count;
- `gram_parameters`: the parameters whose gradients enter the Pareto solver's Gram matrix.
"""
import torch
from torch import nn

from ..config import CHOICES
from .encoder import Encoder
from .tokens import TokenSpec

SHARED_SETS = CHOICES["weighting.shared"]


class Recommender(nn.Module):
    """SASRec or BERT4Rec over the encoder, scoring items with the tied item table."""
    def __init__(self, cfg, num_items, num_domains, max_len, backend="auto", mask_domain="target"):
        """cfg: the model config (arch, layers, heads, hidden, dropout, bottleneck_tokens,
        bottleneck_layers, head_dim, ffn_hidden), e.g. autocdsr.config.ModelConfig."""
        super().__init__()
        if cfg.arch not in CHOICES["model.arch"]:
            raise ValueError(f"arch must be one of {CHOICES['model.arch']}, got {cfg.arch!r}")
        if cfg.bottleneck_tokens and cfg.arch == "sasrec":
            raise ValueError("bottleneck tokens need a bidirectional encoder (bert4rec): with a "
                             "causal one the IB tokens would carry future items back to earlier "
                             "positions (future leakage)")
        self.tokens = TokenSpec.for_run(num_items, num_domains, mask_domain)
        self.arch, self.num_items, self.num_domains = cfg.arch, num_items, num_domains
        bottleneck_layers = cfg.bottleneck_layers
        if bottleneck_layers < 0:
            bottleneck_layers = max(1, cfg.layers // 2)
        self.bottleneck_layers = bottleneck_layers if cfg.bottleneck_tokens else 0
        self.encoder = Encoder(
            num_items + 2, max_len, hidden=cfg.hidden, heads=cfg.heads, layers=cfg.layers,
            dropout=cfg.dropout, backend=backend,
            num_domains=num_domains + 1,  # the bottleneck tokens' domain id included
            num_bottleneck=cfg.bottleneck_tokens, bottleneck_layers=self.bottleneck_layers,
            bottleneck_domain=self.tokens.bottleneck_domain,
            head_dim=getattr(cfg, "head_dim", 0), ffn_hidden=getattr(cfg, "ffn_hidden", 0))
        # score(item) = h . e_item + b_item: the bias carries what every context shares (how
        # popular an item is), which a protocol with uniform negatives rewards
        bias = getattr(cfg, "item_bias", "none")
        self.item_bias = nn.Parameter(torch.zeros(num_items + 1)) if bias != "none" else None

    @property
    def mask_item(self):
        return self.tokens.mask_item

    @property
    def hide_mask_domain(self):
        return self.tokens.hide_mask_domain

    @property
    def causal(self):
        return self.arch == "sasrec"

    @property
    def item_embedding(self):
        return self.encoder.item_embedding

    def forward(self, items, domains, seq_lens, keep=None):
        """Hidden states [B, L, hidden] and the per-layer masses [B, H, L] (keep: an
        Intermediates that receives the item lookup and, if asked, each block's input)."""
        return self.encoder(items, domains, seq_lens, self.causal, keep)

    def parameters_from(self, layer):
        """The parameters used only at or above the input of block `layer`: blocks layer, ...
        and the final norm (the item table, also read by the loss head, is not among them)."""
        modules = [*self.encoder.blocks[layer:], self.encoder.norm]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def item_weights(self):
        """[num_items + 1, hidden] scoring table (row 0 = padding, never a valid answer)."""
        return self.encoder.item_embedding.weight[: self.num_items + 1]

    def item_biases(self):
        """[num_items + 1] per-item score offsets, or None (model.item_bias=none)."""
        return self.item_bias

    def scores(self, states, candidates=None):
        """Dot-product scores of prediction states [B, H]: [B, num_items + 1] against every
        item, or [B, n] against candidates [B, n]."""
        weights, bias = self.item_weights().float(), self.item_biases()
        if candidates is None:
            out = states @ weights.T
            return out if bias is None else out + bias.float()
        out = torch.einsum("bh,bnh->bn", states, weights[candidates])
        return out if bias is None else out + bias.float()[candidates]

    def mass_layers(self, layers=()):
        """Indices of the layers whose mass the cross-domain objective acts on: every layer,
        or the bottleneck layers in AutoCDSR+ mode; `layers` (weighting.layers) picks a subset
        of those (empty: all of them)."""
        allowed = list(range(self.bottleneck_layers or len(self.encoder.blocks)))
        if not layers:
            return allowed
        chosen = sorted({int(i) for i in layers})
        outside = [i for i in chosen if i not in allowed]
        if outside:
            kind = "bottleneck layers" if self.bottleneck_layers else "layers"
            raise ValueError(f"weighting.layers {outside} are not among the model's {kind} "
                             f"{allowed}")
        return chosen

    def objective_masses(self, masses, layers=()):
        """The per-layer masses L_cd averages: those of mass_layers(layers)."""
        return [masses[i] for i in self.mass_layers(layers)]

    def cd_query_mask(self, domains):
        """[B, L] bool: the queries whose mass enters L_cd (real tokens, wildcards aside)."""
        return self.tokens.cd_queries(domains)

    def gram_parameters(self, shared="reached", layers=()):
        """The parameters whose gradients enter the Gram matrix.

        reached: those the cross-domain loss depends on, without the item table (as the
          official code): embeddings, every block before the last mass layer (of
          mass_layers(layers)), and that layer's first norm and QKV projection;
        last_layer: that last mass layer's first norm and QKV projection alone (the layer
          where L_cd's gradient enters the network last; see autocdsr.balancing);
        all_but_items: every parameter but the item table; all: every parameter.
        """
        if shared not in SHARED_SETS:
            raise ValueError(f"shared must be one of {SHARED_SETS}, got {shared!r}")
        table = self.encoder.item_embedding.weight
        if shared == "all":
            return [p for p in self.parameters() if p.requires_grad]
        if shared == "all_but_items":
            return [p for p in self.parameters() if p.requires_grad and p is not table]
        last = self.mass_layers(layers)[-1]
        if shared == "last_layer":
            return [p for m in self.encoder.blocks[last].mass_inputs() for p in m.parameters()
                    if p.requires_grad]
        modules = [self.encoder.position_embedding, *self.encoder.blocks[:last],
                   *self.encoder.blocks[last].mass_inputs()]
        reached = [p for m in modules for p in m.parameters()]
        if self.encoder.num_bottleneck:
            reached.append(self.encoder.bottleneck_embedding)
        return [p for p in reached if p.requires_grad]

    def prediction_states(self, hidden, seq_lens):
        """The state that predicts the target: the last real position (SASRec: last event,
        BERT4Rec: the appended [MASK])."""
        index = (seq_lens - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
