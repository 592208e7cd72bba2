"""The contract every registered component obeys, run over whatever the registry holds.

A coupling, direction or conditioner added by any installed plugin, including a third party's,
is tested here without being added to a list. Everything runs in float64.
"""

import pytest
import torch
from helpers import TOLERANCE, per_sequence_logdet, randomise
from hypothesis import example, given, note
from hypothesis import strategies as st

from tarflow_core import config, registry
from tarflow_core.model import Flow, takes_encoder

_, REGISTRY = registry.load()
config.setup(REGISTRY)

COUPLINGS = REGISTRY.names("coupling")
DIRECTIONS = REGISTRY.names("direction")
CONDITIONERS = REGISTRY.names("conditioner")
ENCODERS = REGISTRY.names("encoder")
DECODERS = REGISTRY.names("decoder")
CONTEXT = 6
VOCAB = 7

# Random weights at this scale keep the maps well conditioned, so a round trip in h measures
# the inverse rather than the condition number of one draw. Larger weights saturate the
# mixtures' log scales (components from e^-7 to e^7 wide), where h is determined only to
# about 1e-6 relative; the u-space test below covers that regime.
WEIGHT_SCALE = 0.2
EXTREME_WEIGHT_SCALE = 0.5
TOL = TOLERANCE[torch.float64]

sizes = {
    "batch": st.integers(1, 3),
    "positions": st.integers(1, 4),
    "channels": st.integers(1, 4),
    "seed": st.integers(0, 2**31 - 1),
}


def tied_encoder(factory, dim: int) -> dict:
    """An encoder for couplings that tie themselves to the codebook, as build_model gives."""
    if not takes_encoder(factory):
        return {}

    # Means near zero and scales near one: a smooth codebook mixture without empty gaps,
    # where round trips would measure conditioning instead of correctness.
    encoder = REGISTRY.get("encoder", ENCODERS[0])(VOCAB, dim).double()
    return {"encoder": randomise(encoder, seed=11, scale=0.3)}


def make_coupling(name: str, dim: int) -> torch.nn.Module:
    factory = REGISTRY.get("coupling", name)
    return factory(dim, CONTEXT, **tied_encoder(factory, dim)).double()


def make_flow(coupling: str, direction: str, conditioner: str, dim: int, positions: int) -> Flow:
    body = REGISTRY.get("conditioner", conditioner)(dim, 1, positions)
    factory = REGISTRY.get("coupling", coupling)
    coupling_module = factory(dim, body.context_dim, **tied_encoder(factory, dim))
    return Flow(REGISTRY.get("direction", direction)(), body, coupling_module).double()


