"""A pre-norm transformer encoder whose attention goes through kernels.cross_domain_attention
and returns, per layer, the cross-domain attention mass [B, H, L] next to the hidden states."""
from dataclasses import dataclass

import torch
from torch import nn

import kernels


class CrossDomainSelfAttention(nn.Module):
    """Multi-head self-attention that also returns each query's cross-domain mass."""
    def __init__(self, hidden, heads, dropout, backend, num_domains, head_dim=0):
        super().__init__()
        self.heads, self.backend, self.num_domains = heads, backend, num_domains
        self.width = heads * (head_dim or hidden // heads)  # may exceed hidden (the T5 layout)
        self.qkv = nn.Linear(hidden, 3 * self.width)
        self.proj = nn.Linear(self.width, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, domains, seq_lens, causal, num_bottleneck, check_inputs=True):
        batch, length, hidden = x.shape
        # the projection's [B, L, 3, H, D] as it is: the kernels read q, k, v from it and
        # write its gradient in that layout (no transposes, no stacking of three gradients)
        qkv = self.qkv(x).view(batch, length, 3, self.heads, -1)
        out, mass = kernels.cross_domain_attention_packed(
            qkv, domains, causal=causal, num_bottleneck=num_bottleneck, seq_lens=seq_lens,
            backend=self.backend, num_domains=self.num_domains, check_inputs=check_inputs)
        out = out.transpose(1, 2).reshape(batch, length, self.width)
        return self.dropout(self.proj(out)), mass


class Block(nn.Module):
    """A pre-norm transformer block: attention (with its mass), then a feed-forward layer."""
    def __init__(self, hidden, heads, dropout, backend, num_domains=None, head_dim=0,
                 ffn_hidden=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = CrossDomainSelfAttention(hidden, heads, dropout, backend, num_domains,
                                             head_dim)
        self.norm2 = nn.LayerNorm(hidden)
        ffn_hidden = ffn_hidden or 4 * hidden
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn_hidden), nn.GELU(),
                                 nn.Linear(ffn_hidden, hidden), nn.Dropout(dropout))

    def forward(self, x, domains, seq_lens, causal, num_bottleneck, check_inputs=True):
        attended, mass = self.attn(self.norm1(x), domains, seq_lens, causal, num_bottleneck,
                                   check_inputs)
        x = x + attended
        return x + self.ffn(self.norm2(x)), mass

    def mass_inputs(self):
        """The parameters of this block that its own attention mass depends on."""
        return [self.norm1, self.attn.qkv]


@dataclass
class Intermediates:
    """What a forward pass hands back besides its outputs, for a caller that takes gradients
    at these points (the training step): the item-table lookup [B, L, hidden] (a gradient with
    respect to it, not to the whole table, is the table's sparse gradient), and, when
    block_inputs is a list, each block's input (the residual stream entering it)."""
    item_vectors: torch.Tensor = None
    block_inputs: list = None


class Encoder(nn.Module):
    """Item + learned position embeddings, `layers` pre-norm blocks, a final LayerNorm.

    AutoCDSR+ (num_bottleneck > 0): learned IB tokens are prepended with the reserved domain
    id `bottleneck_domain`; the first `bottleneck_layers` blocks run in bottleneck mode
    (ordinary tokens see their own domain and the IB tokens), then the IB positions are
    dropped and the rest attend fully. `num_domains` bounds every domain id the attention
    sees (the IB id included), so no backend needs to read the ids on the host.
    """

    def __init__(self, num_embeddings, max_len, *, hidden, heads, layers, dropout, backend,
                 num_domains, num_bottleneck=0, bottleneck_layers=0, bottleneck_domain=0,
                 head_dim=0, ffn_hidden=0):
        super().__init__()
        self.item_embedding = nn.Embedding(num_embeddings, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout, backend, num_domains,
                                          head_dim, ffn_hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.num_bottleneck = num_bottleneck
        self.bottleneck_layers = bottleneck_layers if num_bottleneck else 0
        self.bottleneck_domain = bottleneck_domain
        if num_bottleneck:
            self.bottleneck_embedding = nn.Parameter(torch.randn(num_bottleneck, hidden) * 0.02)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, items, domains, seq_lens, causal, keep=None):
        """Returns hidden [B, L, hidden] over the real positions and the list of per-layer
        masses [B, H, L], IB positions removed (their mass is 0 by definition). keep: an
        Intermediates to fill with the points a caller takes gradients at."""
        batch, length = items.shape
        positions = torch.arange(length, device=items.device)
        item_vectors = self.item_embedding(items)
        block_inputs = None
        if keep is not None:
            keep.item_vectors, block_inputs = item_vectors, keep.block_inputs
        x = item_vectors + self.position_embedding(positions)[None]
        nb = self.num_bottleneck
        if nb:
            x = torch.cat([self.bottleneck_embedding.expand(batch, nb, -1).to(x.dtype), x], dim=1)
            ib_domains = torch.full((batch, nb), self.bottleneck_domain, dtype=domains.dtype,
                                    device=domains.device)
            domains = torch.cat([ib_domains, domains], dim=1)
            seq_lens = seq_lens + nb
        x = self.dropout(x)
        # int32 once here rather than a conversion in every layer's attention call
        domains, seq_lens = domains.to(torch.int32), seq_lens.to(torch.int32)
        masses = []
        for index, block in enumerate(self.blocks):
            if nb and index == self.bottleneck_layers:
                x, domains, seq_lens = x[:, nb:], domains[:, nb:], seq_lens - nb
                nb = 0
            if block_inputs is not None:
                block_inputs.append(x)
            # the first layer checks the attention inputs; the later ones get the same kind
            x, mass = block(x, domains, seq_lens, causal, nb, check_inputs=index == 0)
            masses.append(mass[..., nb:])
        if nb:  # every layer was a bottleneck layer
            x = x[:, nb:]
        return self.norm(x), masses
