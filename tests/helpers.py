"""Small builders shared by the tests."""

import torch

# Tolerances per dtype for round trips and log-determinants. Inverses found by root finding
# come back to about 1e-13 in float64 over random draws at the contract tests' weight scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Replace every parameter with seeded noise, so zero-initialised heads do something.

    Log-scale-like parameters stay moderate at this scale: the maps stay well conditioned and
    round trips can be held to tight tolerances.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.copy_(noise * scale)
    return module


def per_sequence_logdet(fn, h: torch.Tensor) -> torch.Tensor:
    """log |det J| of fn: (1, T, D) -> (1, T, D), for each sequence of h, from autograd."""
    logdets = []
    for b in range(h.shape[0]):
        flat = h[b].reshape(-1)
        shape = (1, *h.shape[1:])

        def flat_fn(v, shape=shape):
            return fn(v.reshape(shape)).reshape(-1)

        jacobian = torch.autograd.functional.jacobian(flat_fn, flat)
        logdets.append(torch.linalg.slogdet(jacobian)[1])
    return torch.stack(logdets)
