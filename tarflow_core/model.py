"""Model assembly: flows from registry parts, and the TarFlowLM that stacks them.

Shapes: B batch, T tokens, P tokens per patch, N = T / P positions, d latent channels per token,
D = d * P channels per position, V vocabulary.
"""

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tarflow_core.errors import ConfigError
from tarflow_core.interfaces import (
    Conditioner,
    Coupling,
    Decoder,
    Direction,
    Encoder,
    LanguageModel,
    Prior,
)

logger = logging.getLogger(__name__)


class Flow(nn.Module):
    """One autoregressive flow: reorder positions, condition causally, couple each position."""

    def __init__(self, direction: Direction, conditioner: Conditioner, coupling: Coupling):
        super().__init__()
        self.direction = direction
        self.conditioner = conditioner
        self.coupling = coupling

    def forward(self, h: torch.Tensor):
        """(B, N, D) -> (u (B, N, D), ladj (B,)), both in natural position order."""
        h_visit, _ = self.direction(h)
        u_visit, ladj = self.coupling(h_visit, self.conditioner(h_visit))
        return self.direction.inverse(u_visit), ladj

    @torch.no_grad()
    def inverse(self, u: torch.Tensor, on_position=None) -> torch.Tensor:
        """Invert position by position in visiting order; each needs every earlier one.

        TODO: the conditioner is re-run over the whole prefix at every position (quadratic in
        N); a key-value cache would make each step cost one position.
        """
        u_visit, _ = self.direction(u)
        N = u_visit.shape[1]
        solved = []
        for t in range(N):
            # Position t's own slot is a placeholder: its features never read it.
            prefix = torch.cat(solved + [torch.zeros_like(u_visit[:, :1])], dim=1)
            ctx = self.conditioner(prefix)[:, t : t + 1]
            solved.append(self.coupling.inverse(u_visit[:, t : t + 1], ctx))
            if on_position is not None:
                on_position()
        return self.direction.inverse(torch.cat(solved, dim=1))


@dataclass
class Elbo:
    """The terms of the single-sample ELBO, each summed per sequence, shape (B,)."""

    log_px_z: torch.Tensor  # log p(x | z), tied decoder
    log_q: torch.Tensor  # log q(z | x), encoder
    log_base: torch.Tensor  # log N(u; 0, I)
    ladj: list[torch.Tensor]  # per flow

    @property
    def log_prior(self) -> torch.Tensor:
        return self.log_base + sum(self.ladj)

    @property
    def elbo(self) -> torch.Tensor:
        return self.log_px_z + self.log_prior - self.log_q

    def parts(self, T: int) -> dict[str, float]:
        """Batch means per token, for logging."""
        parts = {
            "recon": -self.log_px_z.mean().item() / T,
            "log_q": self.log_q.mean().item() / T,
            "log_base": self.log_base.mean().item() / T,
        }
        for index, ladj in enumerate(self.ladj):
            parts[f"flow/{index}/ladj"] = ladj.mean().item() / T
        return parts


def channel_shuffle(D: int, P: int) -> torch.Tensor:
    """Even channels first, then odd: mixes the tokens of a patch between flows."""
    if P == 1:
        return torch.arange(D)
    return torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])


