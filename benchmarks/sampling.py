"""Sampling throughput of TarFlowLM against the AR baseline with its key-value cache.

    python benchmarks/sampling.py

Every model comes from its gin model file, so all have the same width and the same total
transformer layers (4): the AR baseline evaluates 4 layers per token, and a TarFlowLM with
patch size P evaluates the same 4 layers per position, so 4 / P per token. A ratio to AR of 1.0
at P = 1 is therefore the natural limit (equal sequential work), and patches can pass it. Each
model generates the same batch of tokens, once to warm up and then `--repeats` times, in this
one process; the median time is reported and the ratio is taken to the AR row of the same run,
whose time is the mean of the AR baseline timed first and again last.

The flows' weights are the initial ones plus seeded noise (`--weight-noise`), so the mixture
inverses do real root finding instead of starting at the identity. The mixture couplings invert
through their compiled kernels; at P = 1 a row with the PyTorch solver instead (one timed call)
shows what the kernels are worth. `--run DIR` adds a trained run folder as an extra row.
Writes benchmarks/results/sampling.{json,md}.
"""

import argparse
import logging
from pathlib import Path

import torch
from common import machine, median_seconds, write_results

from tarflow_core import config, registry

HERE = Path(__file__).resolve().parent
MODELS = {
    "ar": "gin/models/ar.gin",
    "affine": "gin/models/affine.gin",
    "mixture": "gin/models/mixture.gin",
    "discrete": "gin/models/discrete.gin",
}
# The tied discrete-equivalent coupling needs one token per position; with patches the Mix-d
# layout takes its untied form, which has the same cost.
UNTIED_FIRST_FLOW = "build_model.couplings = ['discrete', 'mixture', 'mixture']"


def build(name: str, patch_size: int, vocab: int, seq_len: int, components, noise: float):
    bindings = [f"PATCH = {patch_size}"]
    if name == "discrete" and patch_size > 1:
        bindings.append(UNTIED_FIRST_FLOW)
    config.parse([MODELS[name]], bindings)
    run_config = config.configured("RunConfig")()
    torch.manual_seed(0)
    model = config.build_configured_model(run_config, vocab, seq_len, components)
    if noise > 0 and hasattr(model, "flows"):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.flows.parameters():
                param.add_(noise * torch.randn(param.shape, generator=generator))
    return model.eval()


def layers_per_token(model) -> float:
    if hasattr(model, "flows"):
        depth = sum(len(flow.conditioner.body.blocks) for flow in model.flows)
        return depth / model.patch_size
    return len(model.body.blocks)


