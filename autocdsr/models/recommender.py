"""SASRec (causal, next item) and BERT4Rec (bidirectional, cloze) over one encoder, with
item scores tied to the item embedding table."""
import torch
from torch import nn

from .encoder import Encoder


class Recommender(nn.Module):
    def __init__(self, arch, num_items, num_domains, max_len, hidden=64, heads=2, layers=2,
                 dropout=0.1, backend="auto", bottleneck_tokens=0, bottleneck_layers=-1):
        super().__init__()
        if arch not in ("sasrec", "bert4rec"):
            raise ValueError(f"arch must be 'sasrec' or 'bert4rec', got {arch!r}")
        if bottleneck_tokens and arch == "sasrec":
            raise ValueError("bottleneck tokens need a bidirectional encoder (bert4rec): with a "
                             "causal one the IB tokens would carry future items back to earlier "
                             "positions (future leakage)")
        self.arch, self.num_items = arch, num_items
        if bottleneck_layers < 0:
            bottleneck_layers = max(1, layers // 2)
        # ids: 0 pad, 1..num_items items, num_items + 1 [MASK] (BERT4Rec);
        # domains: 0..num_domains - 1 real, num_domains [MASK], num_domains + 1 IB tokens
        self.mask_domain = num_domains
        self.encoder = Encoder(num_items + 2, max_len, hidden, heads, layers, dropout, backend,
                               bottleneck_tokens, bottleneck_layers, num_domains + 1)
        self.bottleneck_layers = bottleneck_layers if bottleneck_tokens else 0

    @property
    def causal(self):
        return self.arch == "sasrec"

    @property
    def item_embedding(self):
        return self.encoder.item_embedding

    def forward(self, items, domains, seq_lens):
        """Hidden states [B, L, hidden] and per-layer masses."""
        return self.encoder(items, domains, seq_lens, self.causal)

    def item_weights(self):
        """[num_items + 1, hidden] scoring table (row 0 = padding, never a valid answer)."""
        return self.encoder.item_embedding.weight[: self.num_items + 1]

    def mass_layers(self):
        """Indices of the layers whose mass the cross-domain objective acts on: every layer,
        or the bottleneck layers in AutoCDSR+ mode."""
        count = len(self.encoder.blocks)
        return list(range(self.bottleneck_layers)) if self.bottleneck_layers else list(range(count))

    def prediction_states(self, hidden, seq_lens):
        """The state that predicts the target: the last real position (SASRec: last event,
        BERT4Rec: the appended [MASK])."""
        index = (seq_lens - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