def draw(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def test_registry_holds_the_builtins():
    assert {"affine", "mixture", "mixture_gaussian", "discrete", "discrete_tied"} <= set(COUPLINGS)
    assert {"left_to_right", "right_to_left"} <= set(DIRECTIONS)


@pytest.mark.parametrize("name", COUPLINGS)
@given(**sizes)
def test_coupling_round_trip(name, batch, positions, channels, seed):
    coupling = randomise(make_coupling(name, channels), seed, WEIGHT_SCALE)
    generator = torch.Generator().manual_seed(seed + 1)
    h = draw(generator, batch, positions, channels, scale=2.0)
    ctx = draw(generator, batch, positions, CONTEXT)

    u, ladj = coupling(h, ctx)

    assert u.shape == h.shape and ladj.shape == (batch,)
    torch.testing.assert_close(coupling.inverse(u, ctx), h, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", COUPLINGS)
@given(**sizes)
def test_coupling_ladj_matches_autograd(name, batch, positions, channels, seed):
    coupling = randomise(make_coupling(name, channels), seed, WEIGHT_SCALE)
    generator = torch.Generator().manual_seed(seed + 1)
    h = draw(generator, batch, positions, channels, scale=2.0)
    ctx = draw(generator, batch, positions, CONTEXT)

    _, ladj = coupling(h, ctx)
    expected = torch.stack(
        [
            per_sequence_logdet(lambda v, b=b: coupling(v, ctx[b : b + 1])[0], h[b : b + 1])[0]
            for b in range(batch)
        ]
    )

    torch.testing.assert_close(ladj, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", COUPLINGS)
@pytest.mark.parametrize("u_tail", [-6.0, -4.5, 4.5, 6.0])
def test_coupling_inverse_reaches_the_tails(name, u_tail):
    coupling = randomise(make_coupling(name, 3), seed=7)
    generator = torch.Generator().manual_seed(8)
    ctx = draw(generator, 2, 5, CONTEXT)
    u = torch.full((2, 5, 3), u_tail, dtype=torch.float64)

    h = coupling.inverse(u, ctx)

    assert torch.isfinite(h).all()
    torch.testing.assert_close(coupling(h, ctx)[0], u, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", COUPLINGS)
def test_new_coupling_starts_near_identity(name):
    coupling = make_coupling(name, 4)
    if not coupling.near_identity_at_init:
        pytest.skip(f"{type(coupling).__name__} does not start at the identity by design")
    generator = torch.Generator().manual_seed(0)
    h = draw(generator, 16, 8, 4)
    ctx = draw(generator, 16, 8, CONTEXT)

    u, ladj = coupling(h, ctx)

    # A mixture of logistics only approximates the normal CDF, so "near" is a loose bound.
    assert (u - h).abs().mean() < 0.1
    assert (ladj / h[0].numel()).abs().mean() < 0.1


@pytest.mark.parametrize("name", DIRECTIONS)
@given(**sizes)
def test_direction_is_a_permutation(name, batch, positions, channels, seed):
    direction = REGISTRY.get("direction", name)().double()
    h = draw(torch.Generator().manual_seed(seed), batch, positions, channels)
    original = h.clone()

    u, ladj = direction(h)

    torch.testing.assert_close(direction.inverse(u), h)
    torch.testing.assert_close(ladj, per_sequence_logdet(lambda v: direction(v)[0], h))
    assert torch.equal(h, original), "a direction must not modify its input"
    assert torch.equal(u.sort(dim=1).values, h.sort(dim=1).values)


@pytest.mark.parametrize("name", CONDITIONERS)
@given(positions=st.integers(2, 6), channels=st.integers(1, 3), seed=sizes["seed"])
def test_conditioner_is_causal(name, positions, channels, seed):
    body = randomise(REGISTRY.get("conditioner", name)(channels, 1, positions).double(), seed)
    h = draw(torch.Generator().manual_seed(seed), 1, positions, channels)

    jacobian = torch.autograd.functional.jacobian(body, h)[0, :, :, 0]  # (T, C, T, D)
    influence = jacobian.abs().sum(dim=(1, 3))  # (T out, T in)

    # Output t may depend on inputs s < t only: the diagonal and above must be zero.
    assert torch.all(influence.triu() == 0)
    assert influence.tril(-1).sum() > 0


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@given(positions=st.integers(1, 4), channels=st.integers(1, 3), seed=sizes["seed"])
# The root finder once left an exact root for a bisection midpoint (1e-4 off) on this draw.
@example(positions=2, channels=2, seed=3347)
def test_flow_round_trip_and_ladj(coupling, direction, positions, channels, seed):
    flow = make_flow(coupling, direction, CONDITIONERS[0], channels, positions)
    randomise(flow, seed, WEIGHT_SCALE)
    h = draw(torch.Generator().manual_seed(seed + 1), 2, positions, channels, scale=1.5)

    u, ladj = flow(h)

    torch.testing.assert_close(flow.inverse(u), h, atol=TOL, rtol=TOL)
    torch.testing.assert_close(
        ladj, per_sequence_logdet(lambda v: flow(v)[0], h), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("coupling", COUPLINGS)
@given(positions=st.integers(1, 4), channels=st.integers(1, 3), seed=sizes["seed"])
def test_flow_inverse_holds_at_extreme_weights(coupling, positions, channels, seed):
    flow = make_flow(coupling, DIRECTIONS[0], CONDITIONERS[0], channels, positions)
    randomise(flow, seed, EXTREME_WEIGHT_SCALE)
    u = draw(torch.Generator().manual_seed(seed + 1), 2, positions, channels)

    h = flow.inverse(u)

    note(f"largest |h| {h.abs().max().item():.3g}")
    assert torch.isfinite(h).all()
    torch.testing.assert_close(flow(h)[0], u, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_flow_is_causal_in_its_direction(coupling, direction):
    positions, channels = 5, 2
    flow = randomise(make_flow(coupling, direction, CONDITIONERS[0], channels, positions), 3)
    h = draw(torch.Generator().manual_seed(4), 1, positions, channels)

    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v)[0], h)[0, :, :, 0]
    influence = jacobian.abs().sum(dim=(1, 3))  # (T out, T in), natural order

    # In visiting order the influence must be lower triangular (with the diagonal).
    order, _ = flow.direction(torch.arange(positions, dtype=torch.float64).view(1, -1, 1))
    order = order.view(-1).long()
    visiting = influence[order][:, order]
    assert torch.all(visiting.triu(1) == 0)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_gradients_reach_every_parameter(coupling):
    flow = randomise(make_flow(coupling, DIRECTIONS[0], CONDITIONERS[0], 3, 4), seed=5)
    h = draw(torch.Generator().manual_seed(6), 2, 4, 3)

    u, ladj = flow(h)
    (u.pow(2).sum() + ladj.sum()).backward()

    for name, param in flow.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert param.grad.abs().sum() > 0, f"{name} gets a zero gradient"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_encoder_and_decoder_are_consistent(encoder, decoder):
    torch.manual_seed(0)
    enc = REGISTRY.get("encoder", encoder)(7, 3).double()
    dec = REGISTRY.get("decoder", decoder)(enc).double()
    x = torch.randint(7, (2, 5))

    z, log_q = enc.sample(x)
    logits = dec.logits(z)

    torch.testing.assert_close(log_q, enc.log_prob(x, z))
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(2, 5, dtype=torch.float64))
    assert dec.log_prob(x, z).shape == (2,)
