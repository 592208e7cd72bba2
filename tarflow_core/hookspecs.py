"""Hook specifications: everything a plugin may implement.

Every hook is named `tarflow_*`. A plugin is a module (or object) whose functions carry the
`hookimpl` marker; it is found through the `tarflow.plugins` entry point group, which the
built-in plugins use exactly as a third-party package does.
"""

import pluggy

PROJECT = "tarflow"
ENTRY_POINT_GROUP = "tarflow.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tarflow_register_components(registry) -> None:
    """Add components to the registry.

    Args:
        registry: a `tarflow_core.registry.PluginRegistry` bound to the calling plugin; call
            `registry.add(kind, name, factory)` once per component. Kinds are those of
            `tarflow_core.registry.KINDS`.

    Result: none; the registry records which plugin added what, and refuses a second claim on
    a name with an error naming both plugins.

    Who implements it: any plugin that provides encoders, decoders, priors, directions,
    conditioners or couplings.
    """


@hookspec
def tarflow_run_started(run) -> None:
    """A run is about to train.

    Args:
        run: a `tarflow_core.train.RunInfo` with the run folder, its name, the operative gin
            bindings as a flat dict, the tracking settings, and the operative config text.

    Result: none. Raise to stop the run before any training happens (for example when a
    tracking server cannot be reached): failing at the start beats failing after an hour.

    Who implements it: trackers and anything that needs to prepare per-run state.
    """


@hookspec
def tarflow_log_metrics(metrics, step) -> None:
    """Scalars measured at a step.

    Args:
        metrics: a dict of slash-named keys (`train/nelbo`, `val/bpc`, `flow/0/ladj`) to floats.
        step: the optimiser step they belong to.

    Result: none.

    Who implements it: trackers.
    """


@hookspec
def tarflow_log_artifact(path) -> None:
    """A file of the run was written (operative config, checkpoint, samples).

    Args:
        path: a `pathlib.Path` to the file or folder, inside the run folder.

    Result: none.

    Who implements it: trackers that keep copies of run files.
    """


@hookspec
def tarflow_run_finished(run, status) -> None:
    """A run ended.

    Args:
        run: the `RunInfo` given to `tarflow_run_started`.
        status: "FINISHED", "FAILED" or "KILLED".

    Result: none. Called even when training raised, so trackers can close their runs.

    Who implements it: trackers.
    """
