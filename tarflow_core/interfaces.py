"""Abstract interfaces of the components a TarFlowLM is assembled from.

Shapes: B batch, T positions, D channels per position, C conditioner features, V vocabulary.

Log-determinant convention, used by every component: `ladj` is the log absolute determinant of
the Jacobian of the forward map, summed over every axis but the batch axis, shape (B,). Per-token
averages are taken once, in the loss.
"""

from abc import ABC, abstractmethod

import torch
from torch import nn


class Encoder(nn.Module, ABC):
    """The posterior q(z | x): tokens to latent vectors."""

    vocab_size: int
    dim: int

    @abstractmethod
    def sample(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """Draw z ~ q(z | x).

        Args:
            x: tokens, (B, T) long.
            noise: standard normal noise of shape (B, T, D); drawn when omitted.

        Returns:
            (z, log_q): latents (B, T, D) and log q(z | x) summed per sequence, (B,).
        """

    @abstractmethod
    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z | x) summed per sequence, (B,)."""


class Decoder(nn.Module, ABC):
    """The likelihood p(x | z): latent vectors back to tokens."""

    @abstractmethod
    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised log p(x_t = k | z_t) for every token k, (B, T, V)."""

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) summed per sequence, (B,)."""
        log_p = self.logits(z).gather(-1, x.unsqueeze(-1)).squeeze(-1)
        return log_p.sum(-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The most probable token at every position, (B, T) long."""
        return self.logits(z).argmax(-1)


class Prior(nn.Module, ABC):
    """The base density of the flow output u."""

    @abstractmethod
    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """log p(u) summed per sequence, (B,)."""

    @abstractmethod
    def sample(self, shape, temperature: float = 1.0, generator=None, dtype=None):
        """Draw u of the given shape (B, T, D); temperature scales the spread."""


class Direction(nn.Module, ABC):
    """The order in which a flow visits positions: a permutation of the T axis.

    A permutation has log-determinant 0; `forward` returns it anyway so that every invertible
    piece of the model obeys one contract. Neither method may modify its argument in place.
    """

    @abstractmethod
    def forward(self, h: torch.Tensor):
        """Natural order to visiting order: (B, T, D) -> ((B, T, D), ladj (B,))."""

    @abstractmethod
    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """Visiting order back to natural order."""


class Conditioner(nn.Module, ABC):
    """A causal network whose output at position t depends only on inputs before t.

    Attributes:
        context_dim: C, the number of features it gives each position.
    """

    context_dim: int

    @abstractmethod
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Features for every position, shifted right by one: (B, T, D) -> (B, T, C)."""

    def begin_decoding(self, batch: int, dim: int, dtype: torch.dtype):
        """Start inverting a flow, one position at a time in its visiting order.

        Returns `(state, features)`: a fresh decoding state, private to this call, and the
        features of position 0, (B, 1, C). `continue_decoding` then takes the positions as they
        are solved. This default keeps the solved prefix and re-runs `forward` over all of it
        at every step (quadratic in T); a conditioner that can cache its work overrides both
        methods, and the contract tests hold the two to the same features.
        """
        state = PrefixState([])
        placeholder = torch.zeros(batch, 1, dim, dtype=dtype)
        return state, self.forward(placeholder)

    def continue_decoding(self, state, h: torch.Tensor) -> torch.Tensor:
        """Take the next n solved positions (B, n, D); return the features of the n positions
        that follow them, (B, n, C)."""
        state.solved.append(h)
        fed = sum(part.shape[1] for part in state.solved)
        prefix = torch.cat([*state.solved, torch.zeros_like(h[:, :1])], dim=1)
        # The placeholder in the last slot is never read: features are shifted right by one.
        return self.forward(prefix)[:, fed - h.shape[1] + 1 : fed + 1]


class PrefixState:
    """The decoding state of a conditioner without a cache: the positions solved so far."""

    def __init__(self, solved: list):
        self.solved = solved


class Coupling(nn.Module, ABC):
    """The invertible map of each position given the conditioner's features.

    Subclasses take `dim` (D) and `context_dim` (C) as their first two arguments; one that
    also takes `encoder` is given the model's encoder (to tie itself to the codebook). The map
    may mix the channels of one position in any invertible way but never reads other
    positions: that is the conditioner's job. A new coupling should start at, or near, the
    identity; one that cannot by design says so with `near_identity_at_init = False`.
    """

    dim: int
    context_dim: int
    near_identity_at_init: bool = True

    @abstractmethod
    def forward(self, h: torch.Tensor, ctx: torch.Tensor):
        """(h (B, T, D), ctx (B, T, C)) -> (u (B, T, D), ladj (B,))."""

    @abstractmethod
    def inverse(self, u: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """(u (B, T, D), ctx (B, T, C)) -> h (B, T, D)."""


class LanguageModel(nn.Module, ABC):
    """What the training harness needs of a model: a bound to optimise, and samples.

    Implemented by the TarFlowLM and by the discrete autoregressive baseline, so both train,
    evaluate and sample through the same code.

    Attributes:
        vocab_size: V.
    """

    vocab_size: int

    @abstractmethod
    def noise_like(self, x: torch.Tensor, generator=None):
        """The noise one evaluation of the bound draws for tokens x (B, T), or None."""

    @abstractmethod
    def elbo(self, x: torch.Tensor, noise=None):
        """A lower bound on log p(x) for tokens x (B, T).

        Returns an object with `.elbo`, the bound summed per sequence (B,), and `.parts(T)`,
        a dict of per-token scalars worth logging.
        """

    @abstractmethod
    def sample(
        self,
        num_samples: int,
        length: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        on_pass=None,
        on_position=None,
        prompt: torch.Tensor | None = None,
        prompt_rounds: int = 3,
    ) -> torch.Tensor:
        """Tokens (num_samples, length). `on_position()` is called after each position is
        generated, `on_pass(index, z)` after each pass of a multi-pass model. A prompt
        (num_samples, T_p) of tokens fixes the first T_p; a model that can condition on it only
        approximately refines its draw over `prompt_rounds` rounds and says so in a warning."""
