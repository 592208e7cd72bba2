"""Compiled inverses of the channel-autoregressive mixture couplings, for sampling on the CPU.

Inverting a mixture coupling at one position solves D one-dimensional root problems, channel
after channel, since the mixture of channel i depends on the solved channels before it. In
PyTorch each step of that search is dozens of tiny tensor operations whose dispatch costs more
than their arithmetic, so sampling would run at a tenth of the speed of the AR baseline. Here
the whole position (the coupling's head, the weight updates and every Newton step) is one
compiled loop over the rows, run in float64 whatever the input's dtype. It runs on one thread:
a numba thread pool beside torch's slowed torch's own small operations (the transformer
steps between positions) by more than it gained here.

The PyTorch solver in `tarflow_core.special` stays the reference: the tests hold these kernels
to it, and a coupling falls back to it off the CPU, under autograd, or when asked to.
"""

import math

import numpy as np
import torch

SQRT_HALF = math.sqrt(0.5)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
MAX_STEPS = 200

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this guards broken installs
    numba = None


def available() -> bool:
    return numba is not None


def _jit(function):
    """Compile with numba (cached on disk; IEEE division, so a zero slope gives an infinite
    step that the bracket then refuses) when it is there; the plain function otherwise."""
    if numba is None:  # pragma: no cover
        return function
    return numba.njit(cache=True, nogil=True, error_model="numpy")(function)


@_jit
def _log_ndtr(z):
    """log Phi(z), to full precision from the far lower tail to the far upper one."""
    if z > 0.0:  # log of a number near one: from its distance to one
        return math.log1p(-0.5 * math.erfc(z * SQRT_HALF))
    if z > -35.0:
        return math.log(0.5 * math.erfc(-z * SQRT_HALF))
    # Past where erfc underflows: the asymptotic series of Mills' ratio, whose first omitted
    # term is below 1e-14 here.
    inverse_square = 1.0 / (z * z)
    series = 1.0
    term = 1.0
    for k in range(1, 7):
        term *= -(2 * k - 1) * inverse_square
        series += term
    return -0.5 * z * z - LOG_SQRT_2PI - math.log(-z) + math.log(series)


@_jit
def _residual(x, lower, log_target_cdf, log_target_sf, log_weights, loc, inverse_scale, gaussian):
    """g, increasing in x and zero at the root, and its slope: as `special._residual`."""
    # One pass: a running log-sum-exp of the weighted tails, and beside it the tails' own
    # slopes weighted alike (the slope of log(tail) is the density over the tail).
    peak = -np.inf
    total = 0.0
    weighted_hazard = 0.0
    for k in range(log_weights.shape[0]):
        z = (x - loc[k]) * inverse_scale[k]
        t = z if lower else -z
        if gaussian:
            tail = _log_ndtr(t)
            hazard = math.exp(-0.5 * t * t - LOG_SQRT_2PI - tail) * inverse_scale[k]
        else:
            # log sigmoid(t) and sigmoid(-t), both from e = exp(-|t|).
            e = math.exp(-abs(t))
            if t >= 0.0:
                tail = -math.log1p(e)
                hazard = e / (1.0 + e) * inverse_scale[k]
            else:
                tail = t - math.log1p(e)
                hazard = inverse_scale[k] / (1.0 + e)
        weighted = log_weights[k] + tail
        if weighted == -np.inf:
            continue
        if weighted > peak:
            rescale = math.exp(peak - weighted)
            total = total * rescale + 1.0
            weighted_hazard = weighted_hazard * rescale + hazard
            peak = weighted
        else:
            share = math.exp(weighted - peak)
            total += share
            weighted_hazard += share * hazard
    log_mixture_tail = math.log(total) + peak
    slope = weighted_hazard / total
    if lower:
        return log_mixture_tail - log_target_cdf, slope
    return log_target_sf - log_mixture_tail, slope


