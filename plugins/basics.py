"""The standard normal prior and the two directions a flow can visit positions in."""

import torch

from tarflow_core.hookspecs import hookimpl
from tarflow_core.interfaces import Direction, Prior
from tarflow_core.special import log_normal_pdf


class StandardNormalPrior(Prior):
    """N(0, I) over every channel of every position."""

    def log_prob(self, u):
        return log_normal_pdf(u).flatten(1).sum(-1)

    def sample(self, shape, temperature=1.0, generator=None, dtype=None):
        return temperature * torch.randn(*shape, generator=generator, dtype=dtype)


class LeftToRightDirection(Direction):
    """Visit positions in reading order."""

    def forward(self, h):
        return h, h.new_zeros(h.shape[0])

    def inverse(self, u):
        return u


class RightToLeftDirection(Direction):
    """Visit positions from the last to the first."""

    def forward(self, h):
        return h.flip(1), h.new_zeros(h.shape[0])

    def inverse(self, u):
        return u.flip(1)


@hookimpl
def tarflow_register_components(registry):
    registry.add("prior", "standard_normal", StandardNormalPrior)
    registry.add("direction", "left_to_right", LeftToRightDirection)
    registry.add("direction", "right_to_left", RightToLeftDirection)
