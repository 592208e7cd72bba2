"""Studies end to end on tiny models: run, resume, share a storage, fail, report, rerun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tarflow_core import study as studies
from tarflow_core.errors import ConfigError, TarflowError
from tarflow_core.study_report import write_report

REPO = Path(__file__).resolve().parent.parent
OPTUNA = str(Path(sys.executable).parent / "optuna")  # the command line installed with optuna

# A study small enough for a test: the affine model of gin/runs/tiny.gin, a dozen steps, a
# validation score every four (what the pruner sees).
STUDY_FILE = """
import optuna

QUESTION = "Which learning rate, on a model too small to matter?"
GIN_FILES = ["gin/affine.gin", "gin/runs/tiny.gin"]
BINDINGS = [
    "CORPUS = {corpus!r}",
    "STEPS = 12",
    "TrainConfig.eval_every = 4",
    "load_corpus.max_chars = 20_000",
    "RunConfig.num_samples = 0",
    "TrainConfig.iw_samples = 0",
]
TRIALS = 3

{space}
"""

LR_SPACE = """
def space(trial, registry):
    return {"TrainConfig.lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True)}


def pruner():
    return optuna.pruners.NopPruner()
"""

# One coupling that exists and one that does not: the second trial must fail on its own.
COUPLING_SPACE = """
def space(trial, registry):
    coupling = trial.suggest_categorical("coupling", ["affine", "no_such_coupling"])
    return {"build_model.couplings": [coupling] * 2}


def sampler():
    return optuna.samplers.BruteForceSampler(seed=0)
"""


def write_study(tmp_path, shakespeare, space, name="tiny_study") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(STUDY_FILE.format(corpus=shakespeare, space=space))
    return path


def storage_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def load(tmp_path, name="tiny_study") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(tmp_path))


def test_a_study_completes_resumes_and_reports(tmp_path, shakespeare, components):
    path = write_study(tmp_path, shakespeare, LR_SPACE)
    run = dict(storage_url=storage_url(tmp_path), track=False, output_dir=str(tmp_path / "runs"))

    studies.run_study(str(path), trials=2, **run)
    first = [(t.number, t.params, t.value) for t in load(tmp_path).trials]
    studies.run_study(str(path), trials=3, **run)
    resumed = load(tmp_path).trials
    studies.run_study(str(path), trials=3, **run)  # already complete: nothing new

    assert len(first) == 2 and len(resumed) == 3 and len(load(tmp_path).trials) == 3
    assert [(t.number, t.params, t.value) for t in resumed[:2]] == first
    for trial in resumed:
        assert trial.state == TrialState.COMPLETE and math.isfinite(trial.value)
        # Validation every 4 of 12 steps, the last being the trial's result.
        assert sorted(trial.intermediate_values) == [4, 8, 12]
        assert trial.intermediate_values[12] == trial.value
        assert trial.user_attrs["bindings"] == [f"TrainConfig.lr = {trial.params['lr']!r}"]

    # Optuna's own command line reads the storage as it is.
    best = subprocess.run(
        [OPTUNA, "best-trial", "--study-name", "tiny_study", "--storage", storage_url(tmp_path)]
        + ["--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert best.returncode == 0, best.stderr[-2000:]
    best_trial = min(resumed, key=lambda t: t.value)
    assert json.loads(best.stdout)["number"] == best_trial.number

    report = write_report("tiny_study", storage_url(tmp_path), tmp_path / "report")

    text = report.read_text()
    for trial in resumed:
        row = f"| {trial.number} | COMPLETE | {trial.params['lr']:.4f} | {trial.value:.4f} |"
        assert row in text
    assert "## Best configuration" in text and "## Parameter importances" in text
    for png in ("history.png", "curves.png", "val_nelbo_by_lr.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
        assert f"]({png})" in text


def test_resuming_with_other_bindings_is_refused(tmp_path, shakespeare, components):
    path = write_study(tmp_path, shakespeare, LR_SPACE)
    run = dict(storage_url=storage_url(tmp_path), track=False, output_dir=str(tmp_path / "runs"))
    studies.run_study(str(path), trials=1, **run)

    with pytest.raises(ConfigError, match="started with other settings"):
        studies.run_study(str(path), trials=2, bindings=["STEPS = 13"], **run)
    assert len(load(tmp_path).trials) == 1


def test_two_workers_share_one_storage(tmp_path, shakespeare):
    path = write_study(tmp_path, shakespeare, LR_SPACE)
    command = [
        sys.executable,
        "-m",
        "tarflow_core.study",
        "run",
        str(path),
        "--trials",
        "4",
        "--storage",
        storage_url(tmp_path),
        "--no-track",
        "--output-dir",
        str(tmp_path / "runs"),
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    workers = [subprocess.Popen(command, cwd=REPO, env=env, **pipes) for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]

    assert all(worker.returncode == 0 for worker in workers), [e[-2000:] for _, e in outputs]
    every = load(tmp_path).trials
    # Every trial is claimed once and finished: none lost (left running), none run twice. A
    # trial two workers raced past the total to start is stopped before it trains.
    trials = [t for t in every if studies.counts_toward_total(t)]
    surplus = [t for t in every if not studies.counts_toward_total(t)]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(t.user_attrs["reason"] == studies.SURPLUS for t in surplus)
    assert all("run_dir" not in t.user_attrs for t in surplus)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 4 and all(Path(d).is_dir() for d in run_dirs)


def test_a_failing_trial_is_recorded_and_the_study_goes_on_with_mlflow(
    tmp_path, shakespeare, components, monkeypatch
):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow keeps artifacts beside the working directory
    path = write_study(tmp_path, shakespeare, COUPLING_SPACE)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"

    studies.run_study(
        str(path),
        storage_url(tmp_path),
        trials=2,
        tracking_uri=tracking,
        output_dir=str(tmp_path / "runs"),
    )

    study = load(tmp_path)
    by_state = {t.state: t for t in study.trials}
    assert set(by_state) == {TrialState.COMPLETE, TrialState.FAIL}
    failed, done = by_state[TrialState.FAIL], by_state[TrialState.COMPLETE]
    assert "no coupling named 'no_such_coupling'" in failed.user_attrs["reason"]

    # One parent run, one nested run per trial, the failure's reason on the failed one.
    client = MlflowClient(tracking)
    parent = study.user_attrs["mlflow_parent_run_id"]
    for trial in (failed, done):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["optuna.trial"] == str(trial.number)
    failed_run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert failed_run.info.status == "FAILED"
    assert "no_such_coupling" in failed_run.data.tags["optuna.reason"]
    done_run = client.get_run(done.user_attrs["mlflow_run_id"])
    assert done_run.data.params["build_model.couplings"] == "['affine', 'affine']"
    assert done_run.data.params["trial/coupling"] == "affine"
    curve = client.get_metric_history(done_run.info.run_id, "val/nelbo")
    assert sorted(m.step for m in curve) == [4, 8, 12]

    # Rerun the completed trial from nothing but its MLflow run id.
    summary, new_run = studies.rerun(
        done_run.info.run_id, tracking, [f"RunConfig.output_dir = '{tmp_path / 'again'}'"]
    )
    mlflow.end_run()

    assert summary["val"]["val/nelbo"] == pytest.approx(done.value, rel=1e-9)
    assert client.get_run(new_run).data.tags["tarflow.rerun_of"] == done_run.info.run_id


def test_a_diverging_trial_fails_with_its_reason():
    study = optuna.create_study()
    trial = study.ask()
    reporter = studies.TrialReporter(trial, last_step=100)

    reporter.tarflow_log_metrics({"val/nelbo": 3.0}, step=50)
    with pytest.raises(studies.TrialDiverged, match="val/nelbo is nan at step 60"):
        reporter.tarflow_log_metrics({"val/nelbo": float("nan")}, step=60)
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {50: 3.0}


def test_the_reporter_prunes_before_the_last_step_only():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    reporter = studies.TrialReporter(trial, last_step=100)

    reporter.tarflow_log_metrics({"val/nelbo": 2.0}, step=100)  # the result, never pruned
    with pytest.raises(optuna.TrialPruned, match="pruned at step 50"):
        reporter.tarflow_log_metrics({"val/nelbo": 2.0}, step=50)


def test_the_builtin_studies_load_and_draw_bindings(components):
    for name in ("couplings", "mixture_size", "depth_direction"):
        spec = studies.load_study_spec(name)
        with studies.no_experimental_warnings():
            trial = optuna.create_study(sampler=spec.sampler()).ask()

        bindings = studies.trial_bindings(spec, trial, components)

        assert spec.question.endswith("?") and bindings
        assert all(" = " in b for b in bindings)
    couplings = studies.load_study_spec("couplings")
    trial = optuna.create_study().ask()
    couplings.space(trial, components)
    assert trial.distributions["coupling"].choices == tuple(components.names("coupling"))


def test_the_command_line_names_unknown_studies(capsys):
    assert studies.main(["run", "no_such_study", "--no-track"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no study named 'no_such_study'")
    assert "couplings" in error


def test_a_bad_storage_url_is_a_tarflow_error(tmp_path, shakespeare, components):
    path = write_study(tmp_path, shakespeare, LR_SPACE)
    with pytest.raises(TarflowError, match="study storage"):
        studies.run_study(str(path), "nosuchdialect://x", track=False)


@pytest.mark.parametrize("sampler", ["TPESampler(seed=0)", "BruteForceSampler(seed=0)"])
def test_a_study_whose_registry_choices_changed_is_refused_before_any_trial(
    tmp_path, shakespeare, components, monkeypatch, sampler
):
    space = f"""
import os


def space(trial, registry):
    names = ["affine", "mixture"] + (["added"] if os.environ.get("TARFLOW_TEST_ADDED") else [])
    return {{"build_model.couplings": [trial.suggest_categorical("coupling", names)] * 2}}


def sampler():
    return optuna.samplers.{sampler}
"""
    path = write_study(tmp_path, shakespeare, space)
    run = dict(storage_url=storage_url(tmp_path), track=False, output_dir=str(tmp_path / "runs"))
    studies.run_study(str(path), trials=1, **run)

    monkeypatch.setenv("TARFLOW_TEST_ADDED", "1")  # as if a plugin had been installed
    with pytest.raises(ConfigError, match=r"coupling was \[affine, mixture\], is now"):
        studies.run_study(str(path), trials=3, **run)

    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE]


def test_a_space_that_changes_under_a_trial_stops_the_study(tmp_path, shakespeare, components):
    # A space the stand-in trial cannot read is left to the trials, which stop the study.
    space = """
def space(trial, registry):
    names = ["affine", "mixture"] + (["added"] if trial.number > 0 else [])
    return {"build_model.couplings": [trial.suggest_categorical("coupling", names)] * 2}
"""
    path = write_study(tmp_path, shakespeare, space)
    run = dict(storage_url=storage_url(tmp_path), track=False, output_dir=str(tmp_path / "runs"))

    studies.run_study(str(path), trials=3, **run)

    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert "changed since it started" in trials[1].user_attrs["reason"]


def no_studies_in(url: str) -> bool:
    return optuna.get_all_study_summaries(optuna.storages.RDBStorage(url)) == []


def test_an_unusable_tracking_store_is_refused_before_the_study_exists(
    tmp_path, shakespeare, components, monkeypatch
):
    path = write_study(tmp_path, shakespeare, LR_SPACE)
    run = dict(storage_url=storage_url(tmp_path), output_dir=str(tmp_path / "runs"))

    # Nothing listens on the discard port: refused in seconds, not after MLflow's retries.
    with pytest.raises(TarflowError, match="cannot be reached"):
        studies.run_study(str(path), tracking_uri="http://127.0.0.1:9", **run)
    assert no_studies_in(storage_url(tmp_path))

    # A failure after the study was created takes the new study with it.
    def broken_parent_run(*args):
        raise RuntimeError("store broke")

    monkeypatch.setattr(studies, "ensure_parent_run", broken_parent_run)
    with pytest.raises(TarflowError, match="store broke"):
        studies.run_study(str(path), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", **run)
    assert no_studies_in(storage_url(tmp_path))

    # A rerun reads a store: a missing one is refused, not created empty.
    missing = tmp_path / "missing.db"
    with pytest.raises(TarflowError, match="no database"):
        studies.rerun("0123abcd", f"sqlite:///{missing}")
    assert not missing.exists()


INTERRUPTING_SPACE = """
import os
from pathlib import Path


def space(trial, registry):
    lr = trial.suggest_float("lr", 1e-3, 1e-2, log=True)
    marker = Path(os.environ["TARFLOW_TEST_MARKER"])
    if trial.number == 1 and not marker.exists():
        marker.touch()
        raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the second trial
    return {"TrainConfig.lr": lr}
"""


def test_ctrl_c_stops_cleanly_and_the_rerun_replaces_the_interrupted_trial(
    tmp_path, shakespeare, components, monkeypatch, capsys
):
    import logging

    monkeypatch.setenv("TARFLOW_TEST_MARKER", str(tmp_path / "interrupted"))
    path = write_study(tmp_path, shakespeare, INTERRUPTING_SPACE)
    command = ["run", str(path), "--trials", "2", "--storage", storage_url(tmp_path)]
    command += ["--no-track", "--output-dir", str(tmp_path / "runs"), "--log-level", "ERROR"]
    optuna_records = []
    handler = logging.Handler()
    handler.emit = optuna_records.append
    logging.getLogger("optuna").addHandler(handler)
    try:
        interrupted = studies.main(command)
    finally:
        logging.getLogger("optuna").removeHandler(handler)

    assert interrupted == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume the study\n"
    assert not [r for r in optuna_records if r.exc_info], "Optuna logged a traceback"
    first, stopped, queued = load(tmp_path).trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
    assert queued.state == TrialState.WAITING

    assert studies.main(command) == 0

    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL] + [
        TrialState.COMPLETE
    ]
    # The replacement tries the interrupted configuration again, and counts in its place.
    assert trials[2].params == stopped.params and trials[2].user_attrs["replaces_trial"] == 1
    assert studies.counted_trials(load(tmp_path)) == 2


ALWAYS_FAILING_SPACE = """
def space(trial, registry):
    return {"build_model.couplings": [trial.suggest_categorical("c", ["no_such"])] * 2}
"""


def test_settings_every_trial_shares_are_checked_before_the_study_starts(
    tmp_path, shakespeare, components, capsys
):
    path = write_study(tmp_path, shakespeare, LR_SPACE)
    not_callable = write_study(tmp_path, shakespeare, "space = {'lr': 0.01}", name="bad")
    common = ["--storage", storage_url(tmp_path), "--no-track", "--log-level", "ERROR"]
    runs = ["--output-dir", str(tmp_path / "runs")]
    refused = {
        "no such file or folder": [str(path), *common, *runs, "--bind", "CORPUS = '/no.txt'"],
        "cannot write their runs": [str(path), *common, "--output-dir", "/proc/nope"],
        "is a dict, not a function": [str(not_callable), *common, *runs],
        "cannot be a folder name": [str(path), *common, *runs, "--study-name", "../../x"],
    }
    for message, arguments in refused.items():
        assert studies.main(["run", *arguments]) == 2, message
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert no_studies_in(storage_url(tmp_path))

    # Trials that ran and all failed: a failure of the command, saying so.
    failing = write_study(tmp_path, shakespeare, ALWAYS_FAILING_SPACE, name="failing")
    assert studies.main(["run", str(failing), "--trials", "2", *common, *runs]) == 1
    assert "no trial of study failing completed" in capsys.readouterr().err
    assert studies.check_study_name("tiny-study_2") is None


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "soon"])
def test_the_timeout_must_be_a_positive_number(timeout, capsys):
    with pytest.raises(SystemExit):
        studies.parse_args(["run", "couplings", "--timeout", timeout])
    assert "expected a positive number of seconds" in capsys.readouterr().err
    assert studies.parse_args(["run", "couplings", "--timeout", "1.5"]).timeout == 1.5


def test_report_refuses_a_missing_storage_and_an_unwritable_folder(tmp_path, capsys):
    url = storage_url(tmp_path)
    optuna.create_study(study_name="empty", storage=url)
    missing = tmp_path / "nonexist.db"
    a_file = tmp_path / "taken"
    a_file.write_text("")
    refused = {
        "no database": ["--storage", f"sqlite:///{missing}"],
        "is a file": ["--storage", url, "--out", str(a_file)],
        "cannot write the report": ["--storage", url, "--out", "/proc/nope"],
    }
    for message, arguments in refused.items():
        assert studies.main(["report", "empty", *arguments]) == 2, message
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error
    assert not missing.exists()

    # A study without trials reads as one.
    assert studies.main(["report", "empty", "--storage", url, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "- trials: none yet" in text and "()" not in text
    assert "No trial has started yet." in text and "| # |" not in text


def test_a_trial_started_past_the_total_is_surplus_and_not_counted():
    study = optuna.create_study()
    for value in (1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(value=value))
    racing = study.ask()  # another worker's count said one more was needed

    assert studies.is_surplus(racing, total=2)
    assert not studies.is_surplus(racing, total=3)
    racing.set_user_attr("reason", studies.SURPLUS)
    study.tell(racing, state=TrialState.PRUNED)
    assert studies.counted_trials(study) == 2


@pytest.mark.parametrize(
    "line, message",
    [("TRIALS = 'two'", "TRIALS in study file"), ("TIMEOUT_SECONDS = 0", "TIMEOUT_SECONDS in")],
)
def test_a_study_file_with_a_bad_budget_is_refused(tmp_path, shakespeare, line, message):
    path = write_study(tmp_path, shakespeare, LR_SPACE + "\n" + line + "\n")

    with pytest.raises(ConfigError, match=message):
        studies.load_study_spec(str(path))


def test_an_empty_study_name_is_refused_not_replaced(tmp_path, shakespeare, components):
    path = write_study(tmp_path, shakespeare, LR_SPACE)

    with pytest.raises(ConfigError, match="cannot be a folder name"):
        studies.run_study(str(path), storage_url(tmp_path), study_name="", track=False)
    assert not (tmp_path / "studies.db").exists()
