"""The conformance tests, parametrised over the components under test.

Which components: those of the plugins named by `--tarflow-conformance`, or the whole registry
when the option is absent (the project's own suite) or `all`. Everything runs in float64. A
new kind of check is one more `test_*` function here taking the kinds it needs as arguments
(`coupling`, `direction`, `conditioner`, `encoder`, `decoder`); `pytest_generate_tests` below
fills them in.
"""

import contextlib
import functools

import pytest
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load_model, save_model

from tarflow_core.conformance.common import (
    LADJ_TOLERANCE,
    TOLERANCE,
    combinations,
    per_sequence_logdet,
    randomise,
    targets,
)

KIND_ARGUMENTS = ("coupling", "direction", "conditioner", "encoder", "decoder")
CONTEXT = 6
VOCAB = 7

# Random weights at this scale keep the maps well conditioned, so a round trip in h measures
# the inverse rather than the condition number of one draw. Larger weights saturate the
# mixtures' log scales (components from e^-7 to e^7 wide), where h is determined only to
# about 1e-6 relative; the u-space test covers that regime.
WEIGHT_SCALE = 0.2
EXTREME_WEIGHT_SCALE = 0.5
TOL = TOLERANCE[torch.float64]

sizes = {
    "batch": st.integers(1, 3),
    "positions": st.integers(1, 4),
    "channels": st.integers(1, 4),
    "seed": st.integers(0, 2**31 - 1),
}


@functools.cache
def loaded_registry():
    """The process-wide registry, with factories wrapped as gin configurables as in a run."""
    from tarflow_core import config, registry

    _, components = registry.load()
    config.setup(components)
    return components


def requested_plugins(pytest_config) -> list[str] | None:
    """Plugin names from `--tarflow-conformance` (repeatable, comma-separated), or None."""
    values = pytest_config.getoption("tarflow_conformance", default=None) or []
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


def pytest_generate_tests(metafunc):
    kinds = tuple(kind for kind in KIND_ARGUMENTS if kind in metafunc.fixturenames)
    if not kinds:
        return
    registry = loaded_registry()
    everything = targets(registry, None)
    under_test = targets(registry, requested_plugins(metafunc.config))
    values = combinations(under_test, everything, kinds)
    if len(kinds) == 1:
        values = [names[0] for names in values]
    metafunc.parametrize(",".join(kinds), values)


def get(kind: str, name: str):
    return loaded_registry().get(kind, name)


def first(kind: str) -> str:
    """The first registered component of a kind, as the partner of one under test."""
    return loaded_registry().names(kind)[0]


def tied_encoder(factory, dim: int) -> dict:
    """An encoder for couplings that tie themselves to the codebook, as build_model gives."""
    from tarflow_core.model import takes_encoder

    if not takes_encoder(factory):
        return {}

    # Means near zero and scales near one: a smooth codebook mixture without empty gaps,
    # where round trips would measure conditioning instead of correctness.
    encoder = get("encoder", first("encoder"))(VOCAB, dim).double()
    return {"encoder": randomise(encoder, seed=11, scale=0.3)}


def make_coupling(name: str, dim: int) -> torch.nn.Module:
    factory = get("coupling", name)
    with seeded_init():
        return factory(dim, CONTEXT, **tied_encoder(factory, dim)).double()


def make_flow(coupling: str, direction: str, conditioner: str, dim: int, positions: int):
    from tarflow_core.model import Flow

    with seeded_init():
        body = get("conditioner", conditioner)(dim, 1, positions)
        factory = get("coupling", coupling)
        coupling_module = factory(dim, body.context_dim, **tied_encoder(factory, dim))
        return Flow(get("direction", direction)(), body, coupling_module).double()


