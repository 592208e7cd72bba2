"""Generation: whole-model inversion, patches, prompts, the AR cache and the sample command.

The per-component checks of cached decoding are in the conformance kit (tests/test_contract.py).
"""

import tempfile

import pytest
import torch
from helpers import TOLERANCE, randomise

from tarflow_core import config, registry
from tarflow_core.baseline import build_ar_model
from tarflow_core.errors import ConfigError, TarflowWarning
from tarflow_core.model import Flow, build_model, channel_shuffle, takes_encoder

_, REGISTRY = registry.load()
config.setup(REGISTRY)

COUPLINGS = REGISTRY.names("coupling")
CONDITIONERS = REGISTRY.names("conditioner")
TOL = TOLERANCE[torch.float64]
WEIGHT_SCALE = 0.2  # as in the contract tests: well-conditioned maps
# A stack of randomised mixture flows compounds their tails: at 0.2, noise |u| < 3 reaches
# |z| ~ 1e8 through two flows with P = 4, and the round trip then measures conditioning.
MODEL_WEIGHT_SCALE = 0.1
VOCAB = 11


def make_flow(coupling: str, direction: str, dim: int, positions: int) -> Flow:
    body = REGISTRY.get("conditioner", CONDITIONERS[0])(dim, 2, positions)
    factory = REGISTRY.get("coupling", coupling)
    extra = {}
    if takes_encoder(factory):
        encoder = REGISTRY.get("encoder", REGISTRY.names("encoder")[0])(VOCAB, dim)
        extra["encoder"] = randomise(encoder.double(), seed=5, scale=0.3)
    coupling_module = factory(dim, body.context_dim, **extra)
    return Flow(REGISTRY.get("direction", direction)(), body, coupling_module).double()


