"""Model assembly: flows from registry parts, and the TarFlowLM that stacks them.

Shapes: B batch, T tokens, P tokens per patch, N = T / P positions, d latent channels per token,
D = d * P channels per position, V vocabulary.
"""

import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from tarflow_core.errors import ConfigError, TarflowWarning
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
    def inverse(
        self,
        u: torch.Tensor,
        known: torch.Tensor | None = None,
        on_position=None,
        cached: bool = True,
    ) -> torch.Tensor:
        """Invert position by position in visiting order; each needs every earlier one.

        Args:
            u: (B, N, D) in natural order.
            known: (B, n, D), the first n positions of this flow's input in its visiting order,
                taken as given (a prompt); only the positions after them are solved.
            on_position: called after each solved position.
            cached: False holds the conditioner to its uncached default, which re-runs it over
                the whole prefix at every step: the reference the cache is tested against.
        """
        u_visit, _ = self.direction(u)
        B, N, D = u_visit.shape
        conditioner = self.conditioner
        if cached:
            begin, step = conditioner.begin_decoding, conditioner.continue_decoding
        else:
            begin = partial(Conditioner.begin_decoding, conditioner)
            step = partial(Conditioner.continue_decoding, conditioner)

        state, ctx = begin(B, D, u_visit.dtype)
        solved, first = [], 0
        if known is not None and known.shape[1] > 0:
            first = known.shape[1]
            solved.append(known.to(u_visit.dtype))
            if first < N:
                ctx = step(state, solved[0])[:, -1:]
        for t in range(first, N):
            h_t = self.coupling.inverse(u_visit[:, t : t + 1], ctx)
            solved.append(h_t)
            if t < N - 1:
                ctx = step(state, h_t)
            if on_position is not None:
                on_position()
        return self.direction.inverse(torch.cat(solved, dim=1))


def keeps_reading_order(direction: Direction, positions: int) -> bool:
    """Whether a direction visits positions in reading order: only then does a prompt, the
    first positions of the text, come first in the flow's own order."""
    probe = torch.arange(positions, dtype=torch.float64).view(1, positions, 1)
    visited, _ = direction(probe)
    return torch.equal(visited, probe)


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
    def from_base(
        self, u: torch.Tensor, on_pass=None, on_position=None, known=None, cached: bool = True
    ) -> torch.Tensor:
        """Base noise (B, N, D) back to latents (B, T, d), inverting the last flow first.

        `on_pass(index, z)` sees the latents after each flow's inversion, so a caller can
        decode every pass and watch the text go from coarse to fine. `known[index]`, if given,
        holds the first positions of flow `index`'s input, taken as given (see `Flow.inverse`).
        """
        h = u
        for index in reversed(range(self.active_flows)):
            if index < self.active_flows - 1:
                h = h[..., self.unshuffle]
            prefix = None if known is None else known[index]
            h = self.flows[index].inverse(h, prefix, on_position, cached)
            if on_pass is not None:
                partial_z = h if index == 0 else h[..., self.unshuffle]
                on_pass(index, self.unpatchify(partial_z))
        return self.unpatchify(h)

    def prompts_exactly(self, positions: int) -> bool:
        """Whether a prompt conditions generation exactly: every active flow reads left to
        right, so the prompt's part of each flow's input depends on the prompt alone."""
        return all(
            keeps_reading_order(flow.direction, positions)
            for flow in self.flows[: self.active_flows]
        )

    def flow_inputs(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The input of every active flow, (B, N, D) each, given latents z (B, T, d)."""
        h = self.patchify(z)
        inputs = []
        for index, flow in enumerate(self.flows[: self.active_flows]):
            inputs.append(h)
            h, _ = flow(h)
            if index < self.active_flows - 1:
                h = h[..., self.shuffle]
        return inputs

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
        prompt: torch.Tensor | None = None,
        prompt_rounds: int = 3,
    ) -> torch.Tensor:
        """Tokens (num_samples, length) by inverting every flow from base noise.

        A prompt (num_samples, T_p) of tokens, T_p a multiple of the patch size and shorter
        than `length`, fixes the first T_p tokens. Its latents are drawn from the encoder,
        z_p ~ q(z_p | prompt). When every flow reads left to right (`prompts_exactly`), each
        flow's input over the prompt's positions is computed from z_p and held fixed while the
        positions after it are solved: an exact draw from the prior given z_p, at the cost of
        one pass. Otherwise a right-to-left flow makes the prompt's positions depend on the
        continuation, and the draw is approximate (see `_sample_by_replacement`).
        """
        P = self.patch_size
        D = self.encoder.dim * P
        dtype = next(self.parameters()).dtype
        u = self.prior.sample((num_samples, length // P, D), temperature, generator, dtype)
        if prompt is None:
            z = self.from_base(u, on_pass=on_pass, on_position=on_position)
            return self.decoder.decode(z)

        prompt_len = prompt.shape[1]
        if prompt_len % P or not 0 < prompt_len < length:
            raise ValueError(
                f"a prompt of {prompt_len} tokens must be shorter than the {length} generated "
                f"and a multiple of the patch size {P}"
            )
        noise = torch.randn(*prompt.shape, self.encoder.dim, generator=generator, dtype=dtype)
        z_prompt, _ = self.encoder.sample(prompt, noise)

        if self.prompts_exactly(length // P):
            known = [h[:, : prompt_len // P] for h in self.flow_inputs(z_prompt)]
            z = self.from_base(u, on_pass=on_pass, on_position=on_position, known=known)
        else:
            z = self._sample_by_replacement(u, z_prompt, prompt_rounds, on_pass, on_position)
        tokens = self.decoder.decode(z)
        tokens[:, :prompt_len] = prompt
        return tokens

    def _sample_by_replacement(self, u, z_prompt, rounds: int, on_pass, on_position):
        """Prompted sampling when some flow reads right to left: exact conditioning would need
        the continuation before the prompt's positions can be solved.

        Fixed-point refinement, like the replacement method of diffusion inpainting: invert
        every flow, overwrite the prompt's latents with z_p, map forward to the base, restore
        the continuation's own noise, and invert again, `rounds` times in all. Each round costs
        a full sampling pass. With only left-to-right flows one round of this is already the
        exact draw; here it is an approximation whose quality is measured by how well the
        continuation scores under the model (benchmarks/prompting.py).
        """
        prompt_len = z_prompt.shape[1]
        prompt_positions = prompt_len // self.patch_size
        warnings.warn(
            "a right-to-left flow makes prompted sampling approximate: refining the draw by "
            f"replacement over {rounds} rounds (all flows left to right would make it exact)",
            TarflowWarning,
            stacklevel=3,
        )
        current = u
        for round_index in range(rounds):
            last = round_index == rounds - 1
            z = self.from_base(current, on_pass=on_pass if last else None, on_position=on_position)
            z = torch.cat([z_prompt, z[:, prompt_len:]], dim=1)
            if not last:
                base, _ = self.to_base(z)
                current = torch.cat([base[:, :prompt_positions], u[:, prompt_positions:]], dim=1)
        return z


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
    if latent_dim < 1:
        raise ConfigError(
            f"build_model.latent_dim must be at least 1, not {latent_dim}",
            hint="the paper uses 5 to 16 channels per token; the gin files use LATENT_DIM = 8",
        )
    depths = _per_flow(layers_per_flow, count, "build_model.layers_per_flow")
    if any(depth < 1 for depth in depths):
        raise ConfigError(
            f"build_model.layers_per_flow must be at least 1 for every flow, not {depths}",
            hint="every flow needs a conditioner with one transformer layer or more",
        )
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