@contextlib.contextmanager
def seeded_init(seed: int = 0):
    """Build components from a fixed draw of torch's global generator, so that a component
    with a random initialisation is the same one in every run and every test order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def draw(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


@given(**sizes)
def test_coupling_round_trip(coupling, batch, positions, channels, seed):
    module = randomise(make_coupling(coupling, channels), seed, WEIGHT_SCALE)
    generator = torch.Generator().manual_seed(seed + 1)
    h = draw(generator, batch, positions, channels, scale=2.0)
    ctx = draw(generator, batch, positions, CONTEXT)

    u, ladj = module(h, ctx)

    assert u.shape == h.shape and ladj.shape == (batch,)
    torch.testing.assert_close(module.inverse(u, ctx), h, atol=TOL, rtol=TOL)


@given(**sizes)
def test_coupling_ladj_matches_autograd(coupling, batch, positions, channels, seed):
    module = randomise(make_coupling(coupling, channels), seed, WEIGHT_SCALE)
    generator = torch.Generator().manual_seed(seed + 1)
    h = draw(generator, batch, positions, channels, scale=2.0)
    ctx = draw(generator, batch, positions, CONTEXT)

    _, ladj = module(h, ctx)
    expected = torch.stack(
        [
            per_sequence_logdet(lambda v, b=b: module(v, ctx[b : b + 1])[0], h[b : b + 1])[0]
            for b in range(batch)
        ]
    )

    torch.testing.assert_close(ladj, expected, atol=LADJ_TOLERANCE, rtol=LADJ_TOLERANCE)


@pytest.mark.parametrize("u_tail", [-6.0, -4.5, 4.5, 6.0])
def test_coupling_inverse_reaches_the_tails(coupling, u_tail):
    module = randomise(make_coupling(coupling, 3), seed=7)
    generator = torch.Generator().manual_seed(8)
    ctx = draw(generator, 2, 5, CONTEXT)
    u = torch.full((2, 5, 3), u_tail, dtype=torch.float64)

    h = module.inverse(u, ctx)

    assert torch.isfinite(h).all()
    torch.testing.assert_close(module(h, ctx)[0], u, atol=1e-6, rtol=1e-6)


def test_new_coupling_starts_near_identity(coupling):
    module = make_coupling(coupling, 4)
    if not module.near_identity_at_init:
        pytest.skip(f"{type(module).__name__} does not start at the identity by design")
    generator = torch.Generator().manual_seed(0)
    h = draw(generator, 16, 8, 4)
    ctx = draw(generator, 16, 8, CONTEXT)

    u, ladj = module(h, ctx)

    # A mixture of logistics only approximates the normal CDF, so "near" is a loose bound.
    assert (u - h).abs().mean() < 0.1
    assert (ladj / h[0].numel()).abs().mean() < 0.1


@given(**sizes)
def test_direction_is_a_permutation(direction, batch, positions, channels, seed):
    module = get("direction", direction)().double()
    h = draw(torch.Generator().manual_seed(seed), batch, positions, channels)
    original = h.clone()

    u, ladj = module(h)

    torch.testing.assert_close(module.inverse(u), h)
    torch.testing.assert_close(ladj, per_sequence_logdet(lambda v: module(v)[0], h))
    assert torch.equal(h, original), "a direction must not modify its input"
    assert torch.equal(u.sort(dim=1).values, h.sort(dim=1).values)


@given(positions=st.integers(2, 6), channels=st.integers(1, 3), seed=sizes["seed"])
def test_conditioner_is_causal(conditioner, positions, channels, seed):
    body = randomise(get("conditioner", conditioner)(channels, 1, positions).double(), seed)
    h = draw(torch.Generator().manual_seed(seed), 1, positions, channels)

    jacobian = torch.autograd.functional.jacobian(body, h)[0, :, :, 0]  # (T, C, T, D)
    influence = jacobian.abs().sum(dim=(1, 3))  # (T out, T in)

    # Output t may depend on inputs s < t only: the diagonal and above must be zero.
    assert torch.all(influence.triu() == 0)
    assert influence.tril(-1).sum() > 0


@given(
    positions=st.integers(2, 9),
    channels=st.integers(1, 4),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    seed=sizes["seed"],
)
def test_conditioner_decoding_gives_the_forward_features(
    conditioner, positions, channels, chunks, seed
):
    """Fed the solved positions in chunks of any size, the incremental decoding state (a
    key-value cache, say) gives exactly the features of the full forward pass, and so does the
    interface's uncached default."""
    from tarflow_core.interfaces import Conditioner

    body = get("conditioner", conditioner)(channels, 2, positions).double()
    body = randomise(body, seed)
    h = draw(torch.Generator().manual_seed(seed), 2, positions, channels)
    expected = body(h)

    own = (body.begin_decoding, body.continue_decoding)
    default = (
        lambda *a: Conditioner.begin_decoding(body, *a),
        lambda *a: Conditioner.continue_decoding(body, *a),
    )
    for begin, step in (own, default):
        state, first_features = begin(2, channels, torch.float64)
        features, fed = [first_features], 0
        for size in chunks:
            size = min(size, positions - 1 - fed)
            if size <= 0:
                break
            features.append(step(state, h[:, fed : fed + size]))
            fed += size
        note(f"fed {fed} of {positions} positions")
        torch.testing.assert_close(
            torch.cat(features, 1), expected[:, : fed + 1], atol=TOL, rtol=TOL
        )


