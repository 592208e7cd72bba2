"""Gaussian codebook encoder and its Bayes-tied decoder (Zhang et al. 2025, arXiv 2507.00425).

Token k owns a mean mu[k] in R^D and one scale sigma[k]: q(z_t | x_t = k) = N(mu[k], sigma[k]^2 I).
The decoder has no parameters of its own: with a uniform token prior,
p(x_t = k | z_t) = N(z_t; mu[k], sigma[k]^2 I) / sum_j N(z_t; mu[j], sigma[j]^2 I).
"""

import math

import torch
from torch import nn

from tarflow_core.hookspecs import hookimpl
from tarflow_core.interfaces import Decoder, Encoder
from tarflow_core.special import LOG_SQRT_2PI


class GaussianCodebookEncoder(Encoder):
    """A learned mean and a learned scalar scale per token."""

    def __init__(
        self, vocab_size: int, dim: int, init_sigma: float = 0.3, init_mean_std: float = 1.0
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.mean = nn.Parameter(torch.randn(vocab_size, dim) * init_mean_std)
        self.log_sigma = nn.Parameter(torch.full((vocab_size,), math.log(init_sigma)))

    def sample(self, x, noise=None):
        if noise is None:
            noise = torch.randn(*x.shape, self.dim, dtype=self.mean.dtype, device=x.device)
        z = self.mean[x] + self.log_sigma[x].exp().unsqueeze(-1) * noise
        return z, self.log_prob(x, z)

    def log_prob(self, x, z):
        log_sigma = self.log_sigma[x]  # (B, T)
        eps = (z - self.mean[x]) / log_sigma.exp().unsqueeze(-1)
        log_q = -0.5 * eps.pow(2).sum(-1) - self.dim * (log_sigma + LOG_SQRT_2PI)
        return log_q.sum(-1)


class TiedBayesDecoder(Decoder):
    """The posterior over tokens implied by the encoder's codebook and a uniform token prior."""

    def __init__(self, encoder: GaussianCodebookEncoder):
        super().__init__()
        self.encoder = encoder

    def logits(self, z):
        mean, log_sigma = self.encoder.mean, self.encoder.log_sigma  # (V, D), (V,)
        D = mean.shape[1]

        # ||z - mu_k||^2 through the matmul expansion: no (B, T, V, D) tensor for large V.
        sq_dist = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ mean.T + mean.pow(2).sum(-1)).clamp(
            min=0
        )
        log_density = -0.5 * sq_dist * torch.exp(-2 * log_sigma) - D * log_sigma
        return torch.log_softmax(log_density, dim=-1)


@hookimpl
def tarflow_register_components(registry):
    registry.add("encoder", "gaussian_codebook", GaussianCodebookEncoder)
    registry.add("decoder", "tied_bayes", TiedBayesDecoder)
