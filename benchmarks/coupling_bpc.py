"""Validation bits per character of gin models trained side by side at one budget.

    python benchmarks/coupling_bpc.py --corpus ../shared/data/tinyshakespeare.txt --steps 1500

Each model is built from its gin file with the same data, steps and seed, trained in this one
process one after the other, and scored on the whole validation split (the last 10 % of the
text). Writes benchmarks/results/coupling_bpc.{json,md}.
"""

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch

from tarflow_core import config, registry, train
from tarflow_core.errors import TarflowError

HERE = Path(__file__).resolve().parent


class CurveHook:
    """Keeps the metrics a training run reports."""

    def __init__(self):
        self.metrics = []

    def tarflow_log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


def measure(gin_file: str, corpus_path: str, steps: int, components, scratch: Path) -> dict:
    config.parse(
        [gin_file],
        [
            f"load_corpus.source = '{corpus_path}'",
            f"STEPS = {steps}",
            "TrainConfig.eval_every = 1_000_000_000",
            "TrainConfig.checkpoint_every = 1_000_000_000",
        ],
    )
    corpus = config.configured("load_corpus")()
    train_config = config.configured("TrainConfig")()
    torch.manual_seed(train_config.seed)
    model = config.build_configured_model(
        config.configured("RunConfig")(), corpus.vocab_size, train_config.seq_len, components
    )
    hook = CurveHook()
    started = time.perf_counter()
    train.train(model, corpus, train_config, hook, scratch / Path(gin_file).stem)
    seconds = time.perf_counter() - started
    val = train.validation_metrics(model, corpus, train_config)
    return {
        "gin": gin_file,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "val_bpc": val["val/bpc"],
        "train_bpc_last": hook.metrics[-1][1]["train/nelbo"] / math.log(2),
        "seconds_per_step": seconds / steps,
    }


def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        f"Corpus `{header['corpus']}`, {header['steps']} steps each, seed 0, "
        f"{header['machine']}, torch {header['torch']}.",
        "",
        "| gin file | parameters | val BPC (bound) | s/step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['gin']}` | {row['parameters'] / 1e6:.2f}M | {row['val_bpc']:.3f} "
            f"| {row['seconds_per_step']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="text file to train and validate on")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument(
        "--gin", action="append", default=None, help="gin files (default: mixture and affine)"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "coupling_bpc"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    gin_files = args.gin or ["gin/mixture.gin", "gin/affine.gin"]
    _, components = registry.load()
    config.setup(components)
    scratch = Path(args.out).parent / "scratch"
    rows = []
    try:
        for gin_file in gin_files:
            rows.append(measure(gin_file, args.corpus, args.steps, components, scratch))
            logging.info("%s", rows[-1])
    except TarflowError as error:
        print(f"error: {error}")
        return 2

    header = {
        "corpus": Path(args.corpus).name,
        "steps": args.steps,
        "machine": f"{torch.get_num_threads()} CPU threads ({platform.machine()})",
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=2))
    table = markdown(rows, header)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
