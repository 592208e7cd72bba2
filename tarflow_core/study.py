"""Ablation studies: Optuna searches over gin bindings, every trial trained by the main harness.

A study file (`studies/NAME.py`) states its question, the gin files of its base experiment and
its search space as a function `space(trial, registry) -> {gin selector: value}`. Each trial
parses those files plus its bindings and trains through `train.run_experiment`, exactly as
`python -m tarflow_core.run` would; validation NELBO reaches Optuna through the
`tarflow_log_metrics` hook, where the pruner may stop the trial.

    python -m tarflow_core.study run couplings --trials 8 --storage sqlite:///studies.db
    python -m tarflow_core.study report couplings --storage sqlite:///studies.db
    python -m tarflow_core.study rerun MLFLOW_RUN_ID --tracking-uri sqlite:///mlflow.db
"""

import argparse
import contextlib
import errno
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tarflow_core import config, registry
from tarflow_core.errors import ConfigError, DataError, TarflowError
from tarflow_core.hookspecs import hookimpl
from tarflow_core.tracking import check_existing_store, check_reachable, refuse_file_store
from tarflow_core.train import run_experiment

logger = logging.getLogger(__name__)

# The study files of a source checkout, searched after the working directory.
PROJECT_STUDY_DIR = Path(__file__).resolve().parent.parent / "studies"

OBJECTIVE = "val/nelbo"  # nats per token, lower is better

# Keys of the study's and trials' user attributes.
PARENT_RUN = "mlflow_parent_run_id"
STUDY_SETUP = "setup"
TRIAL_BINDINGS = "bindings"
TRIAL_RUN = "mlflow_run_id"
TRIAL_RUN_DIR = "run_dir"
TRIAL_REASON = "reason"
TRIAL_REPLACES = "replaces_trial"

# The reason of a trial stopped by Ctrl-C. It does not count toward the study's total, and its
# configuration is queued to be tried again, so rerunning the command completes the study.
INTERRUPTED = "interrupted"

# The reason of a trial that another worker's started while the study already held its total
# (each worker decides to go on before the other's trial exists). It stops without training
# and does not count.
SURPLUS = "surplus: the study held its total of trials when this one started"

# Characters of the corpus read before a study starts, to check that it loads at all.
CORPUS_PROBE_CHARS = 20_000

# A worker that died without telling the storage leaves its trial RUNNING; the heartbeat lets
# the next worker find it and mark it failed.
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180

# How long a worker that did not create the study waits for the creator to record the MLflow
# parent run, before it creates one itself (the creator may have died in between).
PARENT_WAIT_SECONDS = 30


class TrialDiverged(TarflowError):
    """A trial whose validation bound stopped being a finite number."""


class StudyInterrupted(BaseException):
    """Ctrl-C during a trial, after the trial was recorded as interrupted.

    Not a KeyboardInterrupt: Optuna catches those and logs them with a traceback, while a
    BaseException of another kind passes through `study.optimize` untouched.
    """


@dataclass
class StudySpec:
    """A study as its file states it."""

    name: str
    path: Path
    question: str
    gin_files: list[str]
    bindings: list[str]
    space: object  # (trial, registry) -> dict[str, object]
    trials: int
    timeout: float | None
    sampler: object  # () -> optuna.samplers.BaseSampler
    pruner: object  # () -> optuna.pruners.BasePruner
    report_params: list[str] = field(default_factory=list)