def time_sampling(model, samples: int, length: int, repeats: int, cached: bool = True) -> float:
    """Median seconds to generate `samples` x `length` tokens."""

    def once():
        generator = torch.Generator().manual_seed(0)
        if cached or not hasattr(model, "flows"):
            return model.sample(samples, length, generator=generator)
        D = model.encoder.dim * model.patch_size
        u = torch.randn(samples, length // model.patch_size, D, generator=generator)
        return model.decoder.decode(model.from_base(u, cached=False))

    return median_seconds(once, repeats)


def inverse_kind(model) -> str:
    """How the model's couplings are inverted: compiled kernels, the PyTorch solver, or in
    closed form (affine; the AR baseline has no flows)."""
    switches = [
        flow.coupling.compiled_inverse
        for flow in getattr(model, "flows", [])
        if hasattr(flow.coupling, "compiled_inverse")
    ]
    if not switches:
        return "closed form" if hasattr(model, "flows") else ""
    return "compiled" if all(switches) else "PyTorch"


def use_compiled_inverse(model, compiled: bool) -> None:
    for flow in model.flows:
        if hasattr(flow.coupling, "compiled_inverse"):
            flow.coupling.compiled_inverse = compiled


def uncached_ar_seconds(model, samples: int, length: int, repeats: int) -> float:
    """The AR baseline without its cache: the whole prefix through the model every step."""

    @torch.no_grad()
    def once():
        generator = torch.Generator().manual_seed(0)
        x = torch.zeros(samples, 0, dtype=torch.long)
        while x.shape[1] < length:
            padded = torch.cat([x, torch.zeros(samples, 1, dtype=torch.long)], dim=1)
            probs = torch.softmax(model.logits(padded)[:, -1], -1)
            x = torch.cat([x, torch.multinomial(probs, 1, generator=generator)], dim=1)

    return median_seconds(once, repeats)


def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        f"{header['samples']} samples x {header['length']} tokens per call, vocabulary "
        f"{header['vocab']}, median of {header['repeats']} calls after a warm-up (AR: mean of "
        "its first and last timing), flow weights "
        f"at init + N(0, {header['weight_noise']}^2) noise; {header['machine']}, torch "
        f"{header['torch']}.",
        "",
        "| model | P | cache | inverse | layers per token | tokens/s | ratio to AR |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['patch']} | {'yes' if row['cached'] else 'no'} "
            f"| {row['inverse']} | {row['layers_per_token']:g} | {row['tokens_per_second']:,.0f} "
            f"| {row['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="sequences per call")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=66, help="V (tinyshakespeare has 66)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--couplings", nargs="+", default=["affine", "mixture", "discrete"])
    parser.add_argument("--weight-noise", type=float, default=0.05)
    parser.add_argument("--no-uncached", action="store_true", help="skip the uncached rows")
    parser.add_argument(
        "--no-pytorch-solver",
        action="store_true",
        help="skip the rows that invert the mixture couplings with the PyTorch solver",
    )
    parser.add_argument("--run", action="append", default=[], help="a trained run folder to add")
    parser.add_argument("--out", default=str(HERE / "results" / "sampling"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    _, components = registry.load()
    config.setup(components)
    rows = []

    def add(name, patch, model, seconds, cached=True):
        tokens = args.samples * args.length
        rows.append(
            {
                "model": name,
                "patch": patch,
                "cached": cached,
                "inverse": inverse_kind(model),
                "layers_per_token": layers_per_token(model),
                "seconds": seconds,
                "tokens_per_second": tokens / seconds,
            }
        )
        print(
            f"{name:>10} P={patch} cache={cached} {rows[-1]['inverse']}: "
            f"{tokens / seconds:,.0f} tokens/s",
            flush=True,
        )

    ar = build("ar", 1, args.vocab, args.length, components, 0.0)
    add("ar", 1, ar, time_sampling(ar, args.samples, args.length, args.repeats))
    if not args.no_uncached:
        add("ar", 1, ar, uncached_ar_seconds(ar, args.samples, args.length, args.repeats), False)
    for name in args.couplings:
        for patch in args.patches:
            model = build(name, patch, args.vocab, args.length, components, args.weight_noise)
            add(name, patch, model, time_sampling(model, args.samples, args.length, args.repeats))
            if patch == 1 and inverse_kind(model) == "compiled" and not args.no_pytorch_solver:
                use_compiled_inverse(model, False)
                add(name, patch, model, time_sampling(model, args.samples, args.length, 1))
                use_compiled_inverse(model, True)
            if patch == 1 and not args.no_uncached:
                seconds = time_sampling(model, args.samples, args.length, args.repeats, False)
                add(name, patch, model, seconds, cached=False)

    for run_dir in args.run:
        finished = config.load_finished_run(Path(run_dir), components)
        model = finished.model
        seconds = time_sampling(model, args.samples, args.length, args.repeats)
        add(f"trained {Path(run_dir).name}", getattr(model, "patch_size", 1), model, seconds)

    # The AR baseline is timed again last, and its row takes the mean of both: a machine that
    # sped up or slowed down during the run then moves the reference with it.
    first_ar = rows[0]["seconds"]
    last_ar = time_sampling(ar, args.samples, args.length, args.repeats)
    rows[0]["seconds"] = 0.5 * (first_ar + last_ar)
    rows[0]["seconds_first_and_last"] = [first_ar, last_ar]
    rows[0]["tokens_per_second"] = args.samples * args.length / rows[0]["seconds"]
    print(f"        ar timed again last: {args.samples * args.length / last_ar:,.0f} tokens/s")
    reference = rows[0]["tokens_per_second"]
    for row in rows:
        row["ratio"] = row["tokens_per_second"] / reference
    header = {
        "samples": args.samples,
        "length": args.length,
        "vocab": args.vocab,
        "repeats": args.repeats,
        "weight_noise": args.weight_noise,
        **machine(),
    }
    write_results(args.out, header, rows, markdown(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
