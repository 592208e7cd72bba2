"""Multi-process training: two processes follow the one-process loss trajectory, and rank 0
alone writes the run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tarflow_core import config, train
from tarflow_core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

BINDINGS = ["STEPS = 6", "TrainConfig.log_every = 1", "TrainConfig.checkpoint_every = 4"]

# The two runs differ only in the order of float32 sums (each rank averages its half of the
# batch, then the halves are averaged). At a loss near 5, one float32 ulp is 4.8e-7, about
# 1e-7 relative; a few steps of a tiny model stay within a few ulps (measured: at most 2).
# Ten ulps leaves room without letting a wrong batch split through (that moves the loss
# by 1e-2 or more).
RTOL = 1e-6


class NoHook:
    def tarflow_log_metrics(self, metrics, step):
        pass


def test_two_processes_follow_the_one_process_losses(components, shakespeare, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tarflow_core.run",
            "--threads",
            "1",
            "--gin",
            "gin/mixture.gin",
            "--gin",
            "gin/runs/tiny.gin",
            "--bind",
            f"load_corpus.source = '{shakespeare}'",
            "--bind",
            f"RunConfig.output_dir = '{tmp_path / 'runs'}'",
            *(arg for binding in BINDINGS for arg in ("--bind", binding)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1, "only rank 0 reports"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoint" / "model.safetensors").exists()
    records = train.read_metrics(run_dir)

    config.parse(
        ["gin/mixture.gin", "gin/runs/tiny.gin"],
        [f"load_corpus.source = '{shakespeare}'", *BINDINGS],
    )
    experiment = config.build_experiment(components)
    train.train(experiment.model, experiment.corpus, experiment.train_config, NoHook(), tmp_path)
    reference = train.read_metrics(tmp_path)
    train_config = experiment.train_config
    val = train.validation_metrics(
        experiment.model, experiment.corpus, train_config, train_config.iw_samples
    )

    two = {r["step"]: r["train/nelbo"] for r in records if "train/nelbo" in r}
    one = {r["step"]: r["train/nelbo"] for r in reference if "train/nelbo" in r}
    assert sorted(two) == list(range(1, 7))
    assert two == pytest.approx(one, rel=RTOL, abs=0)
    assert records[-1]["val/nelbo"] == pytest.approx(val["val/nelbo"], rel=RTOL, abs=0)
    assert one[6] < one[1], "the model trained"


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    config_ = train.TrainConfig(batch_size=8)
    with pytest.raises(ConfigError, match="batch_size = 8 does not split over 3 processes"):
        train.check_world_size(config_, train.Distributed(rank=0, world_size=3))


def test_each_rank_takes_its_own_rows_of_the_global_batch():
    config_ = train.TrainConfig(batch_size=8)
    rows = [train._local_rows(config_, train.Distributed(rank, 4)) for rank in range(4)]
    batch = torch.arange(8)
    assert torch.equal(torch.cat([batch[r] for r in rows]), batch)
