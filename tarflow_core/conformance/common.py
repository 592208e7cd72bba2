"""What the conformance tests share: the registry selection, builders and tolerances."""

import torch

# Tolerances per dtype for round trips. Inverses found by root finding come back to about
# 1e-13 in float64 over random draws at the kit's weight scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}

# Log-determinants are compared with the autograd Jacobian's slogdet, itself a factorisation
# whose error grows with the Jacobian's size.
LADJ_TOLERANCE = 1e-6

# What the `--tarflow-conformance` option takes to mean "every registered component".
EVERYTHING = "all"


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


def targets(registry, plugins: list[str] | None) -> dict[str, list[str]]:
    """The component names under test, by kind: those the named plugins registered, or all.

    Args:
        registry: a loaded `tarflow_core.registry.Registry`.
        plugins: entry point names of plugins, None or ["all"] for the whole registry.
    """
    from tarflow_core.errors import PluginError
    from tarflow_core.registry import KINDS

    everything = not plugins or EVERYTHING in plugins
    if not everything:
        known = {component.plugin for component in registry.components()}
        unknown = sorted(set(plugins) - known)
        if unknown:
            raise PluginError(
                f"no installed plugin named {', '.join(map(repr, unknown))} registers components",
                hint=f"plugins with components: {', '.join(sorted(known))}",
            )
    return {
        kind: [c.name for c in registry.components(kind) if everything or c.plugin in set(plugins)]
        for kind in KINDS
    }


def combinations(target: dict[str, list[str]], everything: dict[str, list[str]], kinds):
    """Tuples of names, one per kind, in which at least one name is under test.

    A plugin's coupling is tested with every installed direction and conditioner, and a
    plugin's direction with every installed coupling, but pairs of two components the plugin
    did not add are left to their own authors.
    """
    tuples = [()]
    for kind in kinds:
        tuples = [(*t, name) for t in tuples for name in everything[kind]]
    return [t for t in tuples if any(n in target[k] for n, k in zip(t, kinds, strict=True))]