def resolve_study_file(name: str) -> Path:
    """A study by name (`couplings`) or path (`studies/couplings.py`, `my_study.py`)."""
    candidates = [Path(name), Path("studies") / f"{name}.py", PROJECT_STUDY_DIR / f"{name}.py"]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".py":
            return candidate.resolve()
    known = sorted(p.stem for p in PROJECT_STUDY_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise ConfigError(f"no study named {name!r}", hint=f"studies: {', '.join(known) or 'none'}")


def load_study_spec(name: str) -> StudySpec:
    """Import a study file and check it states what a study needs."""
    path = resolve_study_file(name)
    spec = importlib.util.spec_from_file_location(f"tarflow_study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ConfigError(
            f"study file {str(path)!r} fails to import: {type(error).__name__}: {error}",
            hint="fix the study file",
        ) from None
    for required in ("QUESTION", "GIN_FILES", "space"):
        if not hasattr(module, required):
            raise ConfigError(
                f"study file {str(path)!r} does not define {required}",
                hint="a study defines QUESTION, GIN_FILES and space(trial, registry)",
            )
    for function in ("space", "sampler", "pruner"):
        if hasattr(module, function) and not callable(getattr(module, function)):
            raise ConfigError(
                f"{function} in study file {str(path)!r} is a "
                f"{type(getattr(module, function)).__name__}, not a function",
                hint=f"define it as def {function}(...): see the study files in studies/",
            )
    trials = getattr(module, "TRIALS", 8)
    timeout = getattr(module, "TIMEOUT_SECONDS", None)
    if not (isinstance(trials, int) and trials >= 1):
        raise ConfigError(
            f"TRIALS in study file {str(path)!r} is {trials!r}, not a whole number of trials",
            hint="write e.g. TRIALS = 8",
        )
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise ConfigError(
            f"TIMEOUT_SECONDS in study file {str(path)!r} is {timeout!r}, not a positive "
            "number of seconds",
            hint="write e.g. TIMEOUT_SECONDS = 3600, or None for no limit",
        )
    return StudySpec(
        name=path.stem,
        path=path,
        question=module.QUESTION,
        gin_files=list(module.GIN_FILES),
        bindings=list(getattr(module, "BINDINGS", [])),
        space=module.space,
        trials=trials,
        timeout=timeout,
        sampler=getattr(module, "sampler", default_sampler),
        pruner=getattr(module, "pruner", default_pruner),
        report_params=list(getattr(module, "REPORT_PARAMS", [])),
    )


def default_sampler() -> optuna.samplers.BaseSampler:
    # No fixed seed: workers sharing a study would all propose the same configurations.
    return optuna.samplers.TPESampler()


def default_pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=2)


def binding_text(selector: str, value) -> str:
    """One gin binding from a selector and a Python value (strings, numbers, lists)."""
    return f"{selector} = {value!r}"


@contextlib.contextmanager
def no_experimental_warnings():
    """Optuna flags long-standing features (heartbeats, brute force) as experimental."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str, attempts: int = 3) -> optuna.storages.RDBStorage:
    """An Optuna storage on any SQLAlchemy URL, with heartbeats so lost trials get failed."""
    import sqlalchemy.exc

    try:
        for attempt in range(attempts):
            try:
                with no_experimental_warnings():
                    return optuna.storages.RDBStorage(
                        url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS
                    )
            except sqlalchemy.exc.DBAPIError:
                # Workers started together on a new database race to create its tables; the
                # loser finds them made on its next try.
                if attempt == attempts - 1:
                    raise
                time.sleep(1.0 + attempt)
    except Exception as error:  # SQLAlchemy's errors for bad URLs, missing drivers, locks
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"study storage {url!r} is not usable: {type(error).__name__}: {first[:200]}",
            hint="give a SQLAlchemy URL such as sqlite:///studies.db",
        ) from None


@dataclass
class StudySetup:
    """What every worker of a study must agree on, kept in the study's user attributes."""

    study: str
    question: str
    gin_files: list[str]
    bindings: list[str]
    track: bool
    tracking_uri: str
    experiment: str
    output_dir: str

    # Workers on several machines may write their run folders to different places.
    MAY_DIFFER = ("output_dir",)

    def as_attr(self) -> dict:
        return dict(vars(self))


