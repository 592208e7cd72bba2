"""Validation bounds of the AR baseline and the flow couplings, trained side by side.

    python benchmarks/likelihood.py --corpus ../shared/data/tinyshakespeare.txt --steps 1000

Every model comes from its gin file (equal width and total transformer layers) and trains in
this one process, one after the other, on the same data (first 90 % train, last 10 %
validation, character level), for the same steps with the same seed. Each is scored on the
whole validation split with the single-sample NELBO and an importance-weighted bound; the AR
model's bound is its exact cross-entropy. Ratios are taken to the AR row of the same run,
which is what carries over between machines. Writes benchmarks/results/likelihood.{json,md}.
"""

import argparse
import logging
import time
from pathlib import Path

from common import machine, write_results

from tarflow_core import config, registry, train
from tarflow_core.errors import TarflowError

HERE = Path(__file__).resolve().parent
DEFAULT_GIN = ["gin/ar.gin", "gin/affine.gin", "gin/mixture.gin", "gin/discrete.gin"]


class NoHook:
    """Metrics are not tracked during a benchmark; only the final figures matter."""

    def tarflow_log_metrics(self, metrics, step):
        pass


def measure(gin_file, corpus_path, steps, iw_samples, components, scratch) -> dict:
    config.parse(
        [gin_file],
        [
            f"load_corpus.source = '{corpus_path}'",
            f"STEPS = {steps}",
            "TrainConfig.eval_every = 1_000_000_000",
            "TrainConfig.checkpoint_every = 1_000_000_000",
        ],
    )
    experiment = config.build_experiment(components)
    model, corpus, train_config = experiment.model, experiment.corpus, experiment.train_config

    started = time.perf_counter()
    train.train(model, corpus, train_config, NoHook(), scratch / Path(gin_file).stem)
    seconds = time.perf_counter() - started

    val = train.validation_metrics(model, corpus, train_config, iw_samples)
    return {
        "gin": gin_file,
        "model": experiment.run_config.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "val_bpc": val["val/bpc"],
        "val_iw_bpc": val.get("val/iw_bpc", val["val/bpc"]),
        "seconds_per_step": seconds / steps,
    }


def add_ratios(rows: list[dict]) -> None:
    reference = next((r for r in rows if r["model"] == "ar"), None)
    for row in rows:
        if reference is None:
            row.update(bpc_ratio=None, iw_ratio=None, time_ratio=None)
            continue
        row["bpc_ratio"] = row["val_bpc"] / reference["val_bpc"]
        row["iw_ratio"] = row["val_iw_bpc"] / reference["val_bpc"]
        row["time_ratio"] = row["seconds_per_step"] / reference["seconds_per_step"]


def markdown(rows: list[dict], header: dict) -> str:
    def ratio(value):
        return "" if value is None else f"{value:.3f}"

    lines = [
        f"`{header['corpus']}`, character level, {header['steps']} steps of "
        f"{header['tokens_per_step']} tokens each, seed 0, importance-weighted bound with "
        f"K = {header['iw_samples']}; {header['machine']}, torch {header['torch']}.",
        "",
        "| gin file | params | val BPC (ELBO) | val BPC (IW) | ratio to AR | IW ratio to AR "
        "| s/step | time ratio to AR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['gin']}` | {row['parameters'] / 1e6:.2f}M | {row['val_bpc']:.3f} "
            f"| {row['val_iw_bpc']:.3f} | {ratio(row['bpc_ratio'])} | {ratio(row['iw_ratio'])} "
            f"| {row['seconds_per_step']:.3f} | {ratio(row['time_ratio'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="text file to train and validate on")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--iw-samples", type=int, default=8)
    parser.add_argument("--gin", action="append", default=None, help=f"default: {DEFAULT_GIN}")
    parser.add_argument("--out", default=str(HERE / "results" / "likelihood"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    _, components = registry.load()
    config.setup(components)
    scratch = Path(args.out).parent / "scratch"
    rows = []
    try:
        for gin_file in args.gin or DEFAULT_GIN:
            rows.append(
                measure(gin_file, args.corpus, args.steps, args.iw_samples, components, scratch)
            )
            logging.info("%s", rows[-1])
    except TarflowError as error:
        print(f"error: {error.one_line()}")
        return 2
    add_ratios(rows)

    train_config = config.configured("TrainConfig")()
    header = {
        "corpus": Path(args.corpus).name,
        "steps": args.steps,
        "tokens_per_step": train_config.batch_size * train_config.seq_len,
        "iw_samples": args.iw_samples,
        **machine(),
    }
    write_results(args.out, header, rows, markdown(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