# Below this, a mixture's tail is summed in log space: linear sums could lose terms to
# underflow that matter at the sum's own scale.
LINEAR_TAIL_FLOOR = 1e-280


@_jit
def _residual_fast(
    x, lower, log_target_cdf, log_target_sf, weights, log_weights, loc, inverse_scale, gaussian
):
    """`_residual` from sums of the tails themselves (one exp, or one erfc and one exp, per
    component instead of three or four), falling back to log space far out in a tail."""
    tail_sum = 0.0
    density_sum = 0.0
    for k in range(weights.shape[0]):
        z = (x - loc[k]) * inverse_scale[k]
        t = z if lower else -z
        if gaussian:
            tail = 0.5 * math.erfc(-t * SQRT_HALF)
            density = math.exp(-0.5 * t * t - LOG_SQRT_2PI)
        else:
            e = math.exp(-abs(t))
            inverse_one_plus = 1.0 / (1.0 + e)
            tail = inverse_one_plus if t >= 0.0 else e * inverse_one_plus
            density = e * inverse_one_plus * inverse_one_plus
        tail_sum += weights[k] * tail
        density_sum += weights[k] * density * inverse_scale[k]
    if not tail_sum > LINEAR_TAIL_FLOOR:
        return _residual(
            x, lower, log_target_cdf, log_target_sf, log_weights, loc, inverse_scale, gaussian
        )
    log_mixture_tail = math.log(tail_sum)
    slope = density_sum / tail_sum
    if lower:
        return log_mixture_tail - log_target_cdf, slope
    return log_target_sf - log_mixture_tail, slope


@_jit
def _solve(u, log_weights, loc, log_scale, gaussian, eps):
    """x with Phi^-1(F(x)) = u for one 1-D mixture, by safeguarded Newton in its bracket,
    from the quantile of a normal with the mixture's moments."""
    log_target_cdf, log_target_sf = _log_ndtr(u), _log_ndtr(-u)
    lower = u <= 0.0
    target = log_target_cdf if lower else log_target_sf
    g_tolerance = math.sqrt(eps) * (1.0 + abs(target))

    # The root lies between the components' own quantiles at the target level.
    standard_quantile = u if gaussian else log_target_cdf - log_target_sf
    lo, hi = np.inf, -np.inf
    K = log_weights.shape[0]
    inverse_scale = np.empty(K)
    weights = np.empty(K)
    for k in range(K):
        weights[k] = math.exp(log_weights[k])
        scale = math.exp(log_scale[k])
        inverse_scale[k] = 1.0 / scale
        quantile = loc[k] + scale * standard_quantile
        lo = min(lo, quantile)
        hi = max(hi, quantile)
    # Rounding can put the root just outside; the ends are checked only if the search closes
    # in on one it has not evaluated (two evaluations saved on nearly every solve).
    lo_checked = hi_checked = False
    stride = max(hi - lo, 1.0)

    # The normal with the mixture's mean and variance, at the target level: close to the root
    # when the components overlap, and inside the bracket after clamping.
    mean = second = 0.0
    spread = 1.0 if gaussian else math.pi**2 / 3.0
    for k in range(K):
        mean += weights[k] * loc[k]
        second += weights[k] * (loc[k] ** 2 + spread / inverse_scale[k] ** 2)
    start = mean + math.sqrt(max(second - mean**2, 0.0)) * u
    x = min(max(start, lo), hi)
    # What `_residual_fast` needs of this mixture besides the point.
    mixture = (
        lower,
        log_target_cdf,
        log_target_sf,
        weights,
        log_weights,
        loc,
        inverse_scale,
        gaussian,
    )
    older_step = last_step = hi - lo
    for _ in range(MAX_STEPS):
        g, slope = _residual_fast(x, *mixture)
        if g == 0.0:
            return x
        if g > 0.0:
            hi, hi_checked = x, True
        else:
            lo, lo_checked = x, True

        # A Newton step inside the bracket and under half the step before last; otherwise
        # bisect, which breaks the cycles Newton can fall into.
        newton_step = g / slope
        step = x - newton_step
        if lo < step < hi and abs(newton_step) < 0.5 * older_step:
            new_x = step
        else:
            new_x = 0.5 * (lo + hi)
        rounding = 4.0 * eps * (1.0 + abs(x))
        if abs(newton_step) <= rounding and abs(g) <= g_tolerance:
            return x
        if hi - lo <= rounding:
            if lo_checked and hi_checked:
                return new_x
            # Closed on an end never evaluated: move it out (down for a negative stride)
            # until the root is inside.
            lo, hi, lo_checked, hi_checked = _widen(
                lo, hi, stride if lo_checked else -stride, mixture
            )
            new_x = 0.5 * (lo + hi)
        older_step, last_step = last_step, abs(new_x - x)
        x = new_x
    return x