def open_study(spec: StudySpec, storage, study_name: str, setup: StudySetup, components):
    """Create the study, or load it to resume or to join other workers.

    Returns (study, created). A resumed study must be run with the setup it started with:
    trials trained on other bindings would not be comparable.
    """
    with no_experimental_warnings():
        make = {
            "storage": storage,
            "study_name": study_name,
            "direction": "minimize",
            "sampler": spec.sampler(),
            "pruner": spec.pruner(),
        }
    try:
        # Creation is atomic in the storage: exactly one worker gets here first.
        study = optuna.create_study(**make)
        study.set_user_attr(STUDY_SETUP, setup.as_attr())
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            storage=storage, study_name=study_name, sampler=make["sampler"], pruner=make["pruner"]
        )
    check_space_unchanged(spec, study, components)
    stored = study.user_attrs.get(STUDY_SETUP)
    if stored is not None:
        differences = [
            k
            for k, v in setup.as_attr().items()
            if k not in StudySetup.MAY_DIFFER and stored.get(k) != v
        ]
        if differences:
            raise ConfigError(
                f"study {study_name!r} was started with other settings: "
                + "; ".join(f"{k} was {stored.get(k)!r}" for k in differences),
                hint="run it with the same options, or give --study-name for a new study",
            )
    return study, False


class RecordingTrial:
    """Stands in for a trial to learn which distributions a study's space asks for."""

    def __init__(self):
        self.distributions = {}

    def suggest_categorical(self, name, choices):
        self.distributions[name] = optuna.distributions.CategoricalDistribution(choices)
        return self.distributions[name].choices[0]

    def suggest_int(self, name, low, high, *, step=1, log=False):
        self.distributions[name] = optuna.distributions.IntDistribution(low, high, log, step)
        return low

    def suggest_float(self, name, low, high, *, step=None, log=False):
        self.distributions[name] = optuna.distributions.FloatDistribution(low, high, log, step)
        return low


def check_space_unchanged(spec: StudySpec, study: optuna.Study, components) -> None:
    """Refuse to resume a study whose space now asks for other distributions than its trials
    were drawn from: choices taken from the registry change when a plugin is installed or
    removed, and every further trial would fail on it (or, with some samplers, be drawn from
    a space the earlier trials never saw)."""
    recorder = RecordingTrial()
    try:
        spec.space(recorder, components)
    except Exception:  # a space that needs more of a trial than this stand-in has
        return  # the trials themselves then tell, and stop the study
    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            new = recorder.distributions.get(name)
            if new is not None and new != old:
                raise ConfigError(
                    f"the choices of study {study.study_name!r} changed since it started: "
                    f"{name} was {describe_distribution(old)}, is now "
                    f"{describe_distribution(new)} (a plugin installed or removed?)",
                    hint="give --study-name to start a new study with what is installed now",
                )


