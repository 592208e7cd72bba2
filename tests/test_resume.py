"""Crash-safe resume: a run killed with SIGKILL continues to the losses of an uninterrupted one,
an interrupted save leaves a usable checkpoint, and resuming refuses what does not fit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tarflow_core import checkpoint, config, registry, train
from tarflow_core.errors import CheckpointError
from tarflow_core.hookspecs import hookimpl

REPO = Path(__file__).resolve().parent.parent

# A run long enough to be killed in the middle, with a checkpoint every few steps.
RUN_BINDINGS = [
    "STEPS = 24",
    "TrainConfig.log_every = 1",
    "TrainConfig.checkpoint_every = 5",
]


def build(components, shakespeare, bindings=()):
    config.parse(
        ["gin/mixture.gin", "gin/runs/tiny.gin"],
        [f"load_corpus.source = '{shakespeare}'", *RUN_BINDINGS, *bindings],
    )
    return config.build_experiment(components)


def losses(records) -> dict[int, float]:
    return {r["step"]: r["train/nelbo"] for r in records if "train/nelbo" in r}


class NoHook:
    def tarflow_log_metrics(self, metrics, step):
        pass


def test_a_killed_run_resumes_to_the_uninterrupted_losses(components, shakespeare, tmp_path):
    command = [sys.executable, "-m", "tarflow_core.run", "--threads", "1"]
    first = subprocess.Popen(
        command
        + ["--gin", "gin/mixture.gin", "--gin", "gin/runs/tiny.gin"]
        + ["--bind", f"load_corpus.source = '{shakespeare}'"]
        + ["--bind", f"RunConfig.output_dir = '{tmp_path / 'runs'}'"]
        + [arg for binding in RUN_BINDINGS for arg in ("--bind", binding)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    # Kill it once it has logged 13 steps: past two checkpoints, before the third.
    deadline = time.monotonic() + 240
    metrics_files = []
    while time.monotonic() < deadline and first.poll() is None:
        metrics_files = list((tmp_path / "runs").glob(f"*/{train.METRICS_FILE}"))
        if metrics_files and len(metrics_files[0].read_text().splitlines()) >= 13:
            break
        time.sleep(0.01)
    assert first.poll() is None, "the run ended before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    run_dir = metrics_files[0].parent
    assert checkpoint.read_manifest(run_dir / "checkpoint")["step"] in (10, 15, 20)

    resumed = subprocess.run(
        command + ["--resume", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stderr

    # The same run without interruption, in this process on one thread as the CLI runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        experiment = build(components, shakespeare)
        train.train(
            experiment.model, experiment.corpus, experiment.train_config, NoHook(), tmp_path
        )
        val = train.validation_metrics(
            experiment.model, experiment.corpus, experiment.train_config, 2
        )
    finally:
        torch.set_num_threads(threads)

    # Same machine, same thread count, same order of operations: the figures agree to the
    # last bit; the tolerance only guards against formatting.
    records = train.read_metrics(run_dir)
    assert losses(records) == pytest.approx(losses(train.read_metrics(tmp_path)), rel=1e-12)
    assert sorted(losses(records)) == list(range(1, 25)), "each step logged exactly once"
    assert records[-1]["val/nelbo"] == pytest.approx(val["val/nelbo"], rel=1e-12)
    assert (run_dir / "samples.txt").exists()


def small_model(components, width=32):
    config.parse(["gin/mixture.gin", "gin/runs/tiny.gin"], [f"WIDTH = {width}"])
    torch.manual_seed(0)
    return config.configured("build_model")(vocab_size=9, seq_len=8, registry=components)


def test_a_save_killed_between_its_renames_leaves_the_newest_checkpoint(
    components, tmp_path, monkeypatch
):
    model = small_model(components)
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, model, step=5, trainer_state={"step": 5})

    # Die right after the old checkpoint is moved aside, before the new one takes its name.
    real_replace = os.replace

    def dies_on_second_rename(src, dst):
        if Path(src).name == ".checkpoint.partial":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(folder, model, step=10, trainer_state={"step": 10})
    monkeypatch.undo()
    assert not folder.exists()

    fresh = small_model(components)
    assert checkpoint.load_weights(folder, fresh)["step"] == 10, "readable before recovery"

    assert checkpoint.recover(folder) == folder
    assert checkpoint.read_manifest(folder)["step"] == 10
    assert checkpoint.load_trainer_state(folder) == {"step": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_save_killed_while_writing_keeps_the_previous_checkpoint(components, tmp_path):
    model = small_model(components)
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, model, step=5, trainer_state={"step": 5})
    partial = tmp_path / ".checkpoint.partial"
    partial.mkdir()
    (partial / checkpoint.WEIGHTS).write_bytes(b"half a file")

    assert checkpoint.recover(folder) == folder
    assert checkpoint.read_manifest(folder)["step"] == 5
    assert not partial.exists()


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(components, tmp_path):
    checkpoint.save(tmp_path / "checkpoint", small_model(components, width=32))
    with pytest.raises(CheckpointError, match="different model: .*shape .* there and .* here"):
        checkpoint.load_weights(tmp_path / "checkpoint", small_model(components, width=16))


def test_a_foreign_checkpoint_is_refused(components, tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / checkpoint.META).write_text(json.dumps({"format": "someone-else/3"}))
    with pytest.raises(CheckpointError, match="not a tarflow checkpoint"):
        checkpoint.load_weights(folder, small_model(components))

    (folder / checkpoint.META).unlink()
    (folder / checkpoint.WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="no manifest"):
        checkpoint.load_weights(folder, small_model(components))


def test_trainer_state_is_loaded_without_unpickling_code(components, tmp_path):
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, small_model(components), trainer_state={"step": 1})
    # A pickle that would run code on load; the manifest is made to match it.
    torch.save({"step": 1, "payload": Path("/")}, folder / checkpoint.TRAINER_STATE)
    manifest = json.loads((folder / checkpoint.META).read_text())
    manifest["files"][checkpoint.TRAINER_STATE] = {
        "bytes": (folder / checkpoint.TRAINER_STATE).stat().st_size,
        "sha256": checkpoint._sha256(folder / checkpoint.TRAINER_STATE),
    }
    (folder / checkpoint.META).write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoint.load_trainer_state(folder)


class CrashAt:
    """A plugin whose metrics hook fails at one step, as a crash in the middle of a run."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def tarflow_log_metrics(self, metrics, step):
        if step == self.step:
            raise RuntimeError("simulated crash")


