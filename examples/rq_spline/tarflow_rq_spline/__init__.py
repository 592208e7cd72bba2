"""A rational-quadratic spline coupling as a third party ships it: own package, own entry point.

Reference: Durkan, Bekasov, Murray and Papamakarios 2019, "Neural Spline Flows" (NeurIPS),
section 3.1. Each channel of a position goes through a monotone spline on [-BOUND, BOUND] made of
K rational-quadratic pieces; outside the interval the map is the identity. The conditioner's
features give every piece's width, height and knot derivative. Forward is the rational
quadratic itself; the inverse is exact, the root of a quadratic in closed form.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from tarflow_core import Coupling, hookimpl

# Smallest width, height and slope a piece may take, so the spline stays strictly increasing
# and its inverse well conditioned.
MIN_BIN = 1e-3
MIN_DERIVATIVE = 1e-3


class RationalQuadraticSplineCoupling(Coupling):
    """u_t = g(h_t | ctx_t), channel by channel, with g a monotone rational-quadratic spline.

    The spline starts as the identity: equal pieces and unit slopes at every knot (the head
    starts at zero, and the derivative's offset maps zero to exactly one).
    """

    def __init__(self, dim: int, context_dim: int, num_bins: int = 8, bound: float = 3.0):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        self.num_bins, self.bound = num_bins, bound
        # K widths, K heights and K - 1 inner knot slopes per channel; the slopes at the two
        # ends are 1 so the spline joins the identity tails smoothly.
        self.head = nn.Linear(context_dim, dim * (3 * num_bins - 1))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.slope_offset = math.log(math.expm1(1 - MIN_DERIVATIVE))

    def _knots(self, ctx):
        """Knot positions x (..., D, K+1), y (..., D, K+1) and slopes (..., D, K+1)."""
        K = self.num_bins
        raw = self.head(ctx).unflatten(-1, (self.dim, 3 * K - 1))
        raw_w, raw_h, raw_d = raw[..., :K], raw[..., K : 2 * K], raw[..., 2 * K :]

        def positions(raw_sizes):
            sizes = MIN_BIN + (1 - MIN_BIN * K) * torch.softmax(raw_sizes, dim=-1)
            edges = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
            edges = 2 * self.bound * edges - self.bound
            # Pin both ends exactly, whatever the rounding of the cumulative sum.
            end = torch.full_like(edges[..., :1], self.bound)
            return torch.cat([-end, edges[..., 1:-1], end], dim=-1)

        inner = MIN_DERIVATIVE + F.softplus(raw_d + self.slope_offset)
        ones = torch.ones_like(inner[..., :1])
        return positions(raw_w), positions(raw_h), torch.cat([ones, inner, ones], dim=-1)

    def _piece(self, knots_in, knots_x, knots_y, slopes, value):
        """The piece each value falls in, and that piece's parameters, gathered."""
        index = torch.searchsorted(knots_in, value.unsqueeze(-1).contiguous(), right=True) - 1
        index = index.clamp(0, self.num_bins - 1)

        def take(t, shift=0):
            return t.gather(-1, index + shift).squeeze(-1)

        x0, x1 = take(knots_x), take(knots_x, 1)
        y0, y1 = take(knots_y), take(knots_y, 1)
        return x0, x1 - x0, y0, y1 - y0, take(slopes), take(slopes, 1)

    def forward(self, h, ctx):
        knots_x, knots_y, slopes = self._knots(ctx)
        inside = (h > -self.bound) & (h < self.bound)
        h_in = h.clamp(-self.bound, self.bound)
        x0, width, y0, height, d0, d1 = self._piece(knots_x, knots_x, knots_y, slopes, h_in)

        # Within a piece: xi in [0, 1], s the piece's mean slope (Durkan et al., eq. 4).
        xi = (h_in - x0) / width
        s = height / width
        edge = xi * (1 - xi)
        denominator = s + (d1 + d0 - 2 * s) * edge
        u_in = y0 + height * (s * xi.pow(2) + d0 * edge) / denominator

        # dg/dh (their eq. 5), logged; the identity tails contribute zero.
        numerator = s.pow(2) * (d1 * xi.pow(2) + 2 * s * edge + d0 * (1 - xi).pow(2))
        log_slope = torch.log(numerator) - 2 * torch.log(denominator)
        u = torch.where(inside, u_in, h)
        ladj = torch.where(inside, log_slope, torch.zeros_like(log_slope))
        return u, ladj.flatten(1).sum(-1)

    def inverse(self, u, ctx):
        knots_x, knots_y, slopes = self._knots(ctx)
        inside = (u > -self.bound) & (u < self.bound)
        u_in = u.clamp(-self.bound, self.bound)
        x0, width, y0, height, d0, d1 = self._piece(knots_y, knots_x, knots_y, slopes, u_in)

        # Solve a xi^2 + b xi + c = 0 for the piece's xi (their eq. 6-8). Of the two roots the
        # one in [0, 1] is 2c / (-b - sqrt(b^2 - 4ac)), written so that nothing cancels.
        s = height / width
        rise = u_in - y0
        bend = d1 + d0 - 2 * s
        a = height * (s - d0) + rise * bend
        b = height * d0 - rise * bend
        c = -s * rise
        discriminant = (b.pow(2) - 4 * a * c).clamp_min(0)
        xi = (2 * c) / (-b - torch.sqrt(discriminant))
        h_in = x0 + xi.clamp(0, 1) * width
        return torch.where(inside, h_in, u)


@hookimpl
def tarflow_register_components(registry):
    registry.add("coupling", "rq_spline", RationalQuadraticSplineCoupling)
