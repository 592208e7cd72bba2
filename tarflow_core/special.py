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


def _targets(u):
    """Which half each u is on, and log Phi(u), log(1 - Phi(u)): what F(x) must match."""
    return u <= 0, torch.special.log_ndtr(u), torch.special.log_ndtr(-u)


def _bracket(u, loc, log_scale, family: str, log_target_cdf, log_target_sf):
    """The smallest and largest of the components' own quantiles at level Phi(u): F is a
    weighted mean of the component CDFs, so its quantile lies between them."""
    if family == "logistic":
        standard_quantile = (log_target_cdf - log_target_sf).unsqueeze(-1)
    else:
        standard_quantile = u.unsqueeze(-1)
    quantiles = loc + torch.exp(log_scale) * standard_quantile
    return quantiles.amin(-1), quantiles.amax(-1)


def _residual(x, targets, log_weights, loc, log_scale, family: str):
    """g, increasing in x and zero at the root, and its slope. On the lower half g is
    log F - log Phi(u), on the upper half log(1 - Phi(u)) - log(1 - F): each stays well
    scaled far into its own tail."""
    lower, log_target_cdf, log_target_sf = targets

    # Only the tail on each value's own side is needed: one log-CDF per component, of z on the
    # lower half and of -z on the upper (both families are symmetric).
    inverse_scale = torch.exp(-log_scale)
    z = (x.unsqueeze(-1) - loc) * inverse_scale
    toward_tail = torch.where(lower.unsqueeze(-1), z, -z)
    if family == "logistic":
        log_tail = torch.nn.functional.logsigmoid(toward_tail)
        # A logistic's density over its tail is sigmoid(-t) / s.
        hazard = torch.sigmoid(-toward_tail)
    elif family == "gaussian":
        log_tail = torch.special.log_ndtr(toward_tail)
        hazard = torch.exp(log_normal_pdf(toward_tail) - log_tail)
    else:
        raise ValueError(f"unknown mixture family {family!r}; use 'logistic' or 'gaussian'")

    # The slope of log(tail) is the density over the tail: the components' own ratios averaged
    # with their shares of the tail, so one logsumexp gives both g and its slope.
    weighted = log_weights + log_tail
    peak = weighted.amax(-1, keepdim=True)
    share = torch.exp(weighted - peak)
    total = share.sum(-1)
    log_mixture_tail = torch.log(total) + peak.squeeze(-1)
    slope = (share * hazard * inverse_scale).sum(-1) / total

    g = torch.where(lower, log_mixture_tail - log_target_cdf, log_target_sf - log_mixture_tail)
    return g, slope


def normal_to_mixture(u, log_weights, loc, log_scale, family: str, max_iter: int = 200):
    """The inverse of `mixture_to_normal`: x with Phi^-1(F(x)) = u, elementwise."""
    fixed = (log_weights, loc, log_scale)
    return solve_normal_to_mixture(u, lambda x: fixed, family, max_iter=max_iter)