@settings(max_examples=8, deadline=None)  # each example inverts twice, position by position
@given(positions=st.integers(1, 6), channels=st.integers(1, 3), seed=sizes["seed"])
def test_flow_cached_inverse_matches_uncached(
    coupling, direction, conditioner, positions, channels, seed
):
    flow = make_flow(coupling, direction, conditioner, channels, positions)
    randomise(flow, seed, WEIGHT_SCALE)
    u = draw(torch.Generator().manual_seed(seed + 1), 2, positions, channels)
    before = u.clone()

    cached = flow.inverse(u)
    uncached = flow.inverse(u, cached=False)

    assert torch.equal(u, before), "inversion changed its input"
    torch.testing.assert_close(cached, uncached, atol=TOL, rtol=TOL)


@given(positions=st.integers(1, 4), channels=st.integers(1, 3), seed=sizes["seed"])
# The root finder once left an exact root for a bisection midpoint (1e-4 off) on this draw.
@example(positions=2, channels=2, seed=3347)
def test_flow_round_trip_and_ladj(coupling, direction, conditioner, positions, channels, seed):
    flow = make_flow(coupling, direction, conditioner, channels, positions)
    randomise(flow, seed, WEIGHT_SCALE)
    h = draw(torch.Generator().manual_seed(seed + 1), 2, positions, channels, scale=1.5)

    u, ladj = flow(h)

    torch.testing.assert_close(flow.inverse(u), h, atol=TOL, rtol=TOL)
    torch.testing.assert_close(
        ladj,
        per_sequence_logdet(lambda v: flow(v)[0], h),
        atol=LADJ_TOLERANCE,
        rtol=LADJ_TOLERANCE,
    )


@given(positions=st.integers(1, 4), channels=st.integers(1, 3), seed=sizes["seed"])
def test_flow_inverse_holds_at_extreme_weights(coupling, conditioner, positions, channels, seed):
    flow = make_flow(coupling, first("direction"), conditioner, channels, positions)
    randomise(flow, seed, EXTREME_WEIGHT_SCALE)
    u = draw(torch.Generator().manual_seed(seed + 1), 2, positions, channels)

    h = flow.inverse(u)

    note(f"largest |h| {h.abs().max().item():.3g}")
    assert torch.isfinite(h).all()
    torch.testing.assert_close(flow(h)[0], u, atol=1e-6, rtol=1e-6)


def test_flow_is_causal_in_its_direction(coupling, direction, conditioner):
    positions, channels = 5, 2
    flow = randomise(make_flow(coupling, direction, conditioner, channels, positions), 3)
    h = draw(torch.Generator().manual_seed(4), 1, positions, channels)

    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v)[0], h)[0, :, :, 0]
    influence = jacobian.abs().sum(dim=(1, 3))  # (T out, T in), natural order

    # In visiting order the influence must be lower triangular (with the diagonal).
    order, _ = flow.direction(torch.arange(positions, dtype=torch.float64).view(1, -1, 1))
    order = order.view(-1).long()
    visiting = influence[order][:, order]
    assert torch.all(visiting.triu(1) == 0)


