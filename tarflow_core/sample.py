"""Sample a finished run and watch the text form pass by pass.

python -m tarflow_core.sample RUN [--num-samples 4] [--temperature 0.8] [--seed 0]
                                  [--prompt 'ROMEO:'] [--format md|html]

RUN is a run folder (or its checkpoint folder) or an MLflow run id. Every flow's inversion is a
full pass over the sequence; the tied decoder reads the latents after each pass, so the text
goes from coarse (after the last flow) to final (after the first).
"""

import argparse
import html
import logging
import math
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from tarflow_core import config, registry
from tarflow_core.data import unknown_characters
from tarflow_core.errors import ConfigError, DataError, TarflowError, TarflowWarning
from tarflow_core.run import positive_int, progress_bar
from tarflow_core.tracking import check_existing_store
from tarflow_core.train import null_progress

logger = logging.getLogger("tarflow_core.sample")

MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

# One batch holds every sample with all its passes; past this a machine runs out of memory
# long before the samples are of any use to read.
MAX_SAMPLES = 1024

# What a run folder holds that a report must never replace.
RUN_FILES = (
    "operative_config.gin",
    "tokenizer.json",
    "tokenizer.meta.json",
    "run.json",
    "metrics.jsonl",
    "mlflow_run.json",
    "samples.txt",
)


# Each round of prompt refinement is a full sampling pass; the measurements gain nothing past 3.
MAX_PROMPT_ROUNDS = 100


def prompt_rounds(text: str) -> int:
    value = positive_int(text)
    if value > MAX_PROMPT_ROUNDS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_PROMPT_ROUNDS} rounds (each is a full sampling pass), not {value}"
        )
    return value


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"a seed is a whole number from 0 to 2**63 - 1, not {value}"
        )
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tarflow_core.sample",
        description="Generate text from a finished run, showing the decoded text after every "
        "flow's pass.",
    )
    parser.add_argument("run", help="a run folder, its checkpoint folder, or an MLflow run id")
    parser.add_argument(
        "--num-samples",
        type=positive_int,
        default=4,
        help=f"samples, one batch (default 4, at most {MAX_SAMPLES})",
    )
    parser.add_argument(
        "--length", type=positive_int, default=None, help="tokens (default: the run's seq_len)"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="scale of the base noise (default 1.0)"
    )
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--prompt", default=None, help="text the samples continue")
    parser.add_argument(
        "--prompt-rounds",
        type=prompt_rounds,
        default=3,
        help="refinement rounds when a right-to-left flow makes prompting approximate",
    )
    parser.add_argument(
        "--format",
        choices=["md", "html"],
        default=None,
        help="the saved report's format (default: from --output's suffix, else md)",
    )
    parser.add_argument(
        "--output", default=None, help="report path (default: generations/ in the run folder)"
    )
    parser.add_argument(
        "--tracking-uri",
        default="sqlite:///mlflow.db",
        help="MLflow store holding the run, for a run id (default sqlite:///mlflow.db)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default WARNING)",
    )
    return parser.parse_args(argv)


@dataclass
class Generation:
    """What one sampling call produced: every pass's text and decoder entropy, per sample."""

    prompt: str | None
    passes: list[str] = field(default_factory=list)  # names, coarse to fine
    texts: list[list[str]] = field(default_factory=list)  # [pass][sample]
    pieces: list[list[list[str]]] = field(default_factory=list)  # [pass][sample][token]
    entropy_bits: list[list[float]] = field(default_factory=list)  # [pass][sample], per token
    prompt_used: str | None = None  # the prompt as conditioned on, after trimming to patches

    @property
    def final(self) -> list[str]:
        return self.texts[-1]


