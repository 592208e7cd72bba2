"""A study as a Markdown report: its trials, best configuration, importances and plots.

The plots come from Optuna's matplotlib visualisation module, drawn off-screen.
"""

import logging
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in CI

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from tarflow_core.errors import ConfigError  # noqa: E402
from tarflow_core.study import (  # noqa: E402
    OBJECTIVE,
    STUDY_SETUP,
    TRIAL_BINDINGS,
    TRIAL_REASON,
    TRIAL_REPLACES,
    TRIAL_RUN,
    open_storage,
)
from tarflow_core.tracking import check_existing_store  # noqa: E402

logger = logging.getLogger(__name__)


def load(study_name: str, storage_url: str) -> optuna.Study:
    if storage_url.startswith("sqlite:"):
        # Opening a SQLite URL creates its file: a mistyped path would leave an empty database.
        check_existing_store(storage_url, hint="give the --storage the study ran on")
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name not in names:
        raise ConfigError(
            f"no study {study_name!r} in {storage_url!r}",
            hint=f"studies there: {', '.join(names) or 'none'}",
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def reason(trial: optuna.trial.FrozenTrial) -> str:
    """Why a trial did not complete, as recorded by the objective (or by Optuna)."""
    text = trial.user_attrs.get(TRIAL_REASON) or trial.system_attrs.get("fail_reason", "")
    if trial.state == TrialState.RUNNING:
        text = "running (or its worker died; a later worker marks it failed)"
    if trial.state == TrialState.WAITING and TRIAL_REPLACES in trial.user_attrs:
        text = f"queued to replace interrupted trial {trial.user_attrs[TRIAL_REPLACES]}"
    return " ".join(str(text).split()).replace("|", "/")


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "/")


