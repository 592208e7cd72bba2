"""Training, evaluation and sampling of a TarFlowLM: the loop behind the main job."""

import logging
import math
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from tarflow_core import checkpoint
from tarflow_core.data import (
    Corpus,
    WindowSampler,
    bits_per_token_to_report,
    save_tokenizer,
    validation_windows,
)
from tarflow_core.errors import ConfigError, TarflowError

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation and data budget of a run."""

    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 128  # tokens per window
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    log_every: int = 10  # steps
    eval_every: int = 500  # steps; the validation split is also scored at the end
    eval_batch_size: int = 64
    checkpoint_every: int = 500  # steps
    seed: int = 0
    # Progressive training: the share of the steps given to each stage. Stage 0 trains the
    # first flow and the codebook; stage s > 0 freezes all before it and trains flow s alone.
    # None trains everything at once.
    progressive_shares: list[float] | None = None
    iw_samples: int = 0  # samples of z per sequence for the final importance-weighted bound

    def __post_init__(self):
        positive_ints = (
            "steps",
            "batch_size",
            "seq_len",
            "warmup_steps",
            "log_every",
            "eval_every",
            "eval_batch_size",
            "checkpoint_every",
        )
        for name in positive_ints:
            _require(self, name, int, lambda v: v >= 1, "a positive whole number")
        _require(self, "iw_samples", int, lambda v: v >= 0, "a whole number, 0 to skip")
        _require(self, "seed", int, lambda v: True, "a whole number")
        _require(self, "lr", float, lambda v: v > 0, "a positive number")
        _require(self, "weight_decay", float, lambda v: v >= 0, "a number >= 0")
        _require(self, "min_lr_ratio", float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _require(self, "grad_clip", float, lambda v: v > 0, "a positive number")
        if self.progressive_shares is not None:
            lengths = self.stage_lengths()
            if min(self.progressive_shares) <= 0 or min(lengths) < 1:
                raise ConfigError(
                    f"progressive_shares {list(self.progressive_shares)} give stages of "
                    f"{lengths} steps",
                    hint="give one positive share per flow, and enough steps for each",
                )

    def stage_lengths(self) -> list[int]:
        """Steps in each training stage."""
        if self.progressive_shares is None:
            return [self.steps]
        shares = list(self.progressive_shares)
        ends = [round(self.steps * sum(shares[: i + 1]) / sum(shares)) for i in range(len(shares))]
        return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def stream_seed(seed: int, stream: str) -> int:
    """A seed of its own for each random stream of a run (model initialisation, data order,
    sampling), derived from the run's one seed. With the same seed everywhere, the sampling
    noise would replay the noise that initialised the codebook."""
    return zlib.crc32(f"{stream}:{seed}".encode())


def _require(config, name: str, kind: type, valid, expected: str) -> None:
    """Refuse a config field of the wrong type or range, naming it and what it should be."""
    value = getattr(config, name)
    numeric = kind is float and isinstance(value, int) and not isinstance(value, bool)
    if (isinstance(value, kind) and not isinstance(value, bool)) or numeric:
        if valid(value):
            return
    raise ConfigError(
        f"{type(config).__name__}.{name} = {value!r} is not {expected}",
        hint=f"bind it in a gin file or with --bind '{type(config).__name__}.{name} = ...'",
    )


@dataclass
class RunConfig:
    """Where a run is written and tracked, and what it samples at the end."""

    name: str = "tarflow"
    model: str = "tarflow"  # the model family: "tarflow", or "ar" for the discrete baseline
    output_dir: str = "runs"
    track: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "tarflow"
    num_samples: int = 4
    sample_temperature: float = 1.0

    def __post_init__(self):
        for name in ("name", "model", "output_dir", "tracking_uri", "experiment"):
            _require(self, name, str, lambda v: v.strip() != "", "a non-empty string")
        if "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ConfigError(
                f"RunConfig.name = {self.name!r} must be a plain name, not a path",
                hint="set RunConfig.output_dir to choose where runs are written",
            )
        if not isinstance(self.track, bool):
            raise ConfigError(
                f"RunConfig.track = {self.track!r} is not True or False",
                hint="write RunConfig.track = False (no quotes)",
            )
        _require(self, "num_samples", int, lambda v: v >= 0, "a whole number >= 0")
        _require(self, "sample_temperature", float, lambda v: v > 0, "a positive number")


@dataclass
class RunInfo:
    """What lifecycle hooks learn about a run."""

    name: str
    run_dir: Path
    params: dict[str, str]
    config_text: str
    track: bool
    tracking_uri: str
    experiment: str
    tags: dict[str, str] = field(default_factory=dict)


class NullProgress:
    """The progress bar of library callers that do not want one."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def null_progress(total: int, desc: str) -> NullProgress:
    return NullProgress()