def resolve_run(ref: str, tracking_uri: str, download_to: Path) -> tuple[Path, str | None]:
    """A run folder for a path or an MLflow run id, and the run id if there is one.

    For a run id, the local folder recorded in the run's `run_dir` tag is used when it still
    exists; otherwise the artifacts (operative config, tokenizer, checkpoint) are downloaded
    into `download_to`.
    """
    path = Path(ref)
    if path.exists():
        if path.name == "checkpoint" and not (path / "operative_config.gin").exists():
            path = path.parent
        return path, None
    if not MLFLOW_RUN_ID.match(ref):
        raise ConfigError(
            f"no run folder {ref!r}, and it is not an MLflow run id",
            hint="give a folder under runs/ or the 32-character id MLflow shows for the run",
        )

    hint = "pass --tracking-uri with the store the run was logged to"
    check_existing_store(tracking_uri, hint)

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient(tracking_uri).get_run(ref)
    except Exception as error:  # MLflow's own errors, and a URI it cannot use at all
        raise TarflowError(
            f"MLflow run {ref} not found in {tracking_uri}: {str(error).splitlines()[0][:200]}",
            hint="pass --tracking-uri with the store the run was logged to",
        ) from None
    local = Path(run.data.tags.get("run_dir", ""))
    if local.name and (local / "operative_config.gin").exists():
        return local, ref
    logger.info("downloading the artifacts of MLflow run %s to %s", ref, download_to)
    try:
        for name in ("operative_config.gin", "tokenizer.json", "checkpoint"):
            mlflow.artifacts.download_artifacts(
                run_id=ref,
                artifact_path=name,
                dst_path=str(download_to),
                tracking_uri=tracking_uri,
            )
    except (MlflowException, OSError) as error:
        raise TarflowError(
            f"cannot download the artifacts of MLflow run {ref}: "
            f"{str(error).splitlines()[0][:200]}",
            hint="the run needs its operative_config.gin, tokenizer.json and checkpoint artifacts",
        ) from None
    return download_to, ref


def encode_prompt(finished: config.FinishedRun, text: str, length: int) -> torch.Tensor:
    """Prompt ids (1, T_p): refused if the vocabulary lacks a character, and trimmed at the
    front to a whole number of patches."""
    missing = unknown_characters(finished.tokenizer, text)
    if missing:
        shown = ", ".join(repr(ch) for ch in missing[:10])
        raise DataError(
            f"the prompt has characters the run's vocabulary lacks: {shown}",
            hint="the model never saw them and would read them as <unk>; remove or replace them",
        )
    ids = finished.tokenizer.encode(text).ids
    if not ids:
        raise DataError("the prompt is empty", hint="give some text, or leave --prompt out")
    patch = getattr(finished.model, "patch_size", 1)
    if len(ids) % patch:
        dropped = len(ids) % patch
        warnings.warn(
            f"the prompt is {len(ids)} tokens, not a multiple of the patch size {patch}: its "
            f"first {dropped} token(s) are dropped",
            TarflowWarning,
            stacklevel=2,
        )
        ids = ids[dropped:]
    if not 0 < len(ids) < length:
        raise DataError(
            f"a prompt of {len(ids)} tokens leaves nothing to generate in {length}",
            hint="shorten the prompt or raise --length (at most the run's seq_len)",
        )
    return torch.tensor([ids], dtype=torch.long)


