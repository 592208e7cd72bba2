"""Mixture-size sweep: how many components K does a mixture-CDF coupling need?"""

import optuna

QUESTION = (
    "How does the validation NELBO of the three-flow mixture-CDF model change with the number "
    "of mixture components K per channel, and with the component family?"
)
GIN_FILES = ["gin/mixture.gin", "gin/runs/cpu.gin", "gin/studies/small.gin"]
BINDINGS = [
    "coupling.mixture_gaussian.num_components = %MIX_K",
    "coupling.mixture_gaussian.hidden = 64",
]
TRIALS = 10
TIMEOUT_SECONDS = None
COMPONENTS = [2, 4, 8, 16, 32]


def space(trial, registry):
    k = trial.suggest_categorical("num_components", COMPONENTS)
    # The component families: the registered mixture couplings.
    families = [name for name in registry.names("coupling") if name.startswith("mixture")]
    family = trial.suggest_categorical("coupling", families)
    return {"MIX_K": k, "build_model.couplings": [family] * 3}


def sampler():
    return optuna.samplers.BruteForceSampler()


def pruner():
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=75)