def trial_table(study: optuna.Study, params: list[str]) -> list[str]:
    if not study.trials:
        return ["No trial has started yet."]
    header = ["#", "state", *params, f"{OBJECTIVE} (nats/token)", "last step", "seconds"]
    header += ["pruned / failed because", "MLflow run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in study.trials:
        seconds = trial.duration.total_seconds() if trial.duration else None
        last_step = max(trial.intermediate_values) if trial.intermediate_values else ""
        row = [
            trial.number,
            trial.state.name,
            *[trial.params.get(p, "") for p in params],
            trial.value if trial.value is not None else "",
            last_step,
            f"{seconds:.0f}" if seconds is not None else "",
            reason(trial) if trial.state != TrialState.COMPLETE else "",
            trial.user_attrs.get(TRIAL_RUN, ""),
        ]
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines


def importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """Parameter importances, or None and why they cannot be told from these trials."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"{len(complete)} completed trial(s): importances need at least two."
    varied = [
        name
        for name in {p for t in complete for p in t.params}
        if len({repr(t.params.get(name)) for t in complete}) > 1
    ]
    if not varied:
        return None, "no parameter took two values among the completed trials."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            values = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as error:
        return None, f"Optuna could not compute them: {error}"
    note = "fANOVA importances over the completed trials (they sum to 1)."
    if len(values) == 1:
        note += " Only one parameter varies, so its importance is 1 by construction."
    return values, note


def save_plot(draw, path: Path) -> bool:
    """Draw one Optuna matplotlib plot into a PNG; False (logged) if it cannot be drawn."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = draw()
    except (ValueError, RuntimeError, KeyError) as error:
        logger.warning("plot %s not drawn: %s", path.name, error)
        return False
    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    figure.set_size_inches(8, 5)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def plot_by_param(study: optuna.Study, param: str):
    """The objective against one parameter, pruned trials included at their last score.

    Optuna's slice plot shows completed trials only; in an ablation the pruned arms are half
    the answer.
    """
    figure, axes = plt.subplots()
    shown = [
        t
        for t in study.trials
        if param in t.params and t.intermediate_values and t.state != TrialState.FAIL
    ]
    if not shown:
        raise ValueError(f"no trial with {param!r} has a score")
    values = [t.params[param] for t in shown]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    labels = sorted({repr(v) for v in values}) if not numeric else None
    for trial, value in zip(shown, values, strict=True):
        x = value if numeric else labels.index(repr(value))
        step = max(trial.intermediate_values)
        y = trial.value if trial.state == TrialState.COMPLETE else trial.intermediate_values[step]
        complete = trial.state == TrialState.COMPLETE
        axes.scatter(x, y, s=60, color="C0", facecolors="C0" if complete else "none", zorder=3)
        if not complete:
            axes.annotate(f"pruned @{step}", (x, y), textcoords="offset points", xytext=(6, 4))
    if not numeric:
        axes.set_xticks(range(len(labels)), [label.strip("'") for label in labels])
    axes.set_xlabel(param)
    axes.set_ylabel(f"{OBJECTIVE} (nats/token)")
    axes.set_title(f"Validation NELBO by {param} (hollow: pruned, at its last evaluation)")
    axes.grid(alpha=0.3)
    return axes


def plot_curves(study: optuna.Study, params: list[str]):
    """Optuna's intermediate-values plot with each curve named by its trial's choices, so
    the legend says which arm a curve is rather than only its trial number."""
    axes = optuna.visualization.matplotlib.plot_intermediate_values(study)
    choices = {
        f"Trial{t.number}": ", ".join(f"{p}={t.params[p]}" for p in params if p in t.params)
        for t in study.trials
    }
    for line in axes.get_lines():
        label = line.get_label()
        if choices.get(label):
            line.set_label(f"#{label.removeprefix('Trial')} {choices[label]}")
    axes.legend(loc="best", fontsize="small")
    axes.set_title("Validation NELBO along training")
    axes.set_ylabel(f"{OBJECTIVE} (nats/token)")
    return axes


def plots(study: optuna.Study, params: list[str], out: Path) -> list[tuple[str, str]]:
    """The report's figures as (caption, file name), for those that could be drawn."""
    vis = optuna.visualization.matplotlib
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    wanted = [
        (
            "Optimisation history",
            "history.png",
            lambda: vis.plot_optimization_history(study, target_name=OBJECTIVE),
        ),
        (
            "Validation NELBO along training (pruned trials stop early)",
            "curves.png",
            lambda: plot_curves(study, params),
        ),
    ]
    for param in params:
        wanted.append(
            (
                f"Validation NELBO by {param}",
                f"val_nelbo_by_{param}.png",
                lambda p=param: plot_by_param(study, p),
            )
        )
    if len(params) > 1:
        wanted.append(
            ("Parameter importances", "importances.png", lambda: vis.plot_param_importances(study))
        )
    drawn = []
    if not finished:
        return drawn
    for caption, name, draw in wanted:
        if save_plot(draw, out / name):
            drawn.append((caption, name))
    return drawn


def write_report(study_name: str, storage_url: str, out: Path) -> Path:
    """Write `out/report.md` and its PNG plots; the path of the report."""
    study = load(study_name, storage_url)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"report folder {str(out)!r} is a file", hint="give --out a folder (made if missing)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        return write_report_files(study, storage_url, out)
    except OSError as error:
        raise ConfigError(
            f"cannot write the report to {str(out)!r}: {error.strerror or error}",
            hint="give --out a folder you can write to (it is made if missing)",
        ) from None


def write_report_files(study: optuna.Study, storage_url: str, out: Path) -> Path:
    study_name = study.study_name
    setup = study.user_attrs.get(STUDY_SETUP, {})
    params = sorted({p for t in study.trials for p in t.params})
    counts = {}
    for trial in study.trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1

    lines = [f"# Study `{study_name}`", ""]
    if setup.get("question"):
        lines += [f"**Question.** {setup['question']}", ""]
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines += [
        f"- trials: {len(study.trials)} ({by_state})" if study.trials else "- trials: none yet",
        f"- objective: final `{OBJECTIVE}` in nats per token, lower is better "
        "(an upper bound; bits per character = nats / ln 2 on character corpora)",
        f"- storage: `{storage_url}`",
    ]
    if setup:
        lines += [
            f"- gin files: {', '.join(f'`{f}`' for f in setup.get('gin_files', []))}",
            "- study bindings: "
            + (", ".join(f"`{b}`" for b in setup.get("bindings", [])) or "none"),
        ]
        if setup.get("track"):
            lines.append(
                f"- MLflow: `{setup.get('tracking_uri')}`, experiment "
                f"`{setup.get('experiment')}`, parent run "
                f"`{study.user_attrs.get('mlflow_parent_run_id', '?')}`"
            )
    lines += ["", "## Trials", "", *trial_table(study, params), ""]

    lines += ["## Best configuration", ""]
    try:
        best = study.best_trial
    except ValueError:
        lines += ["No trial completed.", ""]
    else:
        lines += [
            f"Trial {best.number}: `{OBJECTIVE}` = {best.value:.4f} nats/token "
            f"({best.value / math.log(2):.4f} bits per token).",
            "",
            "Its gin bindings, on top of the study's:",
            "",
            "```",
            *best.user_attrs.get(TRIAL_BINDINGS, [f"{k} = {v!r}" for k, v in best.params.items()]),
            "```",
            "",
        ]
        if best.user_attrs.get(TRIAL_RUN):
            lines += [
                "Train it again exactly, from what MLflow holds:",
                "",
                "```",
                f"python -m tarflow_core.study rerun {best.user_attrs[TRIAL_RUN]} "
                f"--tracking-uri '{setup.get('tracking_uri', 'sqlite:///mlflow.db')}'",
                "```",
                "",
            ]

    values, note = importances(study)
    lines += ["## Parameter importances", "", note, ""]
    if values:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in values.items()]
        lines.append("")

    drawn = plots(study, params, out)
    lines += ["## Plots", ""]
    if not drawn:
        lines += ["No trial has finished yet.", ""]
    for caption, name in drawn:
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]

    # Written whole or not at all: a reader never finds half a report.
    report = out / "report.md"
    partial = out / "report.md.partial"
    try:
        partial.write_text("\n".join(lines))
        partial.replace(report)
    finally:
        partial.unlink(missing_ok=True)
    return report