def positions_to_solve(model, length: int, prompt_ids, prompt_rounds: int) -> int:
    """Sequential steps of one sampling call, for the progress bar."""
    prompt_len = 0 if prompt_ids is None else prompt_ids.shape[1]
    flows = getattr(model, "active_flows", None)
    if flows is None:  # one token at a time: the AR baseline
        return length - prompt_len
    patch = model.patch_size
    if prompt_ids is None:
        return flows * (length // patch)
    if model.prompts_exactly(length // patch):
        return flows * ((length - prompt_len) // patch)
    return flows * (length // patch) * prompt_rounds


def decoder_entropy_bits(model, z: torch.Tensor) -> list[float]:
    """Entropy of p(x_t | z_t) in bits per token, averaged over each sample's tokens: how
    undecided its text still is."""
    log_p = model.decoder.logits(z)
    entropy = -(log_p.exp() * log_p).sum(-1).mean(-1) / math.log(2)
    return entropy.tolist()


def generate(
    finished: config.FinishedRun,
    num_samples: int,
    length: int,
    temperature: float,
    seed: int,
    prompt: str | None = None,
    prompt_rounds: int = 3,
    progress=null_progress,
) -> Generation:
    """Sample a batch; record the decoded text and decoder entropy after every pass."""
    model = finished.model
    decode = finished.tokenizer.decode
    generation = Generation(prompt)
    prompt_ids = None if prompt is None else encode_prompt(finished, prompt, length)
    if prompt_ids is not None:
        generation.prompt_used = decode(prompt_ids[0].tolist())
        prompt_ids = prompt_ids.expand(num_samples, -1)

    bar = progress(positions_to_solve(model, length, prompt_ids, prompt_rounds), "sample")

    def record(tokens):
        rows = tokens.tolist()
        generation.texts.append([decode(row) for row in rows])
        generation.pieces.append([[decode([t]) for t in row] for row in rows])

    final_latents = {}

    def on_pass(index, z):
        final_latents["z"] = z
        tokens = model.decoder.decode(z)
        if prompt_ids is not None:
            tokens[:, : prompt_ids.shape[1]] = prompt_ids
        generation.passes.append(f"after flow {index}")
        record(tokens)
        generation.entropy_bits.append(decoder_entropy_bits(model, z))
        bar.set_postfix({"pass": f"flow {index}"})

    generator = torch.Generator().manual_seed(seed)
    tokens = model.sample(
        num_samples,
        length,
        temperature,
        generator,
        on_pass=on_pass,
        on_position=bar.update,
        prompt=prompt_ids,
        prompt_rounds=prompt_rounds,
    )
    bar.close()
    if not generation.passes:  # a single-pass model: the AR baseline
        generation.passes.append("final")
        record(tokens)

    if "z" in final_latents:
        broken = (~torch.isfinite(final_latents["z"]).flatten(1).all(-1)).sum().item()
        if broken:
            warnings.warn(
                f"{broken} of {num_samples} samples left the numeric range at temperature "
                f"{temperature} (their latents are not finite) and decode to nothing useful",
                TarflowWarning,
                stacklevel=2,
            )
    return generation


def markdown_report(generation: Generation, title: str, settings: dict) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {key}: `{value}`" for key, value in settings.items()]
    for index in range(len(generation.final)):
        lines += ["", f"## Sample {index}", ""]
        for pass_index, name in enumerate(generation.passes):
            lines += [f"**{name}**{_entropy_note(generation, pass_index, index)}", ""]
            lines += ["~~~~text", generation.texts[pass_index][index], "~~~~", ""]
    return "\n".join(lines)


def _entropy_note(generation: Generation, pass_index: int, sample: int) -> str:
    """' (0.42 bits/token)': the decoder's entropy for one sample after one pass, if known."""
    if pass_index >= len(generation.entropy_bits):
        return ""
    return f" ({generation.entropy_bits[pass_index][sample]:.2f} bits/token)"


def html_report(generation: Generation, title: str, settings: dict) -> str:
    """One table per sample, a row per pass; characters that changed since the previous pass
    are highlighted, so the coarse-to-fine refinement is visible at a glance."""
    style = (
        "body{font-family:sans-serif;margin:2em}pre{white-space:pre-wrap;margin:0}"
        "td{vertical-align:top;padding:4px 8px;border-bottom:1px solid #ddd}"
        "mark{background:#ffe08a}"
    )
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{style}</style><h1>{html.escape(title)}</h1><ul>")
    parts += [
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code>" for k, v in settings.items()
    ]
    parts.append("</ul>")
    for index in range(len(generation.final)):
        parts.append(f"<h2>Sample {index}</h2><table>")
        previous = None
        for pass_index, name in enumerate(generation.passes):
            pieces = generation.pieces[pass_index][index]
            label = html.escape(name)
            label += f"<br><small>{_entropy_note(generation, pass_index, index)}</small>"
            parts.append(
                f"<tr><td>{label}</td><td><pre>{_marked(pieces, previous)}</pre></td></tr>"
            )
            previous = pieces
        parts.append("</table>")
    return "".join(parts)


def _marked(pieces: list[str], previous: list[str] | None) -> str:
    """The decoded tokens, each changed one since the previous pass in a <mark>."""
    if previous is None:
        return html.escape("".join(pieces))
    return "".join(
        html.escape(piece) if piece == old else f"<mark>{html.escape(piece)}</mark>"
        for piece, old in zip(pieces, previous, strict=True)
    )


def print_generation(generation: Generation) -> None:
    for index in range(len(generation.final)):
        print(f"\n=== sample {index} ===")
        for pass_index, name in enumerate(generation.passes):
            print(f"--- {name}{_entropy_note(generation, pass_index, index)}")
            print(generation.texts[pass_index][index])


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    # The project's warnings (an approximate prompt, say) read as one line, not a source dump.
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest: print(f"warning: {message}", file=sys.stderr)
        try:
            generation, report_path = sample_run(args)
        except TarflowError as error:
            print(f"error: {error.one_line()}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    print_generation(generation)
    print(f"\nreport: {report_path}")
    return 0


def sample_run(args) -> tuple[Generation, Path]:
    """What the command does, from parsed arguments: load, generate, save and log."""
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(
            f"--temperature {args.temperature} is not a positive number",
            hint="1.0 samples the model as trained; below 1 is more conservative",
        )
    if args.num_samples > MAX_SAMPLES:
        raise ConfigError(
            f"--num-samples {args.num_samples} is more than one batch may hold ({MAX_SAMPLES})",
            hint="run the command again with other --seed values for more",
        )
    _, components = registry.load()
    config.setup(components)

    # Artifacts downloaded from MLflow live only as long as the command.
    with tempfile.TemporaryDirectory(prefix="tarflow-sample-") as download:
        run_dir, run_id = resolve_run(args.run, args.tracking_uri, Path(download))
        finished = config.load_finished_run(run_dir, components)
        seq_len = finished.train_config.seq_len
        length = args.length or seq_len
        patch = getattr(finished.model, "patch_size", 1)
        if length > seq_len or length % patch:
            raise ConfigError(
                f"--length {length} does not fit this run (seq_len {seq_len}, patch size {patch})",
                hint=f"use a multiple of {patch} up to {seq_len}",
            )
        saved_locally = run_dir != Path(download)
        report_path, report_format = report_destination(args, run_dir, saved_locally)

        with logging_redirect_tqdm():
            generation = generate(
                finished,
                args.num_samples,
                length,
                args.temperature,
                args.seed,
                args.prompt,
                args.prompt_rounds,
                progress_bar,
            )
        settings = {
            "run": args.run,
            "checkpoint step": finished.step,
            "samples": args.num_samples,
            "length": length,
            "temperature": args.temperature,
            "seed": args.seed,
            "prompt": None if args.prompt is None else repr(args.prompt),
        }
        if generation.prompt_used not in (None, args.prompt):
            settings["prompt as used"] = repr(generation.prompt_used)
        model = finished.model
        if args.prompt and hasattr(model, "prompts_exactly"):
            positions = length // getattr(model, "patch_size", 1)
            settings["prompting"] = (
                "exact (every flow reads left to right)"
                if model.prompts_exactly(positions)
                else f"approximate: refined by replacement over {args.prompt_rounds} rounds"
            )
        render = html_report if report_format == "html" else markdown_report
        write_report(report_path, render(generation, f"Samples from {run_dir.name}", settings))
    if run_id is not None:
        log_to_mlflow(run_id, args.tracking_uri, report_path)
    return generation, report_path


def report_destination(args, run_dir: Path, saved_locally: bool) -> tuple[Path, str]:
    """Where the report goes and in which format; refuses a path that would replace a part of
    the run or some other file."""
    report_format = args.format
    if args.output:
        path = Path(args.output)
        if report_format is None:
            report_format = "html" if path.suffix.lower() in (".html", ".htm") else "md"
    else:
        report_format = report_format or "md"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        # A run downloaded from MLflow is gone after the command: its report stays here.
        folder = run_dir / "generations" if saved_locally else Path("generations")
        return folder / f"samples-{stamp}.{report_format}", report_format

    resolved, run = path.resolve(), run_dir.resolve()
    inside_checkpoint = any(
        part.name.startswith(("checkpoint", ".checkpoint")) and part.parent == run
        for part in (resolved, *resolved.parents)
    )
    if inside_checkpoint or (resolved.parent == run and resolved.name in RUN_FILES):
        raise ConfigError(
            f"--output {args.output!r} would replace a part of the run",
            hint="write the report elsewhere, e.g. under the run's generations/ folder",
        )
    if path.is_dir() or (path.exists() and path.suffix.lower() not in (".md", ".html", ".htm")):
        raise ConfigError(
            f"--output {args.output!r} is an existing {'folder' if path.is_dir() else 'file'}",
            hint="give a new file name ending in .md or .html (an old report may be replaced)",
        )
    return path, report_format


def write_report(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        raise TarflowError(
            f"cannot write the report to {str(path)!r}: {error.strerror}",
            hint="pass --output with a writable path",
        ) from None


def log_to_mlflow(run_id: str, tracking_uri: str, path: Path) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri).log_artifact(run_id, str(path), "generations")
    logger.info("report logged to MLflow run %s", run_id)


if __name__ == "__main__":
    sys.exit(main())