def small_model(couplings, patch_size=1, directions="alternate", seq_len=8, seed=0):
    """A randomised TarFlowLM in float64, or None if the couplings refuse this patch size."""
    try:
        model = build_model(
            VOCAB,
            seq_len,
            REGISTRY,
            couplings=couplings,
            layers_per_flow=1,
            directions=directions,
            latent_dim=2,
            patch_size=patch_size,
        )
    except ConfigError:
        return None
    model = model.double()
    # Only the flows are randomised; the codebook keeps its spread so tokens decode.
    randomise(model.flows, seed, MODEL_WEIGHT_SCALE)
    return model


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_known_prefix_is_kept_and_the_rest_solved(coupling):
    flow = randomise(make_flow(coupling, "left_to_right", 2, 6), 3, WEIGHT_SCALE)
    h = torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, _ = flow(h)
    positions_solved = []

    got = flow.inverse(u, known=h[:, :4], on_position=lambda: positions_solved.append(1))

    assert torch.equal(got[:, :4], h[:, :4])
    torch.testing.assert_close(got, h, atol=TOL, rtol=TOL)
    assert len(positions_solved) == 2


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_whole_model_round_trip(coupling, patch_size):
    model = small_model([coupling, coupling], patch_size)
    if model is None:
        pytest.skip(f"{coupling} refuses patch size {patch_size}")
    generator = torch.Generator().manual_seed(patch_size)
    u = torch.randn(3, 8 // patch_size, 2 * patch_size, generator=generator, dtype=torch.float64)
    passes = []

    z = model.from_base(u, on_pass=lambda index, z: passes.append(index))

    assert z.shape == (3, 8, 2)
    assert passes == [1, 0]
    torch.testing.assert_close(model.to_base(z)[0], u, atol=TOL, rtol=TOL)
    torch.testing.assert_close(model.from_base(u, cached=False), z, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("patch_size", [2, 4])
def test_patched_prior_ladj_matches_autograd(patch_size):
    model = small_model(["mixture", "affine"], patch_size)
    z = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    _, ladj = model.to_base(z)
    jacobian = torch.autograd.functional.jacobian(
        lambda flat: model.to_base(flat.view(1, 8, 2))[0].reshape(-1), z.reshape(-1)
    )

    torch.testing.assert_close(sum(ladj), torch.linalg.slogdet(jacobian)[1].view(1))


def test_channel_shuffle_mixes_the_tokens_of_a_patch():
    assert torch.equal(channel_shuffle(6, 1), torch.arange(6))
    d, P = 3, 2
    shuffle = channel_shuffle(d * P, P)
    assert sorted(shuffle.tolist()) == list(range(d * P))
    first_token_after = {int(c) // d for c in shuffle[:d]}
    assert first_token_after == {0, 1}


def test_prompt_conditions_exactly_when_every_flow_reads_left_to_right():
    model = small_model(["mixture", "affine"], directions="left_to_right", seed=2)
    prompt = torch.tensor([[1, 2, 3, 4]] * 2)
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(2, 8, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 4, 2, generator=generator, dtype=torch.float64)
    z_prompt, _ = model.encoder.sample(prompt, noise)
    known = [h[:, :4] for h in model.flow_inputs(z_prompt)]

    z = model.from_base(u, known=known)
    base, _ = model.to_base(z)

    # z is the one latent with the prompt's latents first and the drawn noise after them:
    # a draw from the prior given z_p, because the positions after the prompt are a bijection
    # of their own noise once the prompt is fixed.
    assert model.prompts_exactly(8)
    torch.testing.assert_close(z[:, :4], z_prompt, atol=TOL, rtol=TOL)
    torch.testing.assert_close(base[:, 4:], u[:, 4:], atol=TOL, rtol=TOL)

    tokens = model.sample(2, 8, prompt=prompt, generator=generator)
    assert torch.equal(tokens[:, :4], prompt)


def test_prompt_with_a_right_to_left_flow_warns_and_keeps_the_prompt():
    model = small_model(["mixture", "mixture"], seed=1)
    prompt = torch.tensor([[5, 6]])
    assert not model.prompts_exactly(8)

    with pytest.warns(TarflowWarning, match="approximate"):
        tokens = model.sample(
            1, 8, prompt=prompt, prompt_rounds=2, generator=torch.Generator().manual_seed(0)
        )

    assert tokens.shape == (1, 8)
    assert torch.equal(tokens[:, :2], prompt)


def test_prompt_must_fit():
    model = small_model(["affine"], patch_size=2, directions="left_to_right")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.sample(1, 8, prompt=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="shorter"):
        model.sample(1, 8, prompt=torch.tensor([[1] * 8]))


def reference_ar_sample(model, count, length, generator, prompt=None):
    """The AR baseline sampled without a cache: the whole prefix through the model each step."""
    x = torch.zeros(count, 0, dtype=torch.long) if prompt is None else prompt
    while x.shape[1] < length:
        padded = torch.cat([x, torch.zeros(count, 1, dtype=torch.long)], dim=1)
        logits = model.logits(padded)[:, -1]
        x = torch.cat([x, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], 1)
    return x


@pytest.mark.parametrize("prompt", [None, torch.tensor([[3, 1, 4], [1, 5, 9]])])
def test_ar_cache_samples_what_the_uncached_model_samples(prompt):
    model = randomise(build_ar_model(VOCAB, 12, width=16, num_layers=2, num_heads=2), 0, 0.5)
    model = model.double()

    cached = model.sample(2, 12, generator=torch.Generator().manual_seed(7), prompt=prompt)
    uncached = reference_ar_sample(model, 2, 12, torch.Generator().manual_seed(7), prompt)

    assert torch.equal(cached, uncached)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shakespeare):
    """A tiny mixture run, trained and tracked in MLflow: (run folder, run id, tracking URI)."""
    import mlflow

    from tarflow_core import run

    folder = tmp_path_factory.mktemp("sampling")
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    code = run.main(
        [
            "--gin", "gin/mixture.gin",
            "--gin", "gin/runs/tiny.gin",
            "--bind", f"load_corpus.source = '{shakespeare}'",
            "--bind", f"RunConfig.output_dir = '{folder / 'runs'}'",
            "--bind", f"RunConfig.tracking_uri = '{tracking}'",
            "--bind", "RunConfig.track = True",
            "--bind", "RunConfig.num_samples = 0",
            "--log-level", "WARNING",
        ]
    )  # fmt: skip
    assert code == 0
    (run_dir,) = (folder / "runs").iterdir()
    (tracked,) = mlflow.MlflowClient(tracking).search_runs(
        [mlflow.MlflowClient(tracking).get_experiment_by_name("tarflow").experiment_id]
    )
    return run_dir, tracked.info.run_id, tracking


def sample_cli(capsys, *args):
    from tarflow_core import sample

    code = sample.main([*args, "--log-level", "ERROR"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_command_shows_every_pass_and_saves_a_report(finished_run, capsys):
    run_dir, _, _ = finished_run
    report = run_dir / "report.md"

    code, out, _ = sample_cli(
        capsys, str(run_dir), "--num-samples", "2", "--seed", "3", "--output", str(report)
    )

    assert code == 0
    assert [line.split(" (")[0] for line in out.splitlines() if line.startswith("--- ")] == [
        "--- after flow 2",
        "--- after flow 1",
        "--- after flow 0",
    ] * 2
    text = report.read_text()
    assert text.count("## Sample") == 2 and text.count("**after flow 0** (") == 2

    # The same seed gives the same text; another seed another.
    again = sample_cli(capsys, str(run_dir), "--num-samples", "2", "--seed", "3", "--output",
                       str(report))[1]  # fmt: skip
    other = sample_cli(capsys, str(run_dir), "--num-samples", "2", "--seed", "4", "--output",
                       str(report))[1]  # fmt: skip
    assert again.split("report:")[0] == out.split("report:")[0]
    assert other.split("report:")[0] != out.split("report:")[0]


@pytest.mark.filterwarnings("always::tarflow_core.errors.TarflowWarning")
def test_sample_command_takes_an_mlflow_run_id(finished_run, capsys, tmp_path, monkeypatch):
    import mlflow

    run_dir, run_id, tracking = finished_run
    code, out, err = sample_cli(
        capsys, run_id, "--tracking-uri", tracking, "--prompt", "ROMEO:", "--format", "html",
        "--num-samples", "1",
    )  # fmt: skip

    assert code == 0, err
    assert "approximate" in err  # mixture.gin alternates directions
    assert out.split("--- after flow 0")[1].split("\n")[1].startswith("ROMEO:")
    logged = mlflow.MlflowClient(tracking).list_artifacts(run_id, "generations")
    assert any(item.path.endswith(".html") for item in logged)
    (report,) = (run_dir / "generations").glob("*.html")
    assert "approximate: refined by replacement over 3 rounds" in report.read_text()

    # With the local folder gone, the artifacts are downloaded from MLflow for the command
    # alone, and the report stays in the working directory.
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    monkeypatch.chdir(tmp_path)
    # A temporary folder of the test's own, so that other programs' downloads do not count.
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    try:
        code, out, err = sample_cli(capsys, run_id, "--tracking-uri", tracking, "--seed", "5")
    finally:
        moved.rename(run_dir)
    assert code == 0, err
    assert "after flow 0" in out
    assert len(list((tmp_path / "generations").glob("samples-*.md"))) == 1
    assert not list(downloads.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "ROMEO: \u00f1"], "lacks: '\u00f1'"),
        (["--length", "4096"], "does not fit this run"),
        (["--temperature", "0"], "not a positive number"),
        (["--temperature", "nan"], "not a positive number"),
        (["--prompt", "x" * 40], "leaves nothing to generate"),
        (["--num-samples", "100000"], "more than one batch"),
        (["--output", "{run}/operative_config.gin"], "would replace a part of the run"),
        (["--output", "{run}/checkpoint/model.safetensors"], "would replace a part of the run"),
        (["--output", "{run}/tokenizer.json"], "would replace a part of the run"),
        (["--output", "{run}"], "is an existing folder"),
    ],
)
def test_sample_command_refuses_bad_input(finished_run, capsys, args, message):
    run_dir, _, _ = finished_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    code, _, err = sample_cli(capsys, str(run_dir), *(a.format(run=run_dir) for a in args))

    assert code == 2
    assert err.startswith("error: ") and message in err and "hint:" in err
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.filterwarnings("always::tarflow_core.errors.TarflowWarning")
def test_sample_command_says_when_samples_leave_the_numeric_range(finished_run, capsys):
    run_dir, _, _ = finished_run
    code, out, err = sample_cli(capsys, str(run_dir), "--temperature", "1e30", "--output",
                                str(run_dir / "hot.md"))  # fmt: skip
    assert code == 0
    assert "left the numeric range" in err


def test_sample_command_refuses_a_seed_out_of_range(finished_run, capsys):
    run_dir, _, _ = finished_run
    with pytest.raises(SystemExit) as stop:
        sample_cli(capsys, str(run_dir), "--seed", str(2**64))
    assert stop.value.code == 2
    assert "2**63" in capsys.readouterr().err


def test_sample_command_refuses_what_is_not_a_run(capsys, tmp_path):
    code, _, err = sample_cli(capsys, "0123456789abcdef0123456789abcdef" + "x")
    assert code == 2 and "not an MLflow run id" in err
    code, _, err = sample_cli(capsys, str(tmp_path))
    assert code == 2 and "not a finished run folder" in err


def test_prompt_rounds_are_capped():
    import argparse

    from tarflow_core.sample import MAX_PROMPT_ROUNDS, prompt_rounds

    assert prompt_rounds(str(MAX_PROMPT_ROUNDS)) == MAX_PROMPT_ROUNDS
    for text in ("0", str(MAX_PROMPT_ROUNDS + 1), "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            prompt_rounds(text)