def describe_distribution(distribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return "[" + ", ".join(map(str, distribution.choices)) + "]"
    return repr(distribution)


class TrialReporter:
    """A plugin registered for one trial: validation NELBO to Optuna, and pruning.

    It raises from inside `tarflow_log_metrics`, which stops training where it is; the
    harness then closes the run (and its MLflow run) as failed.
    """

    def __init__(self, trial: optuna.Trial, last_step: int):
        self.trial = trial
        self.last_step = last_step
        self.mlflow_run_id: str | None = None
        self.run_dir: str | None = None

    @hookimpl(trylast=True)
    def tarflow_run_started(self, run):
        # Called after the tracker opened its run, so the active MLflow run is the trial's.
        self.run_dir = str(run.run_dir)
        self.trial.set_user_attr(TRIAL_RUN_DIR, self.run_dir)
        if run.track:
            import mlflow

            active = mlflow.active_run()
            if active is not None:
                self.mlflow_run_id = active.info.run_id
                self.trial.set_user_attr(TRIAL_RUN, self.mlflow_run_id)
                mlflow.set_tags(
                    {
                        "optuna.study": self.trial.study.study_name,
                        "optuna.trial": str(self.trial.number),
                        "tarflow.trial_bindings": "\n".join(
                            self.trial.user_attrs.get(TRIAL_BINDINGS, [])
                        ),
                    }
                )
                mlflow.log_params({f"trial/{k}": v for k, v in self.trial.params.items()})

    @hookimpl
    def tarflow_log_metrics(self, metrics, step):
        if OBJECTIVE not in metrics:
            return
        value = metrics[OBJECTIVE]
        if not math.isfinite(value):
            raise TrialDiverged(
                f"{OBJECTIVE} is {value} at step {step}",
                hint="lower TrainConfig.lr or tighten TrainConfig.grad_clip",
            )
        self.trial.report(value, step)
        # The last evaluation is the trial's result: stopping there would only discard it.
        if step < self.last_step and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {OBJECTIVE} {value:.4f}")


def trial_bindings(spec: StudySpec, trial: optuna.Trial, components) -> list[str]:
    """The gin bindings the study's space gives this trial."""
    try:
        chosen = spec.space(trial, components)
    except ValueError as error:
        # Optuna's words when a choice list differs from the study's: distributions for most
        # samplers, the search space for the brute-force one.
        if not any(m in str(error) for m in ("dynamic value space", "search_space mismatch")):
            raise
        # Choices drawn from the registry changed since the study began: every further
        # trial would fail the same way.
        trial.study.stop()
        raise ConfigError(
            f"the choices of study {trial.study.study_name!r} changed since it started "
            "(a plugin was installed or removed)",
            hint="give --study-name to start a new study with the components installed now",
        ) from None
    if not isinstance(chosen, dict):
        raise ConfigError(
            f"space() of study {spec.name!r} returned {type(chosen).__name__}, not a dict",
            hint="return {gin selector: value}, e.g. {'MIX_K': 8}",
        )
    return [binding_text(selector, value) for selector, value in chosen.items()]


def run_bindings(setup: StudySetup, run_name: str) -> list[str]:
    """Where the harness writes and tracks a trial: after the study's bindings, so they win."""
    return [
        binding_text("RunConfig.name", run_name),
        binding_text("RunConfig.output_dir", setup.output_dir),
        binding_text("RunConfig.track", setup.track),
        binding_text("RunConfig.tracking_uri", setup.tracking_uri),
        binding_text("RunConfig.experiment", setup.experiment),
    ]


def train_from_gin(pm, components, gin_files, bindings, extra_plugin=None) -> dict:
    """Parse, build and train one run through the main harness; its summary."""
    config.parse(gin_files, bindings)
    experiment = config.build_experiment(components)
    operative = config.operative_config()
    if extra_plugin is not None:
        registry.register_plugin(pm, extra_plugin, f"tarflow-study-{id(extra_plugin)}")
    try:
        return run_experiment(
            experiment.model,
            experiment.corpus,
            experiment.train_config,
            experiment.run_config,
            pm.hook,
            operative,
            config.flat_bindings(operative),
        )
    finally:
        if extra_plugin is not None:
            pm.unregister(extra_plugin)


def describe(error: BaseException) -> str:
    """A failure reason in one line, fit for a table cell."""
    if isinstance(error, TarflowError):
        return f"{type(error).__name__}: {error.one_line()}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300]


class Objective:
    """Train one trial, return its final validation NELBO, record why it did not finish."""

    def __init__(
        self, spec: StudySpec, setup: StudySetup, pm, components, parent_run_id, total: int
    ):
        self.spec, self.setup = spec, setup
        self.pm, self.components = pm, components
        self.parent_run_id = parent_run_id
        self.total = total

    def __call__(self, trial: optuna.Trial) -> float:
        if is_surplus(trial, self.total):
            trial.set_user_attr(TRIAL_REASON, SURPLUS)
            logger.info("trial %d not run: the study already holds %d", trial.number, self.total)
            trial.study.stop()
            raise optuna.TrialPruned(SURPLUS)
        reporter = None
        try:
            bindings = trial_bindings(self.spec, trial, self.components)
            trial.set_user_attr(TRIAL_BINDINGS, bindings)
            logger.info("trial %d: %s", trial.number, "; ".join(bindings))
            all_bindings = [
                *self.setup.bindings,
                *bindings,
                *run_bindings(self.setup, f"{self.spec.name}-t{trial.number}"),
            ]

            # The step count is only known once gin is parsed; the reporter needs it.
            config.parse(self.setup.gin_files, all_bindings)
            last_step = config.configured("TrainConfig")().steps
            reporter = TrialReporter(trial, last_step)
            summary = train_from_gin(
                self.pm, self.components, self.setup.gin_files, all_bindings, reporter
            )
            value = summary["val"][OBJECTIVE]
            if not math.isfinite(value):
                raise TrialDiverged(f"final {OBJECTIVE} is {value}", hint="lower TrainConfig.lr")
            return value
        except optuna.TrialPruned as pruned:
            self.record(trial, reporter, "PRUNED", str(pruned))
            raise
        except Exception as error:
            self.record(trial, reporter, "FAIL", describe(error))
            raise
        except KeyboardInterrupt:
            self.interrupted(trial, reporter)
            raise StudyInterrupted from None

    def interrupted(self, trial: optuna.Trial, reporter) -> None:
        """Fail a trial stopped by Ctrl-C as interrupted, and queue its configuration again.

        The trial is told here because Optuna never sees it end: `StudyInterrupted` passes
        through `study.optimize` without Optuna's failure log and its traceback.
        """
        self.record(trial, reporter, "FAIL", INTERRUPTED)
        if trial.params:
            trial.study.enqueue_trial(trial.params, user_attrs={TRIAL_REPLACES: trial.number})
        trial.study.tell(trial, state=TrialState.FAIL)

    def record(self, trial, reporter, state: str, reason: str) -> None:
        """Keep why a trial stopped in its user attributes and in its MLflow run."""
        trial.set_user_attr(TRIAL_REASON, reason)
        logger.warning("trial %d %s: %s", trial.number, state.lower(), reason)
        if not self.setup.track or self.parent_run_id is None:
            return
        try:
            record_in_mlflow(self.setup, self.parent_run_id, trial, reporter, state, reason)
        except Exception as error:  # tracking trouble must not hide the trial's own failure
            logger.warning("could not record trial %d in MLflow: %s", trial.number, error)


def record_in_mlflow(setup, parent_run_id, trial, reporter, state, reason) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(setup.tracking_uri)
    tags = {"optuna.state": state, "optuna.reason": reason[:5000]}
    run_id = reporter.mlflow_run_id if reporter is not None else None
    if run_id is None:
        # The trial failed before training started: give it a run of its own anyway, so
        # MLflow shows every trial of the study.
        parent = client.get_run(parent_run_id)
        run = client.create_run(
            parent.info.experiment_id,
            run_name=f"{trial.study.study_name}-t{trial.number}",
            tags={
                "mlflow.parentRunId": parent_run_id,
                "optuna.study": trial.study.study_name,
                "optuna.trial": str(trial.number),
                "tarflow.trial_bindings": "\n".join(trial.user_attrs.get(TRIAL_BINDINGS, [])),
            },
        )
        run_id = run.info.run_id
        trial.set_user_attr(TRIAL_RUN, run_id)
        client.set_terminated(run_id, status="FAILED")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def counts_toward_total(trial: optuna.trial.FrozenTrial) -> bool:
    """Every trial counts toward `--trials` but interrupted ones and those queued to replace
    them, so the rerun of an interrupted command trains what is missing, and surplus ones."""
    if trial.state == TrialState.WAITING:
        return False
    reason = trial.user_attrs.get(TRIAL_REASON)
    if trial.state == TrialState.FAIL and reason == INTERRUPTED:
        return False
    return not (trial.state == TrialState.PRUNED and reason == SURPLUS)


def is_surplus(trial: optuna.Trial, total: int) -> bool:
    """Whether the trials numbered before this one already make the total. Storages number
    trials atomically, so of two workers racing past the total the later trial yields."""
    earlier = [
        t
        for t in trial.study.get_trials(deepcopy=False)
        if t.number < trial.number and counts_toward_total(t)
    ]
    return len(earlier) >= total


def counted_trials(study: optuna.Study) -> int:
    return sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False))


