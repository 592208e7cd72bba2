"""Numeric guards: non-finite steps are skipped and counted, a streak stops the run with a
usable checkpoint, and the mixture inverse stays finite and exact at the extremes."""

import math

import pytest
import torch
from hypothesis import example, given, note, target
from hypothesis import strategies as st

from tarflow_core import checkpoint, config, special, train
from tarflow_core.errors import NonFiniteStepsError, TarflowError


class RecordingHook:
    def __init__(self):
        self.metrics = []

    def tarflow_log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


class RecordingBar:
    def __init__(self):
        self.postfixes = []

    def update(self, n=1):
        pass

    def set_postfix(self, values):
        self.postfixes.append(dict(values))

    def close(self):
        pass


def build(components, shakespeare, bindings=()):
    config.parse(
        ["gin/mixture.gin", "gin/runs/tiny.gin"],
        [f"load_corpus.source = '{shakespeare}'", "TrainConfig.log_every = 1", *bindings],
    )
    experiment = config.build_experiment(components)
    return experiment.corpus, experiment.train_config, experiment.model


def poison(monkeypatch, bad_steps, where="loss"):
    """Make the loss (or one gradient) NaN at the given steps, counted by calls."""
    calls = {"step": 0}
    real_loss_terms = train.loss_terms

    def loss_terms(model, x, noise=None):
        calls["step"] += 1
        loss, parts = real_loss_terms(model, x, noise)
        if calls["step"] in bad_steps:
            if where == "loss":
                loss = loss * float("nan")
            else:  # a finite loss whose gradient is infinite in one parameter
                param = next(model.parameters())
                handle = None

                def infinite_once(grad):
                    handle.remove()
                    return grad * float("inf")

                handle = param.register_hook(infinite_once)
        return loss, parts

    monkeypatch.setattr(train, "loss_terms", loss_terms)


def snapshots_by_step(model):
    """A hook that keeps the weights after every logged step."""
    hook = RecordingHook()
    weights = {}
    original = hook.tarflow_log_metrics

    def log(metrics, step):
        original(metrics, step)
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}

    hook.tarflow_log_metrics = log
    return hook, weights


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_steps_are_skipped_and_counted(
    components, shakespeare, tmp_path, monkeypatch, where
):
    corpus, train_config, model = build(components, shakespeare, ["STEPS = 12"])
    poison(monkeypatch, bad_steps={4, 5, 9}, where=where)
    hook, weights = snapshots_by_step(model)
    bar = RecordingBar()

    train.train(model, corpus, train_config, hook, tmp_path, lambda total, desc: bar)

    by_step = dict(hook.metrics)
    assert [by_step[s]["train/skipped_steps"] for s in (3, 4, 5, 8, 9, 12)] == [0, 1, 2, 2, 3, 3]
    assert "train/nelbo" not in by_step[4], "a skipped step has no loss to log"
    assert all(math.isfinite(m["train/nelbo"]) for s, m in by_step.items() if s not in {4, 5, 9})
    for skipped in (4, 5, 9):
        for name, value in weights[skipped].items():
            assert torch.equal(value, weights[skipped - 1][name]), (skipped, name)
    assert not torch.equal(weights[6]["encoder.mean"], weights[5]["encoder.mean"])
    assert bar.postfixes[-1]["skipped"] == 3 and "skipped" not in bar.postfixes[0]
    assert [m["train/lr"] for s, m in hook.metrics][-1] == pytest.approx(
        train_config.lr * train_config.min_lr_ratio
    ), "the schedule follows the step count, skipped steps included"


def test_a_streak_of_bad_steps_stops_with_a_usable_checkpoint(
    components, shakespeare, tmp_path, monkeypatch
):
    corpus, train_config, model = build(
        components, shakespeare, ["STEPS = 20", "TrainConfig.max_consecutive_skips = 3"]
    )
    poison(monkeypatch, bad_steps={2, 7, 8, 9, 10, 11, 12})
    hook, weights = snapshots_by_step(model)

    with pytest.raises(NonFiniteStepsError) as caught:
        train.train(model, corpus, train_config, hook, tmp_path)

    assert isinstance(caught.value, TarflowError)
    message = caught.value.one_line()
    assert "stopped at step 9: 3 steps in a row" in message
    assert "after step 6, the last update applied" in message
    assert "hint: lower TrainConfig.lr" in message and "--resume" in message
    assert hook.metrics[-1] == (9, {"train/skipped_steps": 4})

    fresh = build(components, shakespeare, ["STEPS = 20"])[2]
    manifest = checkpoint.load_weights(tmp_path / "checkpoint", fresh)
    assert manifest["step"] == 9
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, weights[6][name]), name
    state = checkpoint.load_trainer_state(tmp_path / "checkpoint")
    assert state["skipped"] == 4 and state["skipped_in_a_row"] == 0

    # Resumed, and still failing at once: the message still names the last update applied.
    with pytest.raises(NonFiniteStepsError) as again:
        train.train(fresh, corpus, train_config, hook, tmp_path, resume=True)
    assert "stopped at step 12" in again.value.one_line()
    assert "after step 6, the last update applied" in again.value.one_line()


