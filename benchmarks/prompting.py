"""How well a prompt conditions generation: exact (all flows left to right) against approximate.

    python benchmarks/prompting.py --corpus ../shared/data/tinyshakespeare.txt \\
        --run runs/<all-left-to-right run> --run runs/<alternating run>

For every run, prompts are the first half of windows taken from the last 10 % of the corpus
(the validation split of a run trained with the default `val_fraction`). Each prompt is
continued three ways: by prompted generation (for a stack with a right-to-left flow, with
1, 3 and 6 rounds of replacement refinement), by an unprompted sample whose second half is
pasted after the prompt, and by the true text. The model then scores each whole window with its
importance-weighted bound, in bits per character: a continuation that fits its prompt scores
lower than a pasted one. `prompt kept` is the share of prompt characters that the final
latents still decode to before the prompt is written back over them: 100 % for exact
conditioning up to the codebook's own decoding error.
Writes benchmarks/results/prompting.{json,md}.
"""

import argparse
import logging
import math
import warnings
from pathlib import Path

import torch
from common import machine, write_results

from tarflow_core import config, registry, train
from tarflow_core.errors import TarflowWarning

HERE = Path(__file__).resolve().parent


def prompt_windows(finished, corpus: str, count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens, evenly spaced over the last 10 % of the corpus."""
    text = Path(corpus).read_text(encoding="utf-8")
    validation = text[int(len(text) * 0.9) :]
    ids = torch.tensor(finished.tokenizer.encode(validation).ids)
    starts = torch.linspace(0, len(ids) - length - 1, count).long()
    return torch.stack([ids[s : s + length] for s in starts])


def bits_per_token(model, windows: torch.Tensor, iw_samples: int) -> float:
    result = train.evaluate(model, windows, 64, iw_samples)
    return result.get("iw_nelbo", result["nelbo"]) / math.log(2)


def continue_prompts(model, prompts, length, rounds, seed):
    """Prompted samples, and the share of prompt tokens the final latents decode to."""
    kept = {}

    def on_pass(index, z):
        if index == 0:
            decoded = model.decoder.decode(z)[:, : prompts.shape[1]]
            kept["share"] = (decoded == prompts).float().mean().item()

    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TarflowWarning)  # approximate, and measured here
        tokens = model.sample(
            len(prompts), length, generator=generator, on_pass=on_pass, prompt=prompts,
            prompt_rounds=rounds,
        )  # fmt: skip
    return tokens, kept.get("share", float("nan"))


def measure(run_dir: Path, corpus: str, count: int, iw_samples: int, components) -> list[dict]:
    finished = config.load_finished_run(run_dir, components)
    model = finished.model
    length = finished.train_config.seq_len
    half = length // 2 - (length // 2) % getattr(model, "patch_size", 1)
    windows = prompt_windows(finished, corpus, count, length)
    prompts = windows[:, :half]
    exact = model.prompts_exactly(length // model.patch_size)
    name = run_dir.name

    true_bits = bits_per_token(model, windows, iw_samples)
    rows = [{"run": name, "continuation": "true text", "bits": true_bits}]
    generator = torch.Generator().manual_seed(1)
    unprompted = model.sample(count, length, generator=generator)
    pasted = torch.cat([prompts, unprompted[:, half:]], dim=1)
    rows.append(
        {
            "run": name,
            "continuation": "unprompted sample, pasted",
            "bits": bits_per_token(model, pasted, iw_samples),
        }
    )
    for rounds in [1] if exact else [1, 3, 6]:
        tokens, kept = continue_prompts(model, prompts, length, rounds, seed=2)
        label = "prompted (exact)" if exact else f"prompted, {rounds} round(s)"
        rows.append(
            {
                "run": name,
                "continuation": label,
                "bits": bits_per_token(model, tokens, iw_samples),
                "prompt_kept": kept,
            }
        )
        logging.info("%s", rows[-1])
    for row in rows:
        row["directions"] = "all left to right" if exact else "alternating"
        row["prompt_tokens"], row["length"] = half, length
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        f"{header['count']} prompts of {rows[0]['prompt_tokens']} characters from the last "
        f"10 % of `{header['corpus']}`, continued to {rows[0]['length']}; whole windows scored "
        f"by each model's importance-weighted bound (K = {header['iw_samples']}); "
        f"{header['machine']}, torch {header['torch']}.",
        "",
        "| run | flows | continuation | bits/char of the window | prompt kept |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for row in rows:
        kept = row.get("prompt_kept")
        shown = "" if kept is None else f"{100 * kept:.1f} %"
        lines.append(
            f"| {row['run']} | {row['directions']} | {row['continuation']} | {row['bits']:.3f} "
            f"| {shown} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="the text file the runs trained on")
    parser.add_argument("--run", action="append", required=True, help="a finished run folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--iw-samples", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "prompting"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    _, components = registry.load()
    config.setup(components)
    rows = []
    for run_dir in args.run:
        rows += measure(Path(run_dir), args.corpus, args.prompts, args.iw_samples, components)
    header = {
        "corpus": Path(args.corpus).name,
        "count": args.prompts,
        "iw_samples": args.iw_samples,
        **machine(),
    }
    write_results(args.out, header, rows, markdown(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