class StopAtTotal:
    """An Optuna callback that stops a worker once the study holds its total of trials.

    Running trials of other workers count too, so N workers stop at the same total.
    """

    def __init__(self, total: int):
        self.total = total

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if counted_trials(study) >= self.total:
            study.stop()


def check_study_name(name: str) -> None:
    """A study's name becomes the folder of its runs: refuse one that leads anywhere else."""
    separators = [s for s in ("/", "\\", os.sep, os.altsep) if s]
    if not name.strip() or name.startswith(".") or any(s in name for s in separators):
        raise ConfigError(
            f"study name {name!r} cannot be a folder name",
            hint="use letters, digits, '-' and '_', without path separators or a leading dot",
        )


def check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be made or written to, without making it."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".tarflow-write-check-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"trials cannot write their runs under {str(folder)!r}: "
            f"{str(existing)!r}: {error.strerror or error}",
            hint="give --output-dir a folder you can write to",
        ) from None


def check_corpus_loads() -> None:
    """Read the start of the corpus the parsed gin files name, once, before any trial."""
    try:
        config.configured("load_corpus")(max_chars=CORPUS_PROBE_CHARS)
    except DataError:
        raise
    except Exception as error:
        # A study may bind its corpus per trial (a macro the base files leave unbound): its
        # trials check it.
        logger.debug("corpus not checked before the study: %s", describe(error))


