"""The pytest plugin of the conformance kit, registered through the `pytest11` entry point.

Inert unless asked: without `--tarflow-conformance` it only adds the option. With it, pytest
also collects the kit and runs it on the components the named plugins register.
"""

import os
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parent / "kit.py"


def pytest_addoption(parser):
    group = parser.getgroup("tarflow", "tarflow plugin conformance")
    group.addoption(
        "--tarflow-conformance",
        action="append",
        default=None,
        metavar="PLUGIN",
        help="run tarflow's conformance tests on the components of these plugins (entry point "
        "names in the tarflow.plugins group, comma-separated or repeated; 'all' for every "
        "installed plugin)",
    )


def pytest_configure(config):
    values = config.getoption("tarflow_conformance")
    if values is None:
        return
    check_requested(values)
    if str(KIT) not in config.args:
        config.args.append(str(KIT))

    # Property tests draw 25 examples without a deadline (a first call pays for compiling),
    # unless the user chose a Hypothesis profile of their own.
    if "HYPOTHESIS_PROFILE" not in os.environ:
        from hypothesis import HealthCheck, settings

        settings.register_profile(
            "tarflow-conformance",
            max_examples=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        settings.load_profile("tarflow-conformance")


def check_requested(values: list[str]) -> None:
    """Refuse an empty or unknown plugin name as a usage error, before any collection.

    The kit itself would read an empty list as "everything", and an unknown name would only
    surface as a collection error with a traceback.
    """
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        raise pytest.UsageError(
            "--tarflow-conformance needs a plugin name (an entry point name in the "
            "tarflow.plugins group), or 'all'"
        )

    from tarflow_core import registry
    from tarflow_core.conformance.common import targets
    from tarflow_core.errors import PluginError

    try:
        targets(registry.load()[1], names)
    except PluginError as error:
        raise pytest.UsageError(f"--tarflow-conformance: {error.one_line()}") from None
