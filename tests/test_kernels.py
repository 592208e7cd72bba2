"""The compiled inverses held to the PyTorch solver they stand in for during sampling.

Any registered coupling with a `compiled_inverse` switch is compared both ways; the round trip,
tails and extreme weights of the kernels themselves are covered by the conformance kit, whose
inverses take the compiled path on the CPU.
"""

import pytest
import torch
from helpers import randomise
from hypothesis import given
from hypothesis import strategies as st

from tarflow_core import kernels
from tarflow_core.conformance.kit import CONTEXT, loaded_registry, make_coupling

COMPILED = [
    name
    for name in loaded_registry().names("coupling")
    if hasattr(make_coupling(name, 2), "compiled_inverse")
]


def test_the_builtin_mixture_couplings_have_kernels():
    assert {"mixture", "mixture_gaussian", "discrete", "discrete_tied"} <= set(COMPILED)
    assert kernels.available()


def solve_both_ways(module, u, ctx):
    with torch.no_grad():
        module.compiled_inverse = True
        compiled = module.inverse(u, ctx)
        module.compiled_inverse = False
        reference = module.inverse(u, ctx)
    return compiled, reference


@pytest.mark.parametrize("coupling", COMPILED)
@given(
    positions=st.integers(1, 3),
    channels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    u_scale=st.sampled_from([1.0, 3.0, 8.0]),
)
def test_compiled_inverse_agrees_with_the_reference(coupling, positions, channels, seed, u_scale):
    module = randomise(make_coupling(coupling, channels), seed, scale=0.2)
    generator = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(3, positions, channels, generator=generator, dtype=torch.float64) * u_scale
    ctx = torch.randn(3, positions, CONTEXT, generator=generator, dtype=torch.float64)

    compiled, reference = solve_both_ways(module, u, ctx)

    torch.testing.assert_close(compiled, reference, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("coupling", COMPILED)
def test_compiled_inverse_keeps_float32_and_its_precision(coupling):
    module = randomise(make_coupling(coupling, 4), seed=5, scale=0.2).float()
    for encoder in getattr(module, "_encoder", []):  # a tied coupling's, which the model owns
        encoder.float()
    generator = torch.Generator().manual_seed(6)
    u = torch.randn(8, 3, 4, generator=generator)
    ctx = torch.randn(8, 3, CONTEXT, generator=generator)

    compiled, reference = solve_both_ways(module, u, ctx)

    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(module(compiled, ctx)[0], u, atol=1e-4, rtol=1e-4)


def test_compiled_inverse_is_left_to_autograd_when_u_needs_a_gradient():
    module = randomise(make_coupling("mixture", 2), seed=1)
    u = torch.randn(2, 1, 2, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 1, CONTEXT, dtype=torch.float64)

    h = module.inverse(u, ctx)

    assert h.requires_grad  # the PyTorch solver ran, and its steps are differentiable


def test_log_ndtr_matches_torch_from_tail_to_tail():
    z = torch.cat([torch.linspace(-80, 40, 2401, dtype=torch.float64), torch.tensor([0.0])])

    compiled = torch.tensor([kernels._log_ndtr(float(v)) for v in z], dtype=torch.float64)

    torch.testing.assert_close(compiled, torch.special.log_ndtr(z), rtol=1e-13, atol=1e-300)