def ensure_parent_run(study, storage, setup: StudySetup, created: bool) -> str | None:
    """The MLflow run every trial nests under, shared by all workers of the study."""
    if not setup.track:
        return None
    parent = study.user_attrs.get(PARENT_RUN)
    if parent is None and not created:
        deadline = time.monotonic() + PARENT_WAIT_SECONDS
        while parent is None and time.monotonic() < deadline:
            time.sleep(0.5)
            parent = optuna.load_study(
                study_name=study.study_name, storage=storage
            ).user_attrs.get(PARENT_RUN)
    if parent is not None:
        return parent

    import mlflow

    mlflow.set_tracking_uri(setup.tracking_uri)
    experiment = mlflow.set_experiment(setup.experiment)
    client = mlflow.tracking.MlflowClient(setup.tracking_uri)
    run = client.create_run(
        experiment.experiment_id,
        run_name=study.study_name,
        tags={"optuna.study": study.study_name, "tarflow.question": setup.question},
    )
    client.log_param(run.info.run_id, "study", setup.study)
    client.log_param(run.info.run_id, "gin_files", ", ".join(setup.gin_files))
    client.log_param(run.info.run_id, "bindings", "\n".join(setup.bindings)[:6000])
    study.set_user_attr(PARENT_RUN, run.info.run_id)
    return run.info.run_id


