"""Affine coupling (TarFlow: Zhai et al. 2024, Normalizing Flows are Capable Generative Models).

u_t = (h_t - b_t) * exp(-a_t), ladj = -sum a_t. Weak on text (the worst row of Zhang et al.
2025, Table 1) and kept as the reference point of every ablation.
"""

import torch
from torch import nn

from tarflow_core.hookspecs import hookimpl
from tarflow_core.interfaces import Coupling
from tarflow_core.special import soft_clamp


class AffineCoupling(Coupling):
    def __init__(self, dim: int, context_dim: int, max_log_scale: float = 6.0):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        self.max_log_scale = max_log_scale
        self.head = nn.Linear(context_dim, 2 * dim)
        nn.init.zeros_(self.head.weight)  # starts as the identity
        nn.init.zeros_(self.head.bias)

    def _shift_and_log_scale(self, ctx):
        shift, log_scale = self.head(ctx).chunk(2, dim=-1)
        return shift, soft_clamp(log_scale, self.max_log_scale)

    def forward(self, h, ctx):
        shift, log_scale = self._shift_and_log_scale(ctx)
        u = (h - shift) * torch.exp(-log_scale)
        return u, -log_scale.flatten(1).sum(-1)

    def inverse(self, u, ctx):
        shift, log_scale = self._shift_and_log_scale(ctx)
        return u * torch.exp(log_scale) + shift


@hookimpl
def tarflow_register_components(registry):
    registry.add("coupling", "affine", AffineCoupling)