class TarFlowLM(LanguageModel):
    """A VAE whose prior is a stack of autoregressive flows (Zhang et al. 2025)."""

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        prior: Prior,
        flows: Sequence[Flow],
        patch_size: int = 1,
    ):
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior
        self.flows = nn.ModuleList(flows)
        self.patch_size = patch_size
        # Progressive training grows the prior one flow at a time; the rest act as identity.
        self.active_flows = len(self.flows)
        D = encoder.dim * patch_size
        shuffle = channel_shuffle(D, patch_size)
        self.register_buffer("shuffle", shuffle, persistent=False)
        self.register_buffer("unshuffle", torch.argsort(shuffle), persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        B, T, d = z.shape
        if T % self.patch_size:
            raise ValueError(f"sequence length {T} is not a multiple of patch {self.patch_size}")
        return z.reshape(B, T // self.patch_size, d * self.patch_size)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        return h.reshape(B, N * self.patch_size, D // self.patch_size)

    def to_base(self, z: torch.Tensor):
        """Latents (B, T, d) to base noise (B, N, D), with every flow's ladj."""
        h = self.patchify(z)
        ladj = []
        for index, flow in enumerate(self.flows[: self.active_flows]):
            h, flow_ladj = flow(h)
            ladj.append(flow_ladj)
            if index < self.active_flows - 1:
                h = h[..., self.shuffle]
        return h, ladj

    @torch.no_grad()
    def from_base(self, u: torch.Tensor, on_pass=None, on_position=None) -> torch.Tensor:
        """Base noise (B, N, D) back to latents (B, T, d), inverting the last flow first.

        `on_pass(index, z)` sees the latents after each flow's inversion, so a caller can
        decode every pass and watch the text go from coarse to fine.
        """
        h = u
        for index in reversed(range(self.active_flows)):
            if index < self.active_flows - 1:
                h = h[..., self.unshuffle]
            h = self.flows[index].inverse(h, on_position=on_position)
            if on_pass is not None:
                partial = h if index == 0 else h[..., self.unshuffle]
                on_pass(index, self.unpatchify(partial))
        return self.unpatchify(h)

    def noise_like(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Standard normal noise for the encoder's sample of z given tokens x (B, T)."""
        dtype = next(self.parameters()).dtype
        return torch.randn(*x.shape, self.encoder.dim, generator=generator, dtype=dtype)

    def elbo(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> Elbo:
        """The single-sample ELBO of tokens x (B, T), z ~ q(z | x)."""
        z, log_q = self.encoder.sample(x, noise)
        u, ladj = self.to_base(z)
        return Elbo(self.decoder.log_prob(x, z), log_q, self.prior.log_prob(u), ladj)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        length: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        on_pass=None,
        on_position=None,
    ) -> torch.Tensor:
        """Tokens (num_samples, length) by inverting every flow from base noise."""
        D = self.encoder.dim * self.patch_size
        dtype = next(self.parameters()).dtype
        u = self.prior.sample(
            (num_samples, length // self.patch_size, D), temperature, generator, dtype
        )
        z = self.from_base(u, on_pass=on_pass, on_position=on_position)
        return self.decoder.decode(z)


def _per_flow(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ConfigError(
                f"{name} has {len(value)} entries but there are {count} flows",
                hint="give one entry per coupling in build_model.couplings, or a single value",
            )
        return list(value)
    return [value] * count


def takes_encoder(factory) -> bool:
    """Whether a coupling factory asks for the model's encoder (to tie itself to it)."""
    # gin wraps a class in a subclass whose own signature is (*args, **kwargs).
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        return "encoder" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def direction_names(directions, count: int) -> list[str]:
    """'alternate' means left-to-right, right-to-left, ... starting from the first flow."""
    if directions == "alternate":
        return ["left_to_right" if i % 2 == 0 else "right_to_left" for i in range(count)]
    return _per_flow(directions, count, "build_model.directions")


def build_model(
    vocab_size: int,
    seq_len: int,
    registry,
    couplings: Sequence[str] = ("mixture", "mixture", "mixture"),
    layers_per_flow: int | Sequence[int] = 2,
    directions: str | Sequence[str] = "alternate",
    coupling_options: dict | Sequence[dict] | None = None,
    latent_dim: int = 16,
    patch_size: int = 1,
    encoder: str = "gaussian_codebook",
    decoder: str = "tied_bayes",
    prior: str = "standard_normal",
    conditioner: str = "causal_transformer",
) -> TarFlowLM:
    """Assemble a TarFlowLM from registered components.

    Args:
        vocab_size: V, from the tokenizer.
        seq_len: T, the longest sequence the model will see.
        registry: the component registry.
        couplings: one coupling name per flow; its length is the number of flows.
        layers_per_flow: conditioner depth, one value or one per flow.
        directions: "alternate", one direction name, or one per flow.
        coupling_options: keyword arguments for the couplings, one dict or one per flow; they
            override what gin binds for that coupling.
        latent_dim: d, channels per token.
        patch_size: P, tokens per flow position.
    """
    if isinstance(couplings, str):
        couplings = [couplings]
    count = len(couplings)
    if count == 0:
        raise ConfigError("build_model.couplings is empty", hint="name at least one coupling")
    visit = direction_names(directions, count)

    # Unknown names first: they are the most common mistake and the lookup lists the options.
    make_encoder = registry.get("encoder", encoder)
    make_decoder = registry.get("decoder", decoder)
    make_prior = registry.get("prior", prior)
    make_conditioner = registry.get("conditioner", conditioner)
    make_couplings = [registry.get("coupling", name) for name in couplings]
    make_directions = [registry.get("direction", name) for name in visit]

    if patch_size < 1 or seq_len % patch_size:
        raise ConfigError(
            f"sequence length {seq_len} is not a multiple of patch size {patch_size}",
            hint="choose a patch size that divides the sequence length",
        )
    depths = _per_flow(layers_per_flow, count, "build_model.layers_per_flow")
    options = _per_flow(coupling_options or {}, count, "build_model.coupling_options")

    the_encoder = make_encoder(vocab_size, latent_dim)
    D, N = latent_dim * patch_size, seq_len // patch_size
    flows = []
    for index in range(count):
        body = make_conditioner(D, depths[index], N)
        extra = {"encoder": the_encoder} if takes_encoder(make_couplings[index]) else {}
        coupling = make_couplings[index](D, body.context_dim, **extra, **options[index])
        flows.append(Flow(make_directions[index](), body, coupling))
    model = TarFlowLM(the_encoder, make_decoder(the_encoder), make_prior(), flows, patch_size)
    logger.info(
        "TarFlowLM: %d flows (%s), %s, %.2fM parameters",
        count,
        ", ".join(f"{c}/{v}/{d}L" for c, v, d in zip(couplings, visit, depths, strict=True)),
        f"d={latent_dim} P={patch_size}",
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model