def run_study(
    name: str,
    storage_url: str,
    trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    bindings: list[str] = (),
    track: bool = True,
    tracking_uri: str = "sqlite:///mlflow.db",
    output_dir: str = "runs/studies",
) -> optuna.Study:
    """Run (or resume, or join) a study until it holds `trials` trials in all.

    Several workers may run this on one storage: each trial is claimed by one worker, and the
    workers stop once the study holds the total, whatever state the trials ended in (but
    trials interrupted by Ctrl-C, which are tried again). Everything the trials share is
    checked first; a start that fails leaves no study behind.
    """
    spec = load_study_spec(name)
    total = spec.trials if trials is None else trials
    study_name = spec.name if study_name is None else study_name
    check_study_name(study_name)
    pm, components = registry.load()
    config.setup(components)
    setup = StudySetup(
        study=spec.name,
        question=spec.question,
        gin_files=spec.gin_files,
        bindings=[*spec.bindings, *bindings],
        track=track,
        tracking_uri=tracking_uri,
        experiment=f"study-{study_name}",
        output_dir=str(Path(output_dir) / study_name),
    )

    # What every trial shares is checked before the study exists: a bad setting would fail
    # every trial, and a study created with it would refuse the corrected command.
    config.parse(setup.gin_files, setup.bindings)
    check_corpus_loads()
    check_writable(Path(setup.output_dir))
    if track:
        refuse_file_store(tracking_uri)
        check_reachable(
            tracking_uri, hint="start the server, fix --tracking-uri or give --no-track"
        )

    storage = open_storage(storage_url)
    study, created = open_study(spec, storage, study_name, setup, components)
    try:
        parent_run_id = ensure_parent_run(study, storage, setup, created)
    except BaseException as error:
        if created:
            # A study left without trials would hold the settings of a start that failed.
            optuna.delete_study(study_name=study_name, storage=storage)
        if isinstance(error, Exception) and not isinstance(error, TarflowError):
            raise TarflowError(
                f"MLflow tracking store {tracking_uri!r} is not usable: {describe(error)}",
                hint="fix --tracking-uri (e.g. sqlite:///mlflow.db) or give --no-track",
            ) from None
        raise
    done = counted_trials(study)
    logger.info(
        "study %s: %d of %d trials in %s%s",
        study_name,
        done,
        total,
        storage_url,
        f"; MLflow parent run {parent_run_id}" if parent_run_id else "",
    )
    if done >= total:
        return study

    objective = Objective(spec, setup, pm, components, parent_run_id, total)
    # Two workers that finish at the same instant can both start one more trial (the count
    # and Optuna's creation of the next trial hold no lock); the objective then finds the
    # later one surplus and stops it before it trains.
    stop_at_total = StopAtTotal(total)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with active_parent_run(setup, parent_run_id):
        study.optimize(
            objective,
            n_trials=total - done,
            timeout=timeout if timeout is not None else spec.timeout,
            catch=(Exception,),
            callbacks=[stop_at_total],
        )
    return study


@contextlib.contextmanager
def active_parent_run(setup: StudySetup, parent_run_id: str | None):
    """Make the study's run the active MLflow run, so the tracker nests each trial under it."""
    if parent_run_id is None:
        yield
        return
    import mlflow

    mlflow.set_tracking_uri(setup.tracking_uri)
    with mlflow.start_run(run_id=parent_run_id):
        yield