def cosine_schedule(config: TrainConfig, steps: int | None = None):
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak over `steps` (all of the
    run by default), as a multiplier."""
    total = config.steps if steps is None else steps
    warmup = min(config.warmup_steps, max(1, total // 2))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return multiplier


def stage_plan(config: TrainConfig) -> list[int]:
    """The last step of each training stage."""
    lengths = config.stage_lengths()
    return [sum(lengths[: i + 1]) for i in range(len(lengths))]


def enter_stage(model, config: TrainConfig, stage: int):
    """Freeze what a progressive stage must not change; return its optimiser and schedule.

    Stage 0 trains the first flow with the codebook (encoder, and the decoder tied to it);
    stage s > 0 trains flow s alone, on top of the frozen flows before it.
    """
    lengths = config.stage_lengths()
    if config.progressive_shares is not None:
        flows = getattr(model, "flows", None)
        if flows is None or len(flows) != len(lengths):
            raise ConfigError(
                f"progressive_shares has {len(lengths)} stages but the model has "
                f"{0 if flows is None else len(flows)} flows",
                hint="give one share per flow, or set TrainConfig.progressive_shares = None",
            )
        model.active_flows = stage + 1
        model.requires_grad_(False)
        flows[stage].requires_grad_(True)
        if stage == 0:
            model.encoder.requires_grad_(True)
            model.decoder.requires_grad_(True)
        logger.info("stage %d: training flow %d for %d steps", stage, stage, lengths[stage])
    optimizer = make_optimizer(model, config)
    schedule = cosine_schedule(config, lengths[stage])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on the flows' matrices only, never on the codebook or biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2 and not name.startswith(("encoder.", "decoder."))
        (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


def loss_terms(model, x: torch.Tensor, noise=None) -> tuple[torch.Tensor, dict]:
    """The mean NELBO in nats per token, and its parts for logging."""
    terms = model.elbo(x, noise)
    return -terms.elbo.mean() / x.shape[1], terms.parts(x.shape[1])


@torch.no_grad()
def evaluate(
    model, windows: torch.Tensor, batch_size: int, iw_samples: int = 0, seed: int = 1234
) -> dict:
    """Bounds per token over every window, with noise fixed by `seed` so that evaluations
    along a run differ only through the model.

    With `iw_samples` K > 1, every sequence gets K samples of z: `nelbo` is then the mean of
    their ELBOs and `iw_nelbo` the importance-weighted bound -log mean_k exp(ELBO_k), which
    is never looser on the same samples.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    samples = max(1, iw_samples)
    total, total_iw, count = 0.0, 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size]
        elbos = torch.stack(
            [model.elbo(x, model.noise_like(x, generator)).elbo for _ in range(samples)]
        )  # (K, B)
        total += -elbos.mean(0).sum().item()
        total_iw += -(torch.logsumexp(elbos, 0) - math.log(samples)).sum().item()
        count += x.numel()
    model.train(was_training)
    result = {"nelbo": total / count, "tokens": count}
    if iw_samples > 1:
        result["iw_nelbo"] = total_iw / count
    return result


def validation_metrics(
    model, corpus: Corpus, config: TrainConfig, iw_samples: int = 0
) -> dict[str, float]:
    windows = validation_windows(corpus.val_ids, config.seq_len)
    result = evaluate(model, windows, config.eval_batch_size, iw_samples)
    metrics = {}
    for prefix, key in (("", "nelbo"), ("iw_", "iw_nelbo")):
        if key in result:
            report = bits_per_token_to_report(result[key], corpus.level)
            metrics[f"val/{key}"] = result[key]
            metrics.update({f"val/{prefix}{name}": value for name, value in report.items()})
    return metrics


@torch.no_grad()
def sample_texts(model, corpus: Corpus, count: int, length: int, temperature: float, seed: int):
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = model.sample(count, length, temperature, generator)
    model.train(was_training)
    return [corpus.decode(row) for row in tokens]


