"""A third-party plugin package, installed by pip, is found, tested and usable from gin."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "example_plugin"
REPO = HERE.parent


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """An environment in which the example plugin is installed (into a target folder)."""
    target = tmp_path_factory.mktemp("site")
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
            str(FIXTURE),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return env


def run(args, env, cwd=REPO):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_installed_plugin_is_discovered(plugin_env):
    result = run([sys.executable, "-m", "tarflow_core.run", "--list-components"], plugin_env)
    assert result.returncode == 0, result.stderr
    assert "additive" in result.stdout and "example_additive" in result.stdout


def test_installed_plugin_passes_the_contract_tests(plugin_env):
    result = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HERE / "test_contract.py"),
            "-k",
            "additive",
        ],
        plugin_env,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    passed = int(result.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 8  # round trip, ladj, tails, identity, flows, causality, gradients


def test_installed_plugin_trains_from_a_gin_file(plugin_env, tmp_path, shakespeare):
    gin_file = tmp_path / "additive.gin"
    gin_file.write_text(
        "include 'gin/mixture.gin'\n"
        "include 'gin/runs/tiny.gin'\n"
        "build_model.couplings = ['additive', 'mixture']\n"
        f"load_corpus.source = '{shakespeare}'\n"
        f"RunConfig.output_dir = '{tmp_path / 'runs'}'\n"
    )
    result = run([sys.executable, "-m", "tarflow_core.run", "--gin", str(gin_file)], plugin_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "additive/left_to_right" in result.stderr
    assert "val bits/char" in result.stdout
