"""Bad input at the command line: one line `error: ... (hint: ...)`, exit code 2, and no
half-written run; broken third-party plugins are named and the rest of the framework starts."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tarflow_core import data, run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BROKEN = HERE / "fixtures" / "broken_plugin"

GOOD_TEXT = "To be, or not to be, that is the question.\n" * 200


def bad_sources(tmp_path) -> dict[str, str]:
    """Corpus files that are wrong in one way each, by name."""
    contents = {
        "empty": b"",
        "binary": b"\x00\x01\x02" * 100,
        "latin1": "café\n".encode("latin-1") * 100,
        "short": b"too short\n",
    }
    sources = {"missing": str(tmp_path / "nope.txt")}
    for name, content in contents.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(content)
        sources[name] = str(path)
    return sources


CASES = {
    "missing corpus": (["load_corpus.source = '{missing}'"], "no such file or folder"),
    "empty corpus": (["load_corpus.source = '{empty}'"], "is empty"),
    "binary corpus": (["load_corpus.source = '{binary}'"], "looks binary"),
    "latin-1 corpus": (["load_corpus.source = '{latin1}'"], "is not UTF-8 text"),
    "corpus shorter than a window": (["load_corpus.source = '{short}'"], "fewer than one window"),
    "misspelled parameter": (["TrainConfig.stpes = 3"], "did you mean 'steps'"),
    "misspelled configurable": (["TrainConfg.steps = 3"], "did you mean 'TrainConfig'"),
    "unknown component": (
        ["build_model.couplings = ['afine', 'mixture', 'mixture']"],
        "no coupling named 'afine' (hint: did you mean 'affine'? registered couplings: affine,",
    ),
    "patch that does not divide the window": (["PATCH = 3"], "not a multiple of patch size 3"),
    "too few skips allowed": (["TrainConfig.max_consecutive_skips = 0"], "is not a positive"),
    "unreachable tracking server": (
        ["RunConfig.track = True", "RunConfig.tracking_uri = 'http://127.0.0.1:9/'"],
        "cannot be reached",
    ),
    "tracking database in a missing folder": (
        ["RunConfig.track = True", "RunConfig.tracking_uri = 'sqlite:///{missing}/m.db'"],
        "no folder",
    ),
    "no latent channels": (["LATENT_DIM = 0"], "latent_dim must be at least 1"),
    "a flow without layers": (
        ["build_model.layers_per_flow = [1, 0, 2]"],
        "layers_per_flow must be at least 1",
    ),
    "a transformer without width": (["WIDTH = 0"], "width >= 1"),
    "progressive stages that miss a flow": (
        ["TrainConfig.progressive_shares = [0.5, 0.5]"],
        "2 stages but the model has 3 flows",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_a_hint_and_leaves_nothing(tmp_path, capsys, case):
    bindings, message = CASES[case]
    sources = bad_sources(tmp_path)
    good = tmp_path / "good.txt"
    good.write_text(GOOD_TEXT)
    runs = tmp_path / "runs"
    args = ["--gin", "gin/mixture.gin", "--gin", "gin/runs/tiny.gin"]
    args += ["--bind", f"load_corpus.source = '{good}'", "--bind", "load_corpus.max_chars = None"]
    args += ["--bind", f"RunConfig.output_dir = '{runs}'"]
    for binding in bindings:
        args += ["--bind", binding.format(**sources)]

    code = run.main(args)

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1] and "(hint: " in err[-1]
    assert not runs.exists() or not any(runs.iterdir()), "a failed start left a run folder"


def test_resume_of_a_folder_that_is_no_run_is_refused(tmp_path, capsys):
    code = run.main(["--resume", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "is not a tarflow run folder" in err[-1] and "hint: give the folder" in err[-1]


def test_unknown_characters_at_evaluation_are_named(tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    path.write_text("abc abc abc\n" * 90 + "abc ZZ é\n" * 10)

    with caplog.at_level(logging.WARNING, logger="tarflow_core.data"):
        corpus = data.load_corpus(str(path), val_fraction=0.1)

    (record,) = [r.getMessage() for r in caplog.records if "never shows" in r.getMessage()]
    assert "30 characters of 2 kinds the training split never shows ('Z', 'é')" in record
    assert "encoded as <unk>" in record
    assert data.unknown_characters(corpus.tokenizer, "abcZ?Z") == ["Z", "?"]
    assert corpus.decode(data.encode(corpus.tokenizer, "aZ")) == "a<unk>"


@pytest.fixture(scope="module")
def broken_plugin_env(tmp_path_factory):
    """An environment with a package of three broken plugins installed into a target folder."""
    target = tmp_path_factory.mktemp("broken_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--no-build-isolation", "--target", str(target), str(BROKEN)],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return env


def test_broken_plugins_are_named_and_the_rest_still_runs(broken_plugin_env, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(GOOD_TEXT)
    result = subprocess.run(
        [sys.executable, "-m", "tarflow_core.run", "--gin", "gin/mixture.gin"]
        + ["--gin", "gin/runs/tiny.gin", "--bind", f"load_corpus.source = '{corpus}'"]
        + ["--bind", f"RunConfig.output_dir = '{tmp_path / 'runs'}'"],
        env=broken_plugin_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    # The plugins that fail at start are skipped with a warning naming each...
    assert "plugin 'broken_import' (from tarflow-broken-plugin) failed to import" in result.stderr
    assert "ModuleNotFoundError" in result.stderr
    assert "plugin 'broken_register' raised in tarflow_register_components" in result.stderr
    # ...the built-ins still load and training starts...
    assert "train 3/30" in result.stderr
    # ...and a hook that raises during training stops the run with one line naming it.
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: plugin 'broken_metrics' raised in tarflow_log_metrics: ConnectionError: "
        "metrics backend went away at step 5 (hint: fix or uninstall"
    ), last
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["name"] == "mixture"


def tiny_run(tmp_path, *bindings) -> Path:
    runs = tmp_path / "runs"
    args = ["--gin", "gin/mixture.gin", "--gin", "gin/runs/tiny.gin", "--threads", "1"]
    args += ["--bind", f"RunConfig.output_dir = '{runs}'", "--bind", "STEPS = 6"]
    for binding in bindings:
        args += ["--bind", binding]
    assert run.main(args) == 0
    (run_dir,) = runs.iterdir()
    return run_dir


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_refused_resume_changes_nothing_in_the_run(tmp_path, capsys):
    run_dir = tiny_run(tmp_path)
    before = folder_contents(run_dir)

    # seq_len is a training setting, but it shapes the model: the checkpoint says no.
    code = run.main(["--resume", str(run_dir), "--bind", "TrainConfig.seq_len = 64"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "was written by a different model" in err[-1]
    assert folder_contents(run_dir) == before
    assert run.main(["--resume", str(run_dir), "--threads", "1"]) == 0


def test_a_run_folder_in_use_is_refused(tmp_path, capsys):
    from tarflow_core.train import exclusive_use

    run_dir = tiny_run(tmp_path)
    before = folder_contents(run_dir)

    with exclusive_use(run_dir):  # as a run still training in it would
        code = run.main(["--resume", str(run_dir), "--threads", "1"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is in use by another process" in err[-1]
    assert folder_contents(run_dir) == before