@_jit
def _widen(lo, hi, stride, mixture):
    """Move the unchecked end of [lo, hi] (below for a negative stride, above otherwise) out,
    doubling the stride, until the root lies inside; the ends passed become the other end.
    `mixture` is what `_residual_fast` takes after the point. Returns (lo, hi, lo_checked,
    hi_checked)."""
    for _ in range(64):
        end = lo if stride < 0.0 else hi
        g, _ = _residual_fast(end, *mixture)
        if stride < 0.0:
            if g <= 0.0:
                return lo, hi, True, True
            lo, hi = lo + stride, lo
        else:
            if g >= 0.0:
                return lo, hi, True, True
            lo, hi = hi, hi + stride
        stride *= 2.0
    return lo, hi, True, True


@_jit
def _log_normalise(values, out):
    """out = values - logsumexp(values): log weights from unnormalised ones."""
    peak = -np.inf
    for k in range(values.shape[0]):
        peak = max(peak, values[k])
    total = 0.0
    for k in range(values.shape[0]):
        total += math.exp(values[k] - peak)
    log_total = math.log(total) + peak
    for k in range(values.shape[0]):
        out[k] = values[k] - log_total


@_jit
def _gelu(x):
    return 0.5 * x * (1.0 + math.erf(x * SQRT_HALF))


@_jit
def _invert_masked_mixture(
    u,
    hidden_context,
    out_context,
    w_in,
    w_out,
    units,
    units_up_to,
    num_components,
    gaussian,
    max_log_scale,
    eps,
):
    """Rows of u (N, D) through the inverse of a mixture coupling with a masked (MADE) head:
    hidden = hidden_context + h @ w_in, params = gelu(hidden) @ w_out + out_context, and channel
    i's logits, locations and log scales are params[i * 3K : (i + 1) * 3K] in that order.
    `units` lists the hidden units by degree (unit j reads channels < its degree; w_in is zero
    elsewhere) and `units_up_to[i]` counts those of degree <= i, which channel i's parameters
    read (w_out is zero elsewhere)."""
    N, D = u.shape
    H = w_in.shape[1]
    K = num_components
    h = np.empty((N, D))
    for n in range(N):
        hidden = hidden_context[n].copy()
        activation = np.empty(H)
        params = np.empty(3 * K)
        log_weights = np.empty(K)
        log_scale = np.empty(K)
        for i in range(D):
            # Units sorted by degree: those of degree < i are final, those of degree i become
            # final once channel i - 1 (the last they read) is taken in, and channel i reads
            # all of degree <= i.
            done = units_up_to[i - 1] if i > 0 else 0
            if i > 0:
                for index in range(done, H):
                    j = units[index]
                    hidden[j] += h[n, i - 1] * w_in[i - 1, j]
            for index in range(done, units_up_to[i]):
                j = units[index]
                activation[j] = _gelu(hidden[j])
            first = i * 3 * K
            for p in range(3 * K):
                params[p] = out_context[n, first + p]
            for index in range(units_up_to[i]):
                j = units[index]
                a = activation[j]
                for p in range(3 * K):
                    params[p] += a * w_out[j, first + p]

            _log_normalise(params[:K], log_weights)
            for k in range(K):
                log_scale[k] = max_log_scale * math.tanh(params[2 * K + k] / max_log_scale)

            h[n, i] = _solve(
                u[n, i],
                log_weights,
                params[K : 2 * K],
                log_scale,
                gaussian,
                eps,
            )
    return h


