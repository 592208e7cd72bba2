"""The causal-transformer conditioner (TarFlow, Zhai et al. 2024).

The input is shifted right by one with a learned start vector in front, so the features of
position t are computed from positions before t only, in the flow's own order.
"""

import torch
from torch import nn

from tarflow_core.hookspecs import hookimpl
from tarflow_core.interfaces import Conditioner
from tarflow_core.transformer import CausalTransformer, check_sizes


class CausalTransformerConditioner(Conditioner):
    def __init__(
        self,
        dim: int,
        num_layers: int,
        max_len: int,
        width: int = 128,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_sizes(width, num_heads, mlp_ratio)
        self.context_dim = width
        self.embed = nn.Linear(dim, width)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        self.body = CausalTransformer(width, num_layers, num_heads, max_len, mlp_ratio, dropout)

    def forward(self, h):
        B = h.shape[0]
        x = self.embed(h[:, :-1])  # the last position is never anyone's context
        start = self.start.to(x.dtype).expand(B, 1, -1)
        return self.body(torch.cat([start, x], dim=1))

    def begin_decoding(self, batch, dim, dtype):
        # The cache holds every layer's keys and values, so each later step runs the
        # transformer over the new positions only.
        cache = self.body.new_cache(batch, dtype)
        start = self.start.to(dtype).expand(batch, 1, -1)
        return cache, self.body(start, cache)

    def continue_decoding(self, state, h):
        return self.body(self.embed(h), state)


@hookimpl
def tarflow_register_components(registry):
    registry.add("conditioner", "causal_transformer", CausalTransformerConditioner)