def download_operative_config(run_id: str, tracking_uri: str, folder: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    try:
        path = download_artifacts(
            run_id=run_id,
            artifact_path="operative_config.gin",
            dst_path=str(folder),
            tracking_uri=tracking_uri,
        )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TarflowError(
            f"no operative config for MLflow run {run_id!r} in {tracking_uri!r}: {first[:200]}",
            hint="give the run id of a trial (see the study report) and its --tracking-uri",
        ) from None
    return Path(path)


class RunRecorder:
    """Learns the MLflow run a rerun opened, to link it to the original."""

    def __init__(self):
        self.mlflow_run_id = None

    @hookimpl(trylast=True)
    def tarflow_run_started(self, run):
        if run.track:
            import mlflow

            active = mlflow.active_run()
            self.mlflow_run_id = active.info.run_id if active else None


def rerun(
    run_id: str, tracking_uri: str, bindings: list[str] = (), track: bool = True
) -> tuple[dict, str | None]:
    """Train again exactly what an MLflow run holds: its operative config, nothing else.

    `bindings` may only move the run (output folder, tracking); anything else would not be a
    rerun. Returns the summary and the new MLflow run id.
    """
    # Before anything else: MLflow would create a database at a mistyped path, or retry an
    # absent server for minutes.
    check_existing_store(tracking_uri, hint="give the --tracking-uri the trial was logged to")
    pm, components = registry.load()
    config.setup(components)
    with tempfile.TemporaryDirectory() as folder:
        operative = download_operative_config(run_id, tracking_uri, Path(folder))
        recorder = RunRecorder()
        extra = [
            *bindings,
            binding_text("RunConfig.track", track),
            binding_text("RunConfig.tracking_uri", tracking_uri),
        ]
        summary = train_from_gin(pm, components, [str(operative)], extra, recorder)
    if recorder.mlflow_run_id is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_tag(recorder.mlflow_run_id, "tarflow.rerun_of", run_id)
    return summary, recorder.mlflow_run_id


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tarflow_core.study",
        description="Run ablation studies, report them, and rerun their trials.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run, resume or join a study")
    run.add_argument("study", help="a study name (studies/NAME.py) or a study file")
    run.add_argument("--trials", type=positive_int, help="total trials (default: the file's)")
    run.add_argument("--storage", default="sqlite:///studies.db", help="SQLAlchemy URL")
    run.add_argument(
        "--timeout", type=positive_number, help="seconds this worker may start trials for"
    )
    run.add_argument("--study-name", help="name in the storage (default: the study's)")
    run.add_argument(
        "--bind", action="append", default=[], metavar="BINDING", help="extra gin binding"
    )
    run.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store")
    run.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    run.add_argument("--output-dir", default="runs/studies", help="where trials write runs")

    report = commands.add_parser("report", help="write a Markdown report with plots")
    report.add_argument("study", help="the study's name in the storage")
    report.add_argument("--storage", default="sqlite:///studies.db", help="SQLAlchemy URL")
    report.add_argument("--out", help="report folder (default: studies/results/STUDY)")

    again = commands.add_parser("rerun", help="train a logged trial again from its MLflow run")
    again.add_argument("run_id", help="the MLflow run id of a trial")
    again.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store")
    again.add_argument("--output-dir", help="where the rerun writes (default: as the original)")
    again.add_argument("--no-track", action="store_true", help="do not log the rerun")

    for sub in (run, report, again):
        sub.add_argument("--threads", type=positive_int, help="torch CPU threads")
        sub.add_argument(
            "--log-level",
            default="INFO",
            type=str.upper,
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        )
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return int(text)


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def print_study(study: optuna.Study) -> bool:
    """The study's trials by state and its best trial; False if no trial completed."""
    states = {}
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    print(f"study {study.study_name}: " + ", ".join(f"{n} {s.lower()}" for s, n in states.items()))
    try:
        best = study.best_trial
    except ValueError:
        failed = [t for t in study.trials if t.state == TrialState.FAIL]
        last = failed[-1].user_attrs.get(TRIAL_REASON) if failed else None
        print(
            f"no trial of study {study.study_name} completed"
            + (f"; the last failed with {last}" if last else ""),
            file=sys.stderr,
        )
        return False
    print(f"best trial {best.number}: {OBJECTIVE} {best.value:.4f} with {best.params}")
    return True


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "run":
            study = run_study(
                args.study,
                args.storage,
                trials=args.trials,
                timeout=args.timeout,
                study_name=args.study_name,
                bindings=args.bind,
                track=not args.no_track,
                tracking_uri=args.tracking_uri,
                output_dir=args.output_dir,
            )
            if not print_study(study):
                return 1
        elif args.command == "report":
            from tarflow_core.study_report import write_report

            out = Path(args.out) if args.out else Path("studies") / "results" / args.study
            path = write_report(args.study, args.storage, out)
            print(f"report: {path}")
        else:
            extra = [binding_text("RunConfig.output_dir", args.output_dir)]
            summary, new_run = rerun(
                args.run_id, args.tracking_uri, extra if args.output_dir else [], not args.no_track
            )
            print(f"run folder: {summary['run_dir']}")
            print(f"{OBJECTIVE}: {summary['val'][OBJECTIVE]:.6f}")
            if new_run:
                print(f"MLflow run: {new_run} (tag tarflow.rerun_of = {args.run_id})")
    except TarflowError as error:
        print(f"error: {error.one_line()}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StudyInterrupted):
        print("interrupted; rerun the same command to resume the study", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
