"""Checkpoints reload to the same model, and a damaged one is refused with a reason."""

import pytest
import torch

from tarflow_core import checkpoint, config
from tarflow_core.errors import TarflowError


def tiny_model(components, seed):
    config.parse(["gin/mixture.gin", "gin/runs/tiny.gin"], [])
    torch.manual_seed(seed)
    return config.configured("build_model")(vocab_size=9, seq_len=8, registry=components)


def test_weights_reload_to_the_same_model(components, tmp_path):
    model = tiny_model(components, seed=0)
    for param in model.parameters():  # move away from the initial values
        param.data.add_(0.01 * torch.randn_like(param))
    checkpoint.save(tmp_path, model, step=5)

    fresh = tiny_model(components, seed=1)
    meta = checkpoint.load_weights(tmp_path, fresh)

    x, noise = torch.randint(9, (2, 8)), torch.randn(2, 8, model.encoder.dim)
    torch.testing.assert_close(fresh.elbo(x, noise).elbo, model.elbo(x, noise).elbo)
    assert meta["step"] == 5
    assert fresh.decoder.encoder is fresh.encoder, "the decoder stays tied after loading"


def test_truncated_checkpoint_is_refused(components, tmp_path):
    checkpoint.save(tmp_path, tiny_model(components, seed=0))
    weights = tmp_path / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])

    with pytest.raises(TarflowError, match="truncated or damaged: 100 bytes"):
        checkpoint.load_weights(tmp_path, tiny_model(components, seed=0))


def test_missing_checkpoint_is_refused(components, tmp_path):
    with pytest.raises(TarflowError, match="no checkpoint"):
        checkpoint.load_weights(tmp_path, tiny_model(components, seed=0))


def test_weights_of_a_checkpoint_from_before_manifests_still_load(components, tmp_path):
    from safetensors.torch import save_model

    model = tiny_model(components, seed=0)
    save_model(model, str(tmp_path / checkpoint.WEIGHTS))
    (tmp_path / checkpoint.META).write_text('{"step": 7}')

    fresh = tiny_model(components, seed=1)
    assert checkpoint.load_weights(tmp_path, fresh)["step"] == 7
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())
    with pytest.raises(TarflowError, match="older tarflow: it holds weights but not the state"):
        checkpoint.read_manifest(tmp_path)