def solve_normal_to_mixture(
    u, mixture_of, family: str, channels_depend: bool = False, start=None, max_iter: int = 200
):
    """x with Phi^-1(F(x)) = u for every element, by safeguarded Newton.

    F is strictly increasing, and its root lies between the smallest and the largest of the
    components' own quantiles at the target level, which gives an exact bracket for any u.
    Newton steps are taken on log F (lower half) or on -log(1 - F) (upper half), where the
    function stays well scaled far into the tails; a step that leaves the bracket, or one that
    is not under half the step before last, is replaced by bisection.

    Args:
        u: targets, (..., D).
        mixture_of: x -> (log_weights, loc, log_scale), each (..., D, K), the mixture of every
            element given the current x.
        channels_depend: the mixture of channel i (last axis) depends on channels < i. All
            channels are then solved together, the mixtures recomputed from the current x at
            every step; a channel whose predecessors moved gets a fresh bracket. Channel i
            settles about one step after channel i - 1: some D + 5 steps in all, against
            some 5 D for one channel at a time.
        start: a first guess (clamped into the bracket); the bracket's middle by default.
    """
    # TODO: a step is some 70 small tensor operations, and a position takes about D + 5 steps;
    # at sampling batch sizes they cost their dispatch more than their arithmetic. On the CPU
    # the couplings sample through `tarflow_core.kernels` instead; off the CPU this solver is
    # what runs, and a fused kernel for the device would be the fix there too.
    targets = _targets(u)
    lower = targets[0]
    eps = torch.finfo(u.dtype).eps
    # A Newton step below rounding ends the search only where g is near zero too: far out in
    # a tail the slope can be lost to cancellation, and a wrong slope also gives a tiny step.
    g_tolerance = math.sqrt(eps) * (1 + torch.where(*targets).abs())
    params = mixture_of(u if start is None else start)
    lo, hi = _bracket(u, params[1], params[2], family, targets[1], targets[2])
    lo, hi = _widen_bracket(lambda x: _residual(x, targets, *params, family)[0], lo, hi)
    x = 0.5 * (lo + hi) if start is None else torch.minimum(torch.maximum(start, lo), hi)
    # Sizes of the last two steps; the bracket's width stands in before there are any.
    last_step = older_step = hi - lo
    converged = torch.zeros_like(lower)
    # Before the first step every value counts as moved, so that mixtures that depend on
    # other channels are computed from x itself, with brackets to match.
    moved = torch.ones_like(lower)
    stale = torch.zeros_like(lower)
    for _ in range(max_iter):
        if channels_depend:
            params = mixture_of(x)
            # Channels after one that moved have a new mixture: their bracket starts over.
            stale = torch.zeros_like(moved)
            stale[..., 1:] = moved[..., :-1].cumsum(-1) > 0
            if bool(stale.any()):
                # Not widened, unlike the first bracket: that costs two more evaluations of
                # the mixture per step, and the root leaves the quantile bracket only by
                # rounding, which then ends the search within rounding of it anyway.
                fresh_lo, fresh_hi = _bracket(u, params[1], params[2], family, *targets[1:])
                lo, hi = torch.where(stale, fresh_lo, lo), torch.where(stale, fresh_hi, hi)
                fresh_width = fresh_hi - fresh_lo
                older_step = torch.where(stale, fresh_width, older_step)
                last_step = torch.where(stale, fresh_width, last_step)
                converged &= ~stale

        g, slope = _residual(x, targets, *params, family)
        above = g > 0
        hi = torch.where(above, x, hi)
        lo = torch.where(above, lo, x)

        # Newton can cycle inside the bracket. A Newton step is taken only if it stays in the
        # bracket (which also rules out an infinite or NaN step) and is under half the step
        # before last; otherwise bisect. Steps near a root shrink quadratically and pass; a
        # cycle does not, and bisection breaks it. A channel whose mixture is still moving
        # follows it by plain Newton steps: its steps need not shrink yet, and a bisection
        # would throw away how close it already is.
        newton_step = g / slope
        step = x - newton_step
        newton_size = newton_step.abs()
        newton = (step > lo) & (step < hi) & ((newton_size < 0.5 * older_step) | stale)
        new_x = torch.where(newton, step, 0.5 * (lo + hi))
        older_step, last_step = last_step, (new_x - x).abs()

        # An exact root, a value that already converged, or one whose Newton step is below
        # rounding (it sits on the bracket's end, and bisecting would throw it away) stays.
        rounding = 4 * eps * (1 + x.abs())
        g_small = g.abs() <= g_tolerance
        settled = converged | (g == 0) | ((newton_size <= rounding) & g_small)
        new_x = torch.where(settled, x, new_x)
        moved = (new_x - x).abs() > rounding
        # A step below rounding is convergence where g is near zero or the bracket has
        # closed; elsewhere it is a step with a wrong slope, and the search goes on.
        converged = settled | (~moved & (g_small | (hi - lo <= rounding)))
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
    """Move the ends of [lo, hi] outwards, doubling the stride, until gap(lo) <= 0 <= gap(hi).

    The quantile bracket is exact in real numbers; in floats rounding can leave the root just
    outside it. An end found on the wrong side of the root becomes the other end, so the
    bracket stays as tight as what is known allows.
    """
    stride = torch.clamp((hi - lo).abs(), min=1.0)
    for _ in range(max_doublings):
        root_below, root_above = gap(lo) > 0, gap(hi) < 0
        if not bool((root_below | root_above).any()):
            break
        lo, hi = (
            torch.where(root_below, lo - stride, torch.where(root_above, hi, lo)),
            torch.where(root_above, hi + stride, torch.where(root_below, lo, hi)),
        )
        stride = torch.where(root_below | root_above, 2 * stride, stride)
    return lo, hi