# Mixture inverse at the extremes: |u| up to 40, weights near 0 and 1, scales at the clamps
# the mixture couplings apply (soft clamp to +-7 in log scale).
MAX_LOG_SCALE = 7.0


@st.composite
def extreme_mixtures(draw):
    K = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    logit_scale = draw(st.sampled_from([0.1, 5.0, 30.0, 100.0]))
    loc_scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    generator = torch.Generator().manual_seed(seed)
    n = 32
    log_weights = torch.log_softmax(
        torch.randn(n, K, generator=generator, dtype=torch.float64) * logit_scale, -1
    )
    loc = torch.randn(n, K, generator=generator, dtype=torch.float64) * loc_scale
    at_clamp = torch.rand(n, K, generator=generator, dtype=torch.float64) < 0.5
    log_scale = (torch.rand(n, K, generator=generator, dtype=torch.float64) * 2 - 1) * 6.9
    log_scale = torch.where(at_clamp, torch.sign(log_scale) * 6.999, log_scale)
    u = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * 40
    u[:3] = torch.tensor([40.0, -40.0, 0.0])
    return u, log_weights, loc, log_scale


@given(mixture=extreme_mixtures(), family=st.sampled_from(["logistic", "gaussian"]))
@example(
    mixture=(
        torch.tensor([-39.589383921630926]),
        torch.tensor([[1.8e-13, 1.0 - 1.8e-13, 2.3e-19]], dtype=torch.float64).log(),
        torch.tensor([[15.538280933430226, -32.58940926199355, 41.26125136172181]]),
        torch.full((1, 3), -6.999, dtype=torch.float64),
    ),
    family="gaussian",
)
def test_mixture_inverse_is_finite_and_exact_at_the_extremes(mixture, family):
    u64, log_weights, loc, log_scale = (t.double() for t in mixture)

    x64 = special.normal_to_mixture(u64, log_weights, loc, log_scale, family)
    x32 = special.normal_to_mixture(
        *(t.float() for t in (u64, log_weights, loc, log_scale)), family
    )

    assert torch.isfinite(x64).all() and torch.isfinite(x32).all()
    back, _ = special.mixture_to_normal(x64, log_weights, loc, log_scale, family)
    error64 = float((back - u64).abs().max())
    note(f"float64 round trip error {error64:.2e}")
    target(error64, label="float64 round trip error")
    assert error64 < 1e-6
    # float32 lands on the float64 answer to float32 accuracy, not on a bracket edge.
    error32 = float(((x32.double() - x64).abs() / (1 + x64.abs())).max())
    note(f"float32 relative error {error32:.2e}")
    assert error32 < 1e-3


@pytest.mark.parametrize("family", ["logistic", "gaussian"])
@pytest.mark.parametrize("offset", [-100.0, 100.0])
def test_a_root_outside_the_starting_bracket_is_found_not_clamped(family, offset, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    log_weights = torch.log_softmax(torch.randn(16, 3, generator=generator), -1).double()
    loc = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    log_scale = torch.randn(16, 3, generator=generator, dtype=torch.float64) * 0.5
    u = torch.randn(16, generator=generator, dtype=torch.float64) * 3
    wrong = torch.full_like(u, offset)  # a bracket of width 0, far from every root

    monkeypatch.setattr(special, "_bracket", lambda *args: (wrong, wrong))

    x = special.normal_to_mixture(u, log_weights, loc, log_scale, family)

    back, _ = special.mixture_to_normal(x, log_weights, loc, log_scale, family)
    torch.testing.assert_close(back, u, atol=1e-9, rtol=1e-9)
