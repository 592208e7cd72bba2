"""MLflow tracking on the run lifecycle hooks.

One MLflow run per tarflow run: params are the operative gin bindings, metrics the slash-named
scalars, artifacts the operative config, tokenizer, checkpoint and samples. The MLflow run id is
kept in the run folder (`mlflow_run.json`), so a resumed run continues the same MLflow run. In a
multi-process run only rank 0 tracks.
"""

import json
import logging
import os

from tarflow_core.errors import TarflowError
from tarflow_core.hookspecs import hookimpl
from tarflow_core.tracking import check_reachable

logger = logging.getLogger(__name__)

# MLflow refuses longer parameter values.
MAX_PARAM_LENGTH = 6000

_active = {"run": None}

RUN_RECORD = "mlflow_run.json"


def _is_main_process() -> bool:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def _recorded_run_id(run) -> str | None:
    """The MLflow run a resumed tarflow run continues, if it was tracked at the same place."""
    path = run.run_dir / RUN_RECORD
    if not run.resumed or not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("tracking_uri") != run.tracking_uri:
        logger.warning(
            "the run was tracked at %s, not %s: a new MLflow run is started",
            record.get("tracking_uri"),
            run.tracking_uri,
        )
        return None
    return record.get("run_id")


def _record_run_id(run, run_id: str) -> None:
    path = run.run_dir / RUN_RECORD
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": run.tracking_uri}, indent=2))
    os.replace(tmp, path)


def _mlflow():
    import mlflow

    return mlflow


@hookimpl
def tarflow_run_started(run):
    if not run.track or not _is_main_process():
        return
    check_reachable(
        run.tracking_uri,
        hint="start the server, fix RunConfig.tracking_uri, or set RunConfig.track = False",
    )
    mlflow = _mlflow()
    mlflow.set_tracking_uri(run.tracking_uri)
    try:
        mlflow.set_experiment(run.experiment)
    except Exception as error:  # bad URI, unwritable store, refused experiment name
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TarflowError(
            f"MLflow tracking at {run.tracking_uri!r} (experiment {run.experiment!r}) is not "
            f"usable: {type(error).__name__}: {first[:200]}",
            hint="fix RunConfig.tracking_uri or RunConfig.experiment, or set RunConfig.track = "
            "False",
        ) from None

    # A study may have opened a parent run; this run then nests under it.
    nested = mlflow.active_run() is not None
    run_id = _recorded_run_id(run)
    if run_id is not None:
        try:
            active = mlflow.start_run(run_id=run_id, nested=nested)
        except Exception as error:  # deleted run, or a store that lost it
            raise TarflowError(
                f"cannot continue MLflow run {run_id} recorded in {run.run_dir}: "
                f"{type(error).__name__}",
                hint=f"delete {run.run_dir / RUN_RECORD} to track the rest as a new MLflow run",
            ) from None
        _active["run"] = active
        # Parameters cannot change in MLflow; the operative config artifact is logged again.
        mlflow.set_tag("resumed", "true")
        logger.info("continuing MLflow run %s in %s", run_id, run.tracking_uri)
        return
    active = mlflow.start_run(run_name=run.run_dir.name, nested=nested)
    _active["run"] = active
    _record_run_id(run, active.info.run_id)
    params = {key: value[:MAX_PARAM_LENGTH] for key, value in run.params.items()}
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(items[start : start + 100]))
    mlflow.set_tags({"run_dir": str(run.run_dir), **run.tags})
    logger.info("MLflow run %s in %s", active.info.run_id, run.tracking_uri)


@hookimpl
def tarflow_log_metrics(metrics, step):
    if _active["run"] is not None:
        _mlflow().log_metrics(metrics, step=step)


@hookimpl
def tarflow_log_artifact(path):
    if _active["run"] is None:
        return
    mlflow = _mlflow()
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=path.name)
    else:
        mlflow.log_artifact(str(path))


@hookimpl
def tarflow_run_finished(run, status):
    if _active["run"] is None:
        return
    _mlflow().end_run(status=status)
    _active["run"] = None
