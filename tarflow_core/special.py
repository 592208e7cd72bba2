"""Log-space special functions shared by the CDF-based couplings.

The output of one flow is the input of the next, so the normal quantile is taken from whichever
of log F and log(1 - F) keeps its precision: near F = 1 the value 1 - F is lost in F itself.
"""

import math
import warnings

import torch

from tarflow_core.errors import TarflowWarning

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_normal_pdf(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, 1), elementwise."""
    return -0.5 * x * x - LOG_SQRT_2PI


def ndtri_log(log_p: torch.Tensor, newton_steps: int = 3) -> torch.Tensor:
    """Phi^-1(exp(log_p)) for log_p <= log(1/2), accurate far into the lower tail.

    A direct `ndtri(exp(log_p))` underflows once exp(log_p) does (log_p < -87 in float32). The
    start is that value where it is safe and the asymptotic tail expansion elsewhere; a few
    Newton steps on log Phi(u) = log_p, done in log space, then polish both.
    """
    log_p = log_p.clamp(max=math.log(0.5))
    tiny = math.log(torch.finfo(log_p.dtype).tiny) + 10.0
    safe = log_p > tiny

    direct = torch.special.ndtri(torch.exp(torch.where(safe, log_p, torch.zeros_like(log_p))))

    # Tail: -2 log p ~ u^2 + log(u^2) + log(2 pi), solved to first order.
    t = -2.0 * torch.where(safe, torch.full_like(log_p, -1.0), log_p)
    asymptotic = -torch.sqrt(t - torch.log(t) - math.log(2 * math.pi))

    u = torch.where(safe, direct, asymptotic)
    for _ in range(newton_steps):
        log_cdf = torch.special.log_ndtr(u)
        slope = torch.exp(log_normal_pdf(u) - log_cdf)  # d log Phi(u) / du
        u = u - (log_cdf - log_p) / slope
    return u


def normal_icdf_from_logs(log_cdf: torch.Tensor, log_sf: torch.Tensor) -> torch.Tensor:
    """Phi^-1(F) given log F and log(1 - F), each used on the side where it is accurate."""
    lower = log_cdf <= math.log(0.5)
    from_lower = ndtri_log(torch.where(lower, log_cdf, torch.full_like(log_cdf, -1.0)))
    from_upper = -ndtri_log(torch.where(lower, torch.full_like(log_sf, -1.0), log_sf))
    return torch.where(lower, from_lower, from_upper)


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """A smooth clamp to (-bound, bound) that is the identity near zero."""
    return bound * torch.tanh(x / bound)


def _component_logs(x, loc, log_scale, family: str):
    """log F_k(x), log(1 - F_k(x)) and log p_k(x) of each 1-D component, (..., K)."""
    z = (x.unsqueeze(-1) - loc) * torch.exp(-log_scale)
    if family == "logistic":
        log_cdf = torch.nn.functional.logsigmoid(z)
        log_sf = torch.nn.functional.logsigmoid(-z)
        log_pdf = log_cdf + log_sf - log_scale
    elif family == "gaussian":
        log_cdf = torch.special.log_ndtr(z)
        log_sf = torch.special.log_ndtr(-z)
        log_pdf = log_normal_pdf(z) - log_scale
    else:
        raise ValueError(f"unknown mixture family {family!r}; use 'logistic' or 'gaussian'")
    return log_cdf, log_sf, log_pdf


def mixture_logs(x, log_weights, loc, log_scale, family: str):
    """log F(x), log(1 - F(x)) and log p(x) of a 1-D mixture.

    Args:
        x: points, (...).
        log_weights: normalised log mixture weights, (..., K).
        loc, log_scale: component locations and log scales, (..., K).
        family: "logistic" or "gaussian".
    """
    log_cdf, log_sf, log_pdf = _component_logs(x, loc, log_scale, family)
    return (
        torch.logsumexp(log_weights + log_cdf, -1),
        torch.logsumexp(log_weights + log_sf, -1),
        torch.logsumexp(log_weights + log_pdf, -1),
    )


def mixture_to_normal(x, log_weights, loc, log_scale, family: str):
    """u = Phi^-1(F(x)) and its log derivative log p(x) - log N(u; 0, 1), elementwise."""
    log_cdf, log_sf, log_pdf = mixture_logs(x, log_weights, loc, log_scale, family)
    u = normal_icdf_from_logs(log_cdf, log_sf)
    return u, log_pdf - log_normal_pdf(u)


def _bracket(u, loc, log_scale, family: str, log_target_cdf, log_target_sf):
    """The smallest and largest of the components' own quantiles at level Phi(u): F is a
    weighted mean of the component CDFs, so its quantile lies between them."""
    if family == "logistic":
        standard_quantile = (log_target_cdf - log_target_sf).unsqueeze(-1)
    else:
        standard_quantile = u.unsqueeze(-1)
    quantiles = loc + torch.exp(log_scale) * standard_quantile
    return quantiles.min(-1).values, quantiles.max(-1).values


def normal_to_mixture(u, log_weights, loc, log_scale, family: str, max_iter: int = 200):
    """The inverse of `mixture_to_normal`: x with Phi^-1(F(x)) = u, by safeguarded Newton.

    F is strictly increasing, and its root lies between the smallest and the largest of the
    components' own quantiles at the target level, which gives an exact bracket for any u.
    Newton steps are taken on log F (lower half) or on -log(1 - F) (upper half), where the
    function stays well scaled far into the tails; a step that leaves the bracket, or one that
    follows a step which failed to halve it, is replaced by bisection.
    """
    lower = u <= 0
    log_target_cdf = torch.special.log_ndtr(u)
    log_target_sf = torch.special.log_ndtr(-u)

    def gap(x):
        """g, increasing in x and zero at the root on either half, and its slope."""
        log_cdf, log_sf, log_pdf = mixture_logs(x, log_weights, loc, log_scale, family)
        g = torch.where(lower, log_cdf - log_target_cdf, log_target_sf - log_sf)
        return g, torch.exp(log_pdf - torch.where(lower, log_cdf, log_sf))

    # Rounding can leave the root just outside the quantile bracket; widen it until it holds.
    lo, hi = _bracket(u, loc, log_scale, family, log_target_cdf, log_target_sf)
    lo, hi = _widen_bracket(gap, lo, hi)
    eps = torch.finfo(u.dtype).eps
    # A tiny Newton step means convergence only where g is near zero too: far out in a tail
    # the slope can be lost to cancellation, and a wrong slope also gives a tiny step.
    g_tolerance = math.sqrt(eps) * (1 + torch.where(lower, log_target_cdf, log_target_sf).abs())
    x = 0.5 * (lo + hi)
    last_width = hi - lo
    converged = torch.zeros_like(u, dtype=torch.bool)
    for _ in range(max_iter):
        g, slope = gap(x)
        hi = torch.where(g > 0, x, hi)
        lo = torch.where(g > 0, lo, x)

        # Newton can cycle inside the bracket without shrinking it; a step that did not
        # halve the bracket is followed by bisection, so the width at least halves every two.
        width = hi - lo
        stalled = width > 0.5 * last_width
        last_width = width
        step = x - g / slope
        newton = (step > lo) & (step < hi) & torch.isfinite(step) & ~stalled
        new_x = torch.where(newton, step, 0.5 * (lo + hi))

        # An exact root, or a value that already converged, stays where it is.
        settled = converged | (g == 0)
        new_x = torch.where(settled, x, new_x)
        tiny = 4 * eps * (1 + x.abs())
        converged = (
            settled
            | ((hi - lo) <= tiny)
            | (((new_x - x).abs() <= tiny) & (g.abs() <= g_tolerance))
        )
        x = new_x
        if bool(converged.all()):
            break
    if not bool(converged.all()):
        warnings.warn(
            f"mixture CDF inverse stopped after {max_iter} steps with "
            f"{int((~converged).sum())} of {converged.numel()} values unconverged",
            TarflowWarning,
            stacklevel=2,
        )
    return x


def _widen_bracket(gap, lo, hi, max_doublings: int = 64):
    """Move the ends of [lo, hi] outwards, doubling the stride, until g(lo) <= 0 <= g(hi).

    An end found on the wrong side of the root becomes the other end, so the bracket stays as
    tight as what is known allows.
    """
    stride = torch.clamp((hi - lo).abs(), min=1.0)
    for _ in range(max_doublings):
        g_lo, g_hi = gap(lo)[0], gap(hi)[0]
        root_below, root_above = g_lo > 0, g_hi < 0
        if not bool((root_below | root_above).any()):
            break
        lo, hi = (
            torch.where(root_below, lo - stride, torch.where(root_above, hi, lo)),
            torch.where(root_above, hi + stride, torch.where(root_below, lo, hi)),
        )
        stride = torch.where(root_below | root_above, 2 * stride, stride)
    return lo, hi
