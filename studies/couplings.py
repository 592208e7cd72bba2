"""Coupling ablation: which coupling gives the best bound at a fixed size and budget?"""

import optuna

QUESTION = (
    "Which coupling (affine, mixture CDF, discrete-equivalent, or one a plugin adds) gives the "
    "lowest validation NELBO when every flow of a three-flow model uses it, at equal budget?"
)
GIN_FILES = ["gin/mixture.gin", "gin/runs/cpu.gin", "gin/studies/small.gin"]
BINDINGS = [
    # The Gaussian mixture gets the size of the logistic one, so the family is what differs.
    "coupling.mixture_gaussian.num_components = %MIX_K",
    "coupling.mixture_gaussian.hidden = 64",
]
FLOWS = 3

# One trial per coupling: the sampler enumerates them and the study ends when all are done.
TRIALS = 8
TIMEOUT_SECONDS = None


def space(trial, registry):
    # Every installed coupling, so a third party's joins the ablation once pip-installed.
    coupling = trial.suggest_categorical("coupling", registry.names("coupling"))
    return {"build_model.couplings": [coupling] * FLOWS}


def sampler():
    return optuna.samplers.BruteForceSampler()


def pruner():
    # Only a coupling clearly behind (worse than three in four finished ones at the same step,
    # past the first third of training) is stopped: with a handful of arms a median cut
    # stopped close seconds at half budget.
    return optuna.pruners.PercentilePruner(75.0, n_startup_trials=3, n_warmup_steps=300)
