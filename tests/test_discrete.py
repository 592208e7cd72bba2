"""Mix-d and the baseline: the paper's identity, progressive training, the IW bound."""

import math

import pytest
import torch
from helpers import randomise

from tarflow_core import config, train
from tarflow_core.baseline import AutoregressiveLM

V, T, WIDTH, LAYERS = 6, 5, 16, 2


def tied_model_and_twin(components):
    """A TarFlowLM with only the tied discrete flow, and an AR model sharing its weights."""
    config.parse(["gin/discrete.gin", "gin/runs/tiny.gin"], [f"WIDTH = {WIDTH}"])
    flow_model = config.configured("build_model")(
        vocab_size=V,
        seq_len=T,
        registry=components,
        couplings=["discrete_tied"],
        layers_per_flow=LAYERS,
    ).double()
    flow = flow_model.flows[0]
    randomise(flow, seed=3, scale=0.5)
    randomise(flow_model.encoder, seed=4, scale=1.0)

    twin = AutoregressiveLM(V, T, WIDTH, LAYERS, num_heads=2).double()
    with torch.no_grad():
        twin.body.load_state_dict(flow.conditioner.body.state_dict())
        twin.start.copy_(flow.conditioner.start)
        # The twin's input embedding of token k is the conditioner's embedding of mu[k].
        twin.embed.weight.copy_(flow.conditioner.embed(flow_model.encoder.mean))
        twin.head.load_state_dict(flow.coupling.logits.state_dict())
    return flow_model, twin


def test_tied_elbo_becomes_the_ar_log_likelihood_as_sigma_shrinks(components):
    flow_model, twin = tied_model_and_twin(components)
    x = torch.randint(V, (4, T), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, T, flow_model.encoder.dim, generator=torch.Generator().manual_seed(1))
    log_p_ar = twin.elbo(x).elbo

    gaps = []
    for sigma in (0.3, 0.1, 1e-2, 1e-3, 1e-5, 1e-7):
        with torch.no_grad():
            flow_model.encoder.log_sigma.fill_(math.log(sigma))
        gaps.append((flow_model.elbo(x, noise).elbo - log_p_ar).abs().max().item())

    assert all(later <= earlier for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[0] > 1e-2, "at a large sigma the bound must differ, or the test proves nothing"
    assert gaps[-1] < 1e-5, gaps


def test_progressive_training_freezes_what_it_must(components, shakespeare, tmp_path):
    config.parse(
        ["gin/discrete.gin", "gin/runs/tiny.gin"],
        [
            f"load_corpus.source = '{shakespeare}'",
            "STEPS = 12",
            "TrainConfig.progressive_shares = [2, 1, 1]",
            "TrainConfig.log_every = 1",
        ],
    )
    experiment = config.build_experiment(components)
    corpus, train_config, model = experiment.corpus, experiment.train_config, experiment.model
    snapshots = {0: {k: v.clone() for k, v in model.state_dict().items()}}

    class Snapshots:
        def tarflow_log_metrics(self, metrics, step):
            snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}

    train.train(model, corpus, train_config, Snapshots(), tmp_path)

    def same(part: str, a: int, b: int) -> bool:
        keys = [k for k in snapshots[0] if k.startswith(part)]
        return all(torch.equal(snapshots[a][k], snapshots[b][k]) for k in keys)

    assert train_config.stage_lengths() == [6, 3, 3]
    assert not same("flows.0.", 0, 6) and not same("encoder.", 0, 6)
    assert same("flows.0.", 6, 12) and same("encoder.", 6, 12), "stage 0 parts moved later"
    assert same("flows.1.", 0, 6) and not same("flows.1.", 6, 9) and same("flows.1.", 9, 12)
    assert same("flows.2.", 0, 9) and not same("flows.2.", 9, 12)
    assert model.active_flows == 3


def test_stages_must_match_the_flows(components, shakespeare, tmp_path):
    config.parse(
        ["gin/discrete.gin", "gin/runs/tiny.gin"],
        [f"load_corpus.source = '{shakespeare}'", "TrainConfig.progressive_shares = [1, 1]"],
    )
    experiment = config.build_experiment(components)
    corpus, train_config, model = experiment.corpus, experiment.train_config, experiment.model
    with pytest.raises(config.ConfigError, match="2 stages but the model has 3 flows"):
        train.train(model, corpus, train_config, None, tmp_path)


@pytest.mark.parametrize("gin_file", ["gin/mixture.gin", "gin/discrete.gin", "gin/ar.gin"])
def test_importance_weighted_bound_is_never_looser(components, shakespeare, gin_file):
    config.parse([gin_file, "gin/runs/tiny.gin"], [f"load_corpus.source = '{shakespeare}'"])
    experiment = config.build_experiment(components)
    corpus, train_config, model = experiment.corpus, experiment.train_config, experiment.model
    windows = corpus.val_ids[: 8 * train_config.seq_len].view(8, -1)

    result = train.evaluate(model, windows, batch_size=4, iw_samples=6)

    assert result["iw_nelbo"] <= result["nelbo"] + 1e-9
    if gin_file != "gin/ar.gin":
        assert result["iw_nelbo"] < result["nelbo"], "noise should make the bound tighter"
