"""Discrete-equivalent coupling: the Mix-d flow of Zhang et al. 2025.

Each position is an isotropic Gaussian mixture, p(h_t | h_<t) = sum_k pi_k N(h_t; mu_k, s_k^2 I),
with the weights pi predicted from the context like a language model's next-token logits. The
Rosenblatt transform makes it a flow: channel by channel, the conditional of an isotropic
mixture is again a 1-D mixture whose weights are the component posteriors given the earlier
channels (Bayes' rule), so u_i = Phi^-1(F_i(h_i)) and ladj = log p_mix(h_t) - log N(u_t; 0, I).

Tied (`discrete_tied`): the components are the encoder's own codebook (K = V). With only this
flow, the tied decoder and sigma -> 0, the ELBO equals the cross-entropy of a discrete
autoregressive transformer whose input embeddings are the codebook means (the paper's
Proposition 4). Untied (`discrete`): the flow owns its codebook, any K, any depth.
"""

import math

import torch
from torch import nn

from tarflow_core import kernels
from tarflow_core.errors import ConfigError
from tarflow_core.hookspecs import hookimpl
from tarflow_core.interfaces import Coupling
from tarflow_core.special import LOG_SQRT_2PI, mixture_to_normal, solve_normal_to_mixture


class _IsotropicMixtureCoupling(Coupling):
    """The Rosenblatt flow of an isotropic Gaussian mixture with context-given weights.

    `compiled_inverse` (a constructor option of both couplings): sample through the compiled
    kernel (`tarflow_core.kernels`) on the CPU; False keeps the PyTorch solver everywhere.
    """

    compiled_inverse = True

    def _codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Component means (K, D) and log scales (K,)."""
        raise NotImplementedError

    def _channel_weights(self, h, ctx, log_pi=None):
        """log pi of every component for every channel, given the channels before it.

        `log_pi`, the context's own weights (B, T, K), saves recomputing them when the weights
        are evaluated many times for one ctx (the inverse).
        Returns (log_weights (B, T, D, K), loc (D, K), log_scale (K,)).
        """
        mean, log_scale = self._codebook()
        if log_pi is None:
            log_pi = torch.log_softmax(self.logits(ctx), dim=-1)  # (B, T, K)

        # log N(h_j; mu_kj, s_k) per channel, then the sum over the channels before each one.
        standard = (h.unsqueeze(-1) - mean.T) * torch.exp(-log_scale)  # (B, T, D, K)
        log_density = -0.5 * standard.pow(2) - log_scale - LOG_SQRT_2PI
        before = torch.cumsum(log_density, dim=-2) - log_density
        log_weights = torch.log_softmax(log_pi.unsqueeze(-2) + before, dim=-1)
        return log_weights, mean.T, log_scale

    def forward(self, h, ctx):
        log_weights, loc, log_scale = self._channel_weights(h, ctx)
        u, log_derivative = mixture_to_normal(
            h, log_weights, loc, log_scale.expand_as(loc), "gaussian"
        )
        return u, log_derivative.flatten(1).sum(-1)

    def inverse(self, u, ctx):
        # Every channel at once; the weights of channel i, from channels < i, are recomputed
        # from the current guess at each step (see solve_normal_to_mixture).
        log_pi = torch.log_softmax(self.logits(ctx), dim=-1)
        if self.compiled_inverse and kernels.usable_for(u, ctx):
            mean, log_scale = self._codebook()
            return kernels.invert_isotropic_mixture(u, log_pi, mean, log_scale)

        def mixture_of(h):
            log_weights, loc, log_scale = self._channel_weights(h, ctx, log_pi)
            return log_weights, loc, log_scale.expand_as(loc)

        return solve_normal_to_mixture(u, mixture_of, "gaussian", channels_depend=True)


class TiedDiscreteCoupling(_IsotropicMixtureCoupling):
    """Mix-d tied to the encoder's codebook: the network predicts only V mixture logits.

    A new flow predicts uniform weights, so it starts as the codebook's own mixture, not as
    the identity.
    """

    near_identity_at_init = False

    def __init__(
        self, dim: int, context_dim: int, encoder: nn.Module, compiled_inverse: bool = True
    ):
        super().__init__()
        self.compiled_inverse = compiled_inverse
        if encoder.dim != dim:
            raise ConfigError(
                f"the tied discrete coupling needs one token per position (D = d = "
                f"{encoder.dim}) but got D = {dim}",
                hint="use patch size 1 with it, or the untied 'discrete' coupling",
            )
        self.dim, self.context_dim = dim, context_dim

        # Held in a list so the encoder is not registered twice; it belongs to the model.
        self._encoder = [encoder]
        self.logits = nn.Linear(context_dim, encoder.vocab_size)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def _codebook(self):
        encoder = self._encoder[0]
        return encoder.mean, encoder.log_sigma


class DiscreteCoupling(_IsotropicMixtureCoupling):
    """Mix-d with a codebook of its own: K components anywhere in the stack.

    The means start spread by `init_spread` and the scales fill the rest of a unit variance,
    so with uniform weights the mixture is close to N(0, I): close to the identity.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_components: int = 64,
        init_spread: float = 0.5,
        compiled_inverse: bool = True,
    ):
        super().__init__()
        self.compiled_inverse = compiled_inverse
        if not 0 <= init_spread < 1:
            raise ValueError(f"init_spread must lie in [0, 1), not {init_spread}")
        self.dim, self.context_dim = dim, context_dim
        self.mean = nn.Parameter(torch.randn(num_components, dim) * init_spread)
        self.log_scale = nn.Parameter(
            torch.full((num_components,), 0.5 * math.log(1 - init_spread**2))
        )
        self.logits = nn.Linear(context_dim, num_components)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def _codebook(self):
        return self.mean, self.log_scale


@hookimpl
def tarflow_register_components(registry):
    registry.add("coupling", "discrete_tied", TiedDiscreteCoupling)
    registry.add("coupling", "discrete", DiscreteCoupling)