def test_new_flow_starts_near_identity(coupling, conditioner):
    flow = make_flow(coupling, first("direction"), conditioner, 3, 6)
    if not flow.coupling.near_identity_at_init:
        pytest.skip(f"{type(flow.coupling).__name__} does not start at the identity by design")
    h = draw(torch.Generator().manual_seed(2), 8, 6, 3)

    u, ladj = flow(h)

    # The conditioner's last projection starts at zero, so the coupling sees a context that
    # leaves it at its own starting point.
    assert (u - h).abs().mean() < 0.1
    assert (ladj / h[0].numel()).abs().mean() < 0.1


def test_gradients_reach_every_parameter(coupling, conditioner):
    flow = randomise(make_flow(coupling, first("direction"), conditioner, 3, 4), seed=5)
    h = draw(torch.Generator().manual_seed(6), 2, 4, 3)

    u, ladj = flow(h)
    (u.pow(2).sum() + ladj.sum()).backward()

    for name, param in flow.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert param.grad.abs().sum() > 0, f"{name} gets a zero gradient"


def test_flow_save_and_load(coupling, direction, conditioner, tmp_path):
    saved = randomise(make_flow(coupling, direction, conditioner, 3, 4), seed=5)
    fresh = randomise(make_flow(coupling, direction, conditioner, 3, 4), seed=6)
    h = draw(torch.Generator().manual_seed(7), 2, 4, 3)

    save_model(saved, str(tmp_path / "flow.safetensors"))
    missing, unexpected = load_model(fresh, str(tmp_path / "flow.safetensors"))

    assert not missing and not unexpected
    u, ladj = saved(h)
    u_loaded, ladj_loaded = fresh(h)
    assert torch.equal(u, u_loaded) and torch.equal(ladj, ladj_loaded)
    assert torch.equal(saved.inverse(u), fresh.inverse(u))


def test_encoder_and_decoder_are_consistent(encoder, decoder):
    torch.manual_seed(0)
    enc = get("encoder", encoder)(VOCAB, 3).double()
    dec = get("decoder", decoder)(enc).double()
    x = torch.randint(VOCAB, (2, 5))

    z, log_q = enc.sample(x)
    logits = dec.logits(z)

    torch.testing.assert_close(log_q, enc.log_prob(x, z))
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(2, 5, dtype=torch.float64))
    assert dec.log_prob(x, z).shape == (2,)


def test_encoder_and_decoder_gradients(encoder, decoder):
    enc = randomise(get("encoder", encoder)(VOCAB, 3).double(), seed=1)
    dec = randomise(get("decoder", decoder)(enc).double(), seed=2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(VOCAB, (4, 6), generator=generator)
    noise = draw(generator, 4, 6, 3)

    # The reconstruction term of the ELBO: z is reparameterised, so the encoder learns through
    # both terms and the decoder through the first.
    z, log_q = enc.sample(x, noise)
    (dec.log_prob(x, z) - log_q).sum().backward()

    for name, param in [*enc.named_parameters(), *dec.named_parameters()]:
        assert param.grad is not None, f"{name} gets no gradient"
        assert param.grad.abs().sum() > 0, f"{name} gets a zero gradient"


def test_encoder_and_decoder_save_and_load(encoder, decoder, tmp_path):
    def build(seed):
        enc = get("encoder", encoder)(VOCAB, 3).double()
        pair = torch.nn.ModuleDict({"encoder": enc, "decoder": get("decoder", decoder)(enc)})
        return randomise(pair.double(), seed)

    saved, fresh = build(1), build(2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(VOCAB, (2, 5), generator=generator)
    noise = draw(generator, 2, 5, 3)

    # save_model, not save_file: a decoder tied to the codebook shares its tensors.
    save_model(saved, str(tmp_path / "pair.safetensors"))
    missing, unexpected = load_model(fresh, str(tmp_path / "pair.safetensors"))

    assert not missing and not unexpected
    z, log_q = saved["encoder"].sample(x, noise)
    z_loaded, log_q_loaded = fresh["encoder"].sample(x, noise)
    assert torch.equal(z, z_loaded) and torch.equal(log_q, log_q_loaded)
    assert torch.equal(saved["decoder"].logits(z), fresh["decoder"].logits(z))


# What `from tarflow_core.conformance.kit import *` gives a test module: every test above and
# the hook that parametrises them, so a new test needs no registration anywhere.
__all__ = ["pytest_generate_tests", *sorted(n for n in dir() if n.startswith("test_"))]
