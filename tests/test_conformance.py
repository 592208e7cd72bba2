"""The conformance kit as plugin authors use it, and the example rational-quadratic spline plugin.

The example package under examples/rq_spline is installed by pip into a target folder, as a
user would install it, and must be found, pass the kit and join the coupling ablation.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tarflow_core.conformance.common import combinations, randomise, targets
from tarflow_core.errors import PluginError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RQ_SPLINE = REPO / "examples" / "rq_spline"


def pip_install_into(target: Path, package: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def rq_env(tmp_path_factory):
    """An environment in which the example spline plugin is installed."""
    target = tmp_path_factory.mktemp("site")
    pip_install_into(target, RQ_SPLINE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("HYPOTHESIS_PROFILE", None)  # a plugin author's shell has none of ours
    return env


def run(args, env, cwd):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def pytest_in(folder: Path, env, *options):
    """pytest in a folder of another project, as a plugin author would run it."""
    return run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *options], env, folder)


def passed(stdout: str) -> int:
    summary = stdout.strip().splitlines()[-1]
    return int(summary.split(" passed")[0].split()[-1]) if " passed" in summary else 0


def test_the_rq_spline_plugin_passes_the_kit(rq_env, tmp_path):
    result = pytest_in(tmp_path, rq_env, "--tarflow-conformance=rq_spline", "-v")

    assert result.returncode == 0, result.stdout[-3000:]
    assert "test_coupling_ladj_matches_autograd[rq_spline]" in result.stdout
    assert "test_flow_save_and_load[rq_spline-right_to_left-causal_transformer]" in result.stdout
    # Only the plugin's own components: no builtin coupling is tested on its own.
    assert "[affine" not in result.stdout
    # round trip, log-det, 4 tails, identity, 2 directions x (flow round trip, causality,
    # save and load, cached against uncached inverse), extreme weights, flow identity,
    # gradients
    assert passed(result.stdout) == 18


def test_the_rq_spline_plugin_is_discovered_and_joins_the_coupling_study(rq_env):
    result = run(
        [
            sys.executable,
            "-c",
            "import optuna; from tarflow_core import registry, study; "
            "components = registry.load()[1]; "
            "print(registry.plugin_summary(components)); "
            "trial = optuna.create_study().ask(); "
            "study.load_study_spec('couplings').space(trial, components); "
            "print(trial.distributions['coupling'].choices)",
        ],
        rq_env,
        REPO,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "rq_spline" in result.stdout and "(plugin rq_spline)" in result.stdout
    choices = result.stdout.strip().splitlines()[-1]
    assert "'rq_spline'" in choices and "'mixture'" in choices


def test_the_pytest_plugin_is_inert_unless_asked(tmp_path):
    (tmp_path / "test_other_project.py").write_text("def test_own():\n    assert True\n")

    plain = pytest_in(tmp_path, os.environ, "-q")
    loaded = run(
        [
            sys.executable,
            "-c",
            "import sys, tarflow_core.conformance.plugin; print(sorted(sys.modules))",
        ],
        os.environ,
        tmp_path,
    )

    # Without the option only the project's own test runs (the kit is asked for above), and
    # loading the plugin costs no torch import.
    assert plain.returncode == 0 and passed(plain.stdout) == 1, plain.stdout[-2000:]
    assert loaded.returncode == 0 and "'torch'" not in loaded.stdout


def test_asking_for_an_unknown_plugin_names_those_there_are(components):
    with pytest.raises(PluginError, match="no installed plugin named 'no_such_plugin'") as error:
        targets(components, ["no_such_plugin"])
    assert "affine" in error.value.hint


class FakeRegistry:
    """Components by kind with the plugins that added them, as the kit reads a registry."""

    def __init__(self, rows):
        from tarflow_core.registry import Component

        self.rows = [Component(kind, name, None, plugin) for kind, name, plugin in rows]

    def components(self, kind=None):
        return [c for c in self.rows if kind is None or c.kind == kind]


def test_the_kit_pairs_a_plugins_components_with_every_installed_partner():
    registry = FakeRegistry(
        [
            ("coupling", "affine", "core"),
            ("coupling", "spline", "third"),
            ("direction", "forward", "core"),
            ("direction", "zigzag", "third"),
        ]
    )
    everything = targets(registry, None)
    plugin = targets(registry, ["third"])

    pairs = combinations(plugin, everything, ("coupling", "direction"))

    assert plugin["coupling"] == ["spline"] and plugin["direction"] == ["zigzag"]
    assert sorted(pairs) == [("affine", "zigzag"), ("spline", "forward"), ("spline", "zigzag")]
    assert len(combinations(everything, everything, ("coupling", "direction"))) == 4


@pytest.fixture(scope="module")
def spline_module():
    sys.path.insert(0, str(RQ_SPLINE))
    try:
        import tarflow_rq_spline

        yield tarflow_rq_spline
    finally:
        sys.path.remove(str(RQ_SPLINE))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_spline_is_monotone_and_its_inverse_exact(spline_module, seed):
    coupling = spline_module.RationalQuadraticSplineCoupling(2, 5, num_bins=6, bound=3.0)
    randomise(coupling.double(), seed, scale=1.5)  # far from the identity
    generator = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 1, 5, generator=generator, dtype=torch.float64).expand(1, 4001, 5)
    h = torch.linspace(-4, 4, 4001, dtype=torch.float64).view(1, -1, 1).expand(1, 4001, 2)

    u, _ = coupling(h, ctx)

    assert torch.all(u.diff(dim=1) > 0), "the spline must be strictly increasing"
    assert (u - h).abs().max() > 0.1, "the draw should bend the map"
    # Closed-form roots: exact to rounding (amplified by the steepest piece), not to a
    # solver's tolerance.
    torch.testing.assert_close(coupling.inverse(u, ctx), h, atol=1e-10, rtol=0)


class OptionOnly:
    """A pytest config as the plugin reads it: the option's values and the paths asked for."""

    def __init__(self, values):
        self.values, self.args = values, []

    def getoption(self, name):
        return self.values


@pytest.mark.parametrize(
    "values, message",
    [
        ([""], "needs a plugin name"),
        ([" , "], "needs a plugin name"),
        (["affine,no_such_plugin"], "no installed plugin named 'no_such_plugin'"),
    ],
)
def test_an_empty_or_unknown_plugin_name_is_a_usage_error(components, values, message):
    from tarflow_core.conformance import plugin

    with pytest.raises(pytest.UsageError, match=message):
        plugin.pytest_configure(OptionOnly(values))

    plugin.check_requested(["affine"])  # a real plugin passes
    plugin.pytest_configure(OptionOnly(None))  # without the option nothing is checked