@_jit
def _invert_isotropic_mixture(u, log_pi, mean, log_scale, eps):
    """Rows of u (N, D) through the Rosenblatt inverse of sum_k pi_k N(mean_k, s_k^2 I): the
    weights of channel i are pi updated by the densities of the solved channels < i."""
    N, D = u.shape
    K = mean.shape[0]
    inverse_scale = np.empty(K)
    for k in range(K):
        inverse_scale[k] = math.exp(-log_scale[k])
    h = np.empty((N, D))
    for n in range(N):
        log_posterior = log_pi[n].copy()
        log_weights = np.empty(K)
        loc = np.empty(K)
        for i in range(D):
            _log_normalise(log_posterior, log_weights)
            for k in range(K):
                loc[k] = mean[k, i]

            x = _solve(
                u[n, i],
                log_weights,
                loc,
                log_scale,
                True,
                eps,
            )
            h[n, i] = x
            for k in range(K):
                standard = (x - mean[k, i]) * inverse_scale[k]
                log_posterior[k] += -0.5 * standard * standard - log_scale[k] - LOG_SQRT_2PI
    return h


def _as_rows(tensor: torch.Tensor, width: int) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().reshape(-1, width).to(torch.float64).numpy())


def _matrix(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to(torch.float64).numpy())


def masked_head_weights(w_in, w_out, degree) -> tuple:
    """What `invert_masked_mixture` needs of a masked head, made once for many calls: the
    masked weights w_in (D, H) and w_out (H, D * 3K) in float64, and each hidden unit's
    degree (it reads channels < degree; channel i reads units of degree <= i)."""
    degree = degree.numpy().astype(np.int64)
    units = np.ascontiguousarray(np.argsort(degree, kind="stable"))
    units_up_to = np.searchsorted(degree[units], np.arange(w_in.shape[0]), side="right")
    return _matrix(w_in), _matrix(w_out), units, np.ascontiguousarray(units_up_to, np.int64)


def invert_masked_mixture(
    u,
    hidden_context,
    out_context,
    head_weights: tuple,
    num_components: int,
    gaussian: bool,
    max_log_scale: float,
) -> torch.Tensor:
    """The mixture coupling's inverse for u (..., D), given the head's context terms (..., H)
    and (..., D * 3K) and its `masked_head_weights`."""
    D = u.shape[-1]
    h = _invert_masked_mixture(
        _as_rows(u, D),
        _as_rows(hidden_context, hidden_context.shape[-1]),
        _as_rows(out_context, out_context.shape[-1]),
        *head_weights,
        num_components,
        gaussian,
        float(max_log_scale),
        float(torch.finfo(u.dtype).eps),
    )
    return torch.from_numpy(h).to(u.dtype).reshape(u.shape)


def invert_isotropic_mixture(u, log_pi, mean, log_scale) -> torch.Tensor:
    """The discrete-equivalent coupling's inverse for u (..., D); log_pi (..., K)."""
    D = u.shape[-1]
    h = _invert_isotropic_mixture(
        _as_rows(u, D),
        _as_rows(log_pi, log_pi.shape[-1]),
        _matrix(mean),
        _matrix(log_scale),
        float(torch.finfo(u.dtype).eps),
    )
    return torch.from_numpy(h).to(u.dtype).reshape(u.shape)


def usable_for(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can stand in for the PyTorch solver on these inputs: on the CPU, in
    float32 or float64, and with no gradient to carry."""
    if not available():
        return False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not needs_grad and all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors
    )