def new_run_dir(run: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(run.output_dir) / f"{run.name}-{stamp}"
    path, suffix = base, 1
    while path.exists():
        suffix += 1
        path = base.with_name(f"{base.name}-{suffix}")
    path.mkdir(parents=True)
    return path


def train(model, corpus: Corpus, config: TrainConfig, hook, run_dir: Path, progress=null_progress):
    """Optimise the NELBO; evaluate, log and checkpoint along the way. Returns the last metrics.

    Args:
        hook: the plugin manager's hook relay (`pm.hook`); metrics and artifacts go through it.
        progress: a factory `(total, desc) -> bar` with `update`, `set_postfix` and `close`.
    """
    sampler = WindowSampler(
        corpus.train_ids, config.seq_len, config.batch_size, stream_seed(config.seed, "data")
    )
    stage_ends, stage = stage_plan(config), 0
    optimizer, scheduler = enter_stage(model, config, stage)
    bar = progress(config.steps, "train")
    model.train()
    window = {"loss": 0.0, "count": 0, "parts": {}}
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    step = 0
    try:
        for step in range(1, config.steps + 1):
            if step > stage_ends[stage]:
                stage += 1
                optimizer, scheduler = enter_stage(model, config, stage)
            x = sampler.next_batch()
            loss, parts = loss_terms(model, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()

            window["loss"] += loss.item()
            window["count"] += 1
            for key, value in parts.items():
                window["parts"][key] = window["parts"].get(key, 0.0) + value
            bar.update(1)

            if step % config.log_every == 0 or step == config.steps:
                n = window["count"]
                nelbo = window["loss"] / n
                elapsed = time.perf_counter() - started
                metrics = {
                    "train/nelbo": nelbo,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/tokens_per_second": step * x.numel() / elapsed,
                }
                for key, value in window["parts"].items():
                    name = key if key.startswith("flow/") else f"train/{key}"
                    metrics[name] = value / n
                if corpus.level == "char":
                    metrics["train/bpc"] = nelbo / math.log(2)
                if config.progressive_shares is not None:
                    metrics["train/stage"] = stage
                hook.tarflow_log_metrics(metrics=metrics, step=step)
                bar.set_postfix({"nelbo": f"{nelbo:.3f}"})
                window = {"loss": 0.0, "count": 0, "parts": {}}

            if step % config.eval_every == 0 and step != config.steps:
                val = validation_metrics(model, corpus, config)
                hook.tarflow_log_metrics(metrics=val, step=step)
                logger.info("step %d: %s", step, _format(val))
            if step % config.checkpoint_every == 0 and step != config.steps:
                checkpoint.save(run_dir / "checkpoint", model, optimizer, scheduler, step)
    except KeyboardInterrupt:
        # Keep the work done so far; the step is the last completed one.
        checkpoint.save(run_dir / "checkpoint", model, optimizer, scheduler, max(0, step - 1))
        logger.warning("interrupted at step %d; checkpoint saved in %s", step, run_dir)
        raise
    finally:
        bar.close()
        model.requires_grad_(True)

    checkpoint.save(run_dir / "checkpoint", model, optimizer, scheduler, config.steps)
    return metrics


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def run_experiment(
    model,
    corpus: Corpus,
    config: TrainConfig,
    run: RunConfig,
    hook,
    config_text: str,
    params: dict[str, str],
    progress=null_progress,
) -> dict:
    """The main job: train, score the validation split, sample, and record it all."""

    # Everything that can be checked without training is checked before anything is written.
    validation_windows(corpus.val_ids, config.seq_len)
    WindowSampler(corpus.train_ids, config.seq_len, config.batch_size, config.seed)
    try:
        run_dir = new_run_dir(run)
    except OSError as error:
        raise TarflowError(
            f"cannot create a run folder under {run.output_dir!r}: {error.strerror}",
            hint="set RunConfig.output_dir to a writable folder",
        ) from None
    (run_dir / "operative_config.gin").write_text(config_text)
    save_tokenizer(corpus, run_dir / "tokenizer.json")
    info = RunInfo(
        run.name,
        run_dir,
        params,
        config_text,
        run.track,
        run.tracking_uri,
        run.experiment,
        tags={"corpus": corpus.name, "tokenizer": corpus.level},
    )
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("run folder %s; %.2fM parameters", run_dir, num_params / 1e6)

    try:
        hook.tarflow_run_started(run=info)
    except BaseException:
        # Nothing has been trained: leave no half-written run behind.
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    status = "FAILED"
    try:
        hook.tarflow_log_artifact(path=run_dir / "operative_config.gin")
        hook.tarflow_log_artifact(path=run_dir / "tokenizer.json")
        started = time.perf_counter()
        train_metrics = train(model, corpus, config, hook, run_dir, progress)
        train_seconds = time.perf_counter() - started

        val = validation_metrics(model, corpus, config, config.iw_samples)
        hook.tarflow_log_metrics(metrics=val, step=config.steps)
        logger.info("validation: %s", _format(val))

        samples = sample_texts(
            model,
            corpus,
            run.num_samples,
            config.seq_len,
            run.sample_temperature,
            stream_seed(config.seed, "sample"),
        )
        samples_path = run_dir / "samples.txt"
        samples_path.write_text("\n\n".join(f"--- sample {i}\n{s}" for i, s in enumerate(samples)))
        hook.tarflow_log_artifact(path=samples_path)
        hook.tarflow_log_artifact(path=run_dir / "checkpoint")

        summary = {
            "run_dir": str(run_dir),
            "parameters": num_params,
            "train_seconds": train_seconds,
            "train": train_metrics,
            "val": val,
            "samples": samples,
            "config": asdict(config),
        }
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        hook.tarflow_run_finished(run=info, status=status)
