"""MLflow tracking on the run lifecycle hooks.

One MLflow run per tarflow run: params are the operative gin bindings, metrics the slash-named
scalars, artifacts the operative config, tokenizer, checkpoint and samples.
"""

import logging
import socket
import urllib.parse

from tarflow_core.errors import TarflowError
from tarflow_core.hookspecs import hookimpl

logger = logging.getLogger(__name__)

# MLflow refuses longer parameter values.
MAX_PARAM_LENGTH = 6000

_active = {"run": None}


def _mlflow():
    import mlflow

    return mlflow


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a server is not there."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise TarflowError(
            f"MLflow tracking server {uri!r} cannot be reached: {error}",
            hint="start the server, fix RunConfig.tracking_uri, or set RunConfig.track = False",
        ) from None


@hookimpl
def tarflow_run_started(run):
    if not run.track:
        return
    _check_reachable(run.tracking_uri)
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
    active = mlflow.start_run(run_name=run.run_dir.name, nested=nested)
    _active["run"] = active
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
