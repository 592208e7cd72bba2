"""The discrete autoregressive transformer: the baseline every figure is measured against.

It uses the same causal transformer as the flows' conditioners, with a token embedding in front
(shifted right by one behind a learned start vector) and a softmax head, and it lives in the
same harness: same data, optimiser, schedule, evaluation and tracking. Its bound is exact:
log p(x) itself.
"""

import logging
from dataclasses import dataclass

import torch
from torch import nn

from tarflow_core.interfaces import LanguageModel
from tarflow_core.transformer import CausalTransformer

logger = logging.getLogger(__name__)


@dataclass
class ExactLikelihood:
    """log p(x) summed per sequence, (B,), in the shape of a bound."""

    log_p: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        return self.log_p

    def parts(self, T: int) -> dict[str, float]:
        return {}


class AutoregressiveLM(LanguageModel):
    """Token embedding, causal transformer, softmax head, cross-entropy."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        width: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        self.body = CausalTransformer(width, num_layers, num_heads, seq_len, mlp_ratio, dropout)
        self.head = nn.Linear(width, vocab_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position, (B, T, V); position t sees x_<t."""
        inputs = self.embed(x[:, :-1])
        start = self.start.to(inputs.dtype).expand(x.shape[0], 1, -1)
        return self.head(self.body(torch.cat([start, inputs], dim=1)))

    def noise_like(self, x: torch.Tensor, generator=None):
        return None

    def elbo(self, x: torch.Tensor, noise=None) -> ExactLikelihood:
        log_p = torch.log_softmax(self.logits(x), dim=-1).gather(-1, x.unsqueeze(-1))
        return ExactLikelihood(log_p.squeeze(-1).sum(-1))

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
        """Tokens (num_samples, length), one position at a time, with a key-value cache so each
        step runs the transformer over one new position. A prompt (num_samples, T_p) is read
        in one pass and its tokens are kept; `prompt_rounds` is unused (conditioning is exact).
        """
        cache = self.body.new_cache(num_samples, self.start.dtype)
        inputs = self.start.expand(num_samples, 1, -1)
        tokens = []
        if prompt is not None and prompt.shape[1] > 0:
            if prompt.shape[1] >= length:
                raise ValueError(f"a prompt of {prompt.shape[1]} tokens leaves none to generate")
            inputs = torch.cat([inputs, self.embed(prompt)], dim=1)
            tokens.append(prompt)

        for _ in range(length - sum(part.shape[1] for part in tokens)):
            logits = self.head(self.body(inputs, cache)[:, -1]) / max(temperature, 1e-6)
            next_token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            tokens.append(next_token)
            inputs = self.embed(next_token)
            if on_position is not None:
                on_position()
        return torch.cat(tokens, dim=1)


def build_ar_model(
    vocab_size: int,
    seq_len: int,
    registry=None,
    width: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
) -> AutoregressiveLM:
    """The AR baseline; `registry` is accepted so every model builder has one call shape."""
    model = AutoregressiveLM(vocab_size, seq_len, width, num_layers, num_heads, mlp_ratio, dropout)
    logger.info(
        "AutoregressiveLM: %d layers, width %d, %.2fM parameters",
        num_layers,
        width,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model