def run_in_process(components, shakespeare, tmp_path, plugins, resume_dir=None, bindings=()):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = build(
        components,
        shakespeare,
        [
            f"RunConfig.output_dir = '{tmp_path / 'runs'}'",
            "RunConfig.track = True",
            f"RunConfig.tracking_uri = '{tracking}'",
            *bindings,
        ],
    )
    pm = registry.make_plugin_manager()
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    text = config.operative_config()
    return train.run_experiment(
        experiment.model,
        experiment.corpus,
        experiment.train_config,
        experiment.run_config,
        pm.hook,
        text,
        config.flat_bindings(text),
        resume_dir=resume_dir,
    )


def test_a_resumed_run_continues_its_mlflow_run(components, shakespeare, tmp_path):
    import mlflow
    from tarflow_plugins import mlflow_tracking

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_in_process(
            components,
            shakespeare,
            tmp_path,
            {"mlflow_tracking": mlflow_tracking, "crash": CrashAt(12)},
            bindings=["STEPS = 14"],
        )
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert checkpoint.read_manifest(run_dir / "checkpoint")["step"] == 10

    with pytest.raises(CheckpointError, match="different model or data: .*num_components"):
        run_in_process(
            components,
            shakespeare,
            tmp_path,
            {"mlflow_tracking": mlflow_tracking},
            resume_dir=run_dir,
            bindings=["STEPS = 14", "coupling.mixture.num_components = 3"],
        )
    summary = run_in_process(
        components,
        shakespeare,
        tmp_path,
        {"mlflow_tracking": mlflow_tracking},
        resume_dir=run_dir,
        bindings=["STEPS = 14"],
    )

    assert summary["run_dir"] == str(run_dir)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tarflow").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    history = client.get_metric_history(run.info.run_id, "train/nelbo")
    assert {m.step for m in history} == set(range(1, 15))
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id


class CrashingHook:
    """Stands in for the plugin relay: fails at one step, as a crash in the middle of a run."""

    def __init__(self, step=None):
        self.step = step

    def tarflow_log_metrics(self, metrics, step):
        if step == self.step:
            raise RuntimeError("simulated crash")


def test_a_progressive_run_resumes_inside_a_later_stage(components, shakespeare, tmp_path):
    bindings = ["STEPS = 20", "TrainConfig.progressive_shares = [2, 1, 1]"]

    def experiment():
        config.parse(
            ["gin/discrete.gin", "gin/runs/tiny.gin"],
            [f"load_corpus.source = '{shakespeare}'", *RUN_BINDINGS, *bindings],
        )
        return config.build_experiment(components)

    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    first = experiment()
    train.train(first.model, first.corpus, first.train_config, CrashingHook(), whole)
    second = experiment()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train(second.model, second.corpus, second.train_config, CrashingHook(17), crashed)
    assert checkpoint.read_manifest(crashed / "checkpoint")["step"] == 15  # inside stage 2

    third = experiment()
    train.train(
        third.model, third.corpus, third.train_config, CrashingHook(), crashed, resume=True
    )

    resumed, uninterrupted = train.read_metrics(crashed), train.read_metrics(whole)
    assert [r["train/stage"] for r in resumed] == [0] * 10 + [1] * 5 + [2] * 5
    assert [r["step"] for r in resumed] == list(range(1, 21))
    for got, expected in zip(resumed, uninterrupted, strict=True):
        got.pop("train/tokens_per_second"), expected.pop("train/tokens_per_second")
        assert got == expected


class LoggedRates:
    def __init__(self):
        self.rates = {}

    def tarflow_log_metrics(self, metrics, step):
        if "train/lr" in metrics:
            self.rates[step] = metrics["train/lr"]

    def tarflow_log_artifact(self, path):
        pass


def test_a_resume_follows_a_changed_learning_rate(components, shakespeare, tmp_path):
    first = build(components, shakespeare, ["STEPS = 10", "TrainConfig.log_every = 5"])
    train.train(first.model, first.corpus, first.train_config, NoHook(), tmp_path)

    # Resumed to train longer at a far lower rate: the optimiser's saved state must not keep
    # the old rate (the hint after a run of non-finite steps relies on this).
    longer = ["STEPS = 20", "TrainConfig.log_every = 5", "TrainConfig.lr = 1e-5"]
    resumed = build(components, shakespeare, longer)
    hook = LoggedRates()
    train.train(resumed.model, resumed.corpus, resumed.train_config, hook, tmp_path, resume=True)

    schedule = train.cosine_schedule(resumed.train_config)
    assert set(hook.rates) == {15, 20}
    for step, rate in hook.rates.items():
        assert rate == pytest.approx(1e-5 * schedule(step), rel=1e-9), step
