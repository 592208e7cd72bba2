"""The conformance kit run over the whole registry: every installed coupling, direction,
conditioner, encoder and decoder, including a third party's, without a list of names.

The tests live in `tarflow_core.conformance.kit`, where plugin authors run them too
(`pytest --tarflow-conformance=NAME`); importing them here collects them in this suite.
"""

from tarflow_core.conformance.kit import *  # noqa: F403
from tarflow_core.conformance.kit import loaded_registry


def test_registry_holds_the_builtins():
    registry = loaded_registry()
    couplings = set(registry.names("coupling"))
    assert {"affine", "mixture", "mixture_gaussian", "discrete", "discrete_tied"} <= couplings
    assert {"left_to_right", "right_to_left"} <= set(registry.names("direction"))
