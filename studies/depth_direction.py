"""Depth and direction: how should a fixed transformer budget be split into flows?"""

import optuna

QUESTION = (
    "For mixture-CDF flows, what number of flows, conditioner depth per flow and direction "
    "scheme give the lowest validation NELBO, and does alternating directions help?"
)
GIN_FILES = ["gin/mixture.gin", "gin/runs/cpu.gin", "gin/studies/small.gin"]
BINDINGS = []
TRIALS = 12
TIMEOUT_SECONDS = None


def space(trial, registry):
    flows = trial.suggest_int("flows", 1, 4)
    layers = trial.suggest_int("layers_per_flow", 1, 3)
    # 'alternate' or one registered direction for every flow.
    directions = trial.suggest_categorical(
        "directions", ["alternate", *registry.names("direction")]
    )
    return {
        "build_model.couplings": ["mixture"] * flows,
        "build_model.layers_per_flow": layers,
        "build_model.directions": directions,
    }


def sampler():
    return optuna.samplers.TPESampler(n_startup_trials=6)


def pruner():
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=75)
