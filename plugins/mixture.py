"""Mixture-CDF coupling: the Mix-1 flow of Zhang et al. 2025.

Inside a position the channels are transformed one after another. Channel i gets a 1-D mixture
of K components (logistic as in Flow++, Ho et al. 2019, or Gaussian) whose weights, locations
and scales come from the conditioner's features and from the position's own channels before i,
through a masked (MADE, Germain et al. 2015) head. Then u_i = Phi^-1(F_i(h_i)) and
ladj = sum_i log p_i(h_i) - log N(u_i; 0, 1). The inverse solves F_i(h_i) = Phi(u_i) channel by
channel with a bracketed Newton search.
"""

import math

import torch
from torch import nn

from tarflow_core import kernels
from tarflow_core.hookspecs import hookimpl
from tarflow_core.interfaces import Coupling
from tarflow_core.special import mixture_to_normal, soft_clamp, solve_normal_to_mixture

# Scale of a logistic that best matches the standard normal CDF (Phi(x) ~ sigmoid(1.702 x)).
LOGISTIC_MATCHING_SCALE = 1 / 1.702

# Initial component locations span [-INIT_GRID, INIT_GRID]: most of a standard normal.
INIT_GRID = 2.5


class MaskedChannelHead(nn.Module):
    """Per-channel parameters where channel i sees the context and channels < i only.

    (h (..., D), ctx (..., C)) -> (..., D, P) for P parameters per channel.
    """

    def __init__(self, dim: int, context_dim: int, hidden: int, params_per_channel: int):
        super().__init__()
        self.dim, self.params_per_channel = dim, params_per_channel

        # Hidden unit j may read channels < degree[j]; output i may read units of degree <= i.
        degree = torch.arange(hidden) % dim
        self.register_buffer("degree", degree, persistent=False)
        self.register_buffer("in_mask", (torch.arange(dim) < degree[:, None]).float())
        out_degree = torch.arange(dim).repeat_interleave(params_per_channel)
        self.register_buffer("out_mask", (degree[None, :] <= out_degree[:, None]).float())

        self.from_context = nn.Linear(context_dim, hidden)
        self.from_channels = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim * params_per_channel)

        # Only 1/D of the hidden units may feed channel 0, yet channel 0 depends most on the
        # context; a direct linear path gives every channel the whole context.
        self.context_out = nn.Linear(context_dim, dim * params_per_channel, bias=False)
        nn.init.zeros_(self.out.weight)  # the parameters start at the bias: near identity
        nn.init.zeros_(self.context_out.weight)

    def forward(self, h, ctx, context=None):
        """`context`, from `context_part(ctx)`, saves recomputing what does not depend on h when
        the head is evaluated many times for one ctx (the inverse)."""
        hidden_ctx, out_ctx, w_in, w_out = self.context_part(ctx) if context is None else context
        hidden = hidden_ctx + h @ w_in
        out = torch.nn.functional.gelu(hidden) @ w_out + out_ctx
        return out.unflatten(-1, (self.dim, self.params_per_channel))

    def context_part(self, ctx):
        """The terms of `forward` that depend on ctx alone, and the masked weights."""
        return (*self.context_terms(ctx), *self.masked_weights())

    def context_terms(self, ctx):
        return self.from_context(ctx), self.out.bias + self.context_out(ctx)

    def masked_weights(self):
        return (self.from_channels.weight * self.in_mask).T, (self.out.weight * self.out_mask).T

    def kernel_weights(self) -> tuple:
        """The masked weights as the compiled inverse takes them, remade only when a weight
        changed (an optimiser step or a load bumps its version) or moved."""
        weights = (self.from_channels.weight, self.out.weight)
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        cached = getattr(self, "_kernel_weights", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                prepared = kernels.masked_head_weights(*self.masked_weights(), self.degree)
            self._kernel_weights = cached = (key, prepared)
        return cached[1]


class MixtureCDFCoupling(Coupling):
    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_components: int = 16,
        hidden: int = 128,
        family: str = "logistic",
        max_log_scale: float = 7.0,
        compiled_inverse: bool = True,
    ):
        """`compiled_inverse`: sample through the compiled kernel (`tarflow_core.kernels`) on
        the CPU; False keeps the PyTorch solver, the reference, everywhere."""
        super().__init__()
        if family not in ("logistic", "gaussian"):
            raise ValueError(f"family must be 'logistic' or 'gaussian', not {family!r}")
        if num_components < 1:
            raise ValueError(f"num_components must be at least 1, not {num_components}")
        if hidden < 1 or not max_log_scale > 0:
            raise ValueError(
                f"hidden must be at least 1 and max_log_scale positive, not {hidden} and "
                f"{max_log_scale}"
            )
        self.dim, self.context_dim = dim, context_dim
        self.num_components, self.family = num_components, family
        self.max_log_scale = max_log_scale
        self.compiled_inverse = compiled_inverse
        self.head = MaskedChannelHead(dim, context_dim, hidden, 3 * num_components)
        self._init_near_identity()

    def _init_near_identity(self):
        """Start the mixture close to N(0, 1), so that the flow starts close to the identity.

        The components sit on a grid over [-INIT_GRID, INIT_GRID], weighted by a normal
        density, with a spread that tops the grid's variance up to one. The context can then
        move mass between places by changing logits (a classification) before it has learned
        to move the places themselves (a regression), which speeds up early training.
        """
        K = self.num_components

        # Spacing at most 0.5, so that few components stay close together near zero.
        half_width = min(INIT_GRID, 0.25 * (K - 1))
        loc = torch.linspace(-half_width, half_width, K, dtype=torch.float64)
        spacing = 2 * half_width / (K - 1) if K > 1 else 0.0
        logits = -0.5 * loc**2 / (1 - spacing**2)

        # Component spread fills what the grid leaves of a unit variance.
        weights = torch.softmax(logits, 0)
        grid_variance = (weights * loc**2).sum() - (weights * loc).sum() ** 2
        spread = torch.sqrt(1 - grid_variance).item()
        base = spread if self.family == "gaussian" else spread * LOGISTIC_MATCHING_SCALE
        log_scale = torch.full((K,), math.log(base), dtype=torch.float64)
        with torch.no_grad():
            self.head.out.bias.copy_(torch.cat([logits, loc, log_scale]).repeat(self.dim).float())

    def _mixture(self, h, ctx, context=None):
        logits, loc, log_scale = self.head(h, ctx, context).chunk(3, dim=-1)  # (B, T, D, K)
        log_weights = torch.log_softmax(logits, dim=-1)
        return log_weights, loc, soft_clamp(log_scale, self.max_log_scale)

    def forward(self, h, ctx):
        u, log_derivative = mixture_to_normal(h, *self._mixture(h, ctx), self.family)
        return u, log_derivative.flatten(1).sum(-1)

    def inverse(self, u, ctx):
        if self.compiled_inverse and kernels.usable_for(u, ctx):
            return kernels.invert_masked_mixture(
                u,
                *self.head.context_terms(ctx),
                self.head.kernel_weights(),
                self.num_components,
                self.family == "gaussian",
                self.max_log_scale,
            )

        # Every channel is solved at once, its mixture recomputed from the current guess; the
        # head's context terms are the same throughout, so they are computed once.
        context = self.head.context_part(ctx)
        return solve_normal_to_mixture(
            u,
            lambda h: self._mixture(h, ctx, context),
            self.family,
            channels_depend=True,
            start=u,  # the flow starts near the identity
        )


class GaussianMixtureCDFCoupling(MixtureCDFCoupling):
    """The same coupling with Gaussian components."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_components: int = 16,
        hidden: int = 128,
        max_log_scale: float = 7.0,
        compiled_inverse: bool = True,
    ):
        super().__init__(
            dim, context_dim, num_components, hidden, "gaussian", max_log_scale, compiled_inverse
        )


@hookimpl
def tarflow_register_components(registry):
    registry.add("coupling", "mixture", MixtureCDFCoupling)
    registry.add("coupling", "mixture_gaussian", GaussianMixtureCDFCoupling)
