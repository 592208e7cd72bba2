"""Training, evaluation and sampling of a TarFlowLM: the loop behind the main job."""

import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None

from tarflow_core import checkpoint
from tarflow_core.data import (
    Corpus,
    WindowSampler,
    bits_per_token_to_report,
    save_tokenizer,
    validation_windows,
)
from tarflow_core.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteStepsError,
    TarflowError,
)

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
    # Steps in a row whose loss or gradient is NaN or infinite before the run stops; each such
    # step is skipped (no update) and counted in train/skipped_steps.
    max_consecutive_skips: int = 10

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
            "max_consecutive_skips",
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
    resumed: bool = False  # True when the run continues in an existing run folder


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


def check_stages_fit(model, config: TrainConfig) -> None:
    """Refuse progressive shares that do not give one stage per flow."""
    if config.progressive_shares is None:
        return
    stages = len(config.stage_lengths())
    flows = getattr(model, "flows", None)
    if flows is None or len(flows) != stages:
        raise ConfigError(
            f"progressive_shares has {stages} stages but the model has "
            f"{0 if flows is None else len(flows)} flows",
            hint="give one share per flow, or set TrainConfig.progressive_shares = None",
        )


def enter_stage(model, config: TrainConfig, stage: int):
    """Freeze what a progressive stage must not change; return its optimiser and schedule.

    Stage 0 trains the first flow with the codebook (encoder, and the decoder tied to it);
    stage s > 0 trains flow s alone, on top of the frozen flows before it.
    """
    check_stages_fit(model, config)
    lengths = config.stage_lengths()
    if config.progressive_shares is not None:
        flows = model.flows
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


METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Distributed:
    """This process's place in a multi-process run (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> Distributed:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Distributed()


class SilentHook:
    """The hook relay of ranks other than 0: only rank 0 logs and tracks."""

    def tarflow_log_metrics(self, metrics, step):
        pass

    def tarflow_log_artifact(self, path):
        pass

    def tarflow_run_started(self, run):
        pass

    def tarflow_run_finished(self, run, status):
        pass


class MetricsLog:
    """Sends metrics to the hooks and appends them to the run's metrics.jsonl, one line a call.

    The file is the run's own record, independent of any tracker; on resume it is cut back to
    the checkpoint's step, so it reads exactly as an uninterrupted run's would.
    """

    def __init__(self, hook, path: Path | None):
        self.hook, self.path = hook, path

    def __call__(self, metrics: dict, step: int) -> None:
        if self.hook is not None:
            self.hook.tarflow_log_metrics(metrics=metrics, step=step)
        if self.path is not None:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": step, **metrics}) + "\n")

    def keep_until(self, step: int, final: bool = False) -> None:
        """Drop the lines after `step` (and a line a kill cut short). With `final`, `step` is
        the last step, whose validation comes after its checkpoint and is dropped too."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            at = record.get("step", math.inf)
            scored_after = final and at == step and any(k.startswith("val/") for k in record)
            if at <= step and not scored_after:
                kept.append(line + "\n")
        checkpoint.write_text_atomic(self.path, "".join(kept))


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StopRequest:
    """Ctrl-C or SIGTERM during training: finish the step, save a checkpoint, then stop.

    A second signal stops at once; the last checkpoint written stands. Signal handlers can
    only be set from the main thread; elsewhere the signals keep their usual behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing the step and saving a checkpoint")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class ElboLoss(torch.nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, noise):
        return loss_terms(self.model, x, noise)


def _loss_module(model, ctx: Distributed):
    module = ElboLoss(model)
    if ctx.world_size == 1:
        return module
    # Built again at every stage: DDP fixes the set of trained parameters when it is made.
    return torch.nn.parallel.DistributedDataParallel(module)


def _local_rows(config: TrainConfig, ctx: Distributed) -> slice:
    """This rank's rows of the global batch: every rank draws the same windows and noise."""
    share = config.batch_size // ctx.world_size
    return slice(ctx.rank * share, (ctx.rank + 1) * share)


def check_world_size(config: TrainConfig, ctx: Distributed) -> None:
    if config.batch_size % ctx.world_size:
        raise ConfigError(
            f"TrainConfig.batch_size = {config.batch_size} does not split over "
            f"{ctx.world_size} processes",
            hint="the batch size is global: make it a multiple of the process count",
        )


def _new_window() -> dict:
    return {"loss": 0.0, "count": 0, "parts": {}}


def _reduce_mean(values: list[float], ctx: Distributed) -> list[float]:
    if ctx.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return (tensor / ctx.world_size).tolist()


def _step_scheduler(scheduler) -> None:
    # A skipped first step calls the schedule before the optimiser, which torch warns about;
    # the schedule follows the step count on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
        )
        scheduler.step()


def apply_settings(optimizer, scheduler, config: TrainConfig) -> None:
    """Make a restored optimiser and schedule follow this run's rate and weight decay.

    Their saved states hold the settings they were built with, which would quietly win over a
    `--bind "TrainConfig.lr = ..."` given to a resume; the moments and the step count stay.
    With unchanged settings this changes nothing.
    """
    decays = [config.weight_decay, 0.0]  # the groups of make_optimizer, in its order
    for group, decay in zip(optimizer.param_groups, decays, strict=True):
        group["initial_lr"] = config.lr
        group["weight_decay"] = decay
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = config.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _settings_changed(saved: dict, config: TrainConfig) -> list[str]:
    current = asdict(config)
    return [
        f"{key} {saved[key]!r} -> {current[key]!r}"
        for key in sorted(current)
        if key in saved and saved[key] != current[key]
    ]


def train(
    model,
    corpus: Corpus,
    config: TrainConfig,
    hook,
    run_dir: Path,
    progress=null_progress,
    resume: bool = False,
):
    """Optimise the NELBO; evaluate, log and checkpoint along the way. Returns the last metrics.

    Args:
        hook: the plugin manager's hook relay (`pm.hook`); metrics and artifacts go through it.
        progress: a factory `(total, desc) -> bar` with `update`, `set_postfix` and `close`.
        resume: continue from the newest complete checkpoint in `run_dir`, if there is one.

    In a multi-process run (torch.distributed initialised) every rank draws the same global
    batch and noise and trains on its own rows of it; gradients are averaged, so the run
    follows the single-process one. Rank 0 alone logs, evaluates and writes checkpoints.
    """
    run_dir = Path(run_dir)
    ctx = distributed_context()
    check_world_size(config, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    sampler = WindowSampler(
        corpus.train_ids, config.seq_len, config.batch_size, stream_seed(config.seed, "data")
    )
    # The encoder's noise comes from a stream of its own, drawn for the whole global batch, so
    # that neither the process count nor a resume changes it.
    noise_generator = torch.Generator().manual_seed(stream_seed(config.seed, "noise"))
    log = MetricsLog(hook, run_dir / METRICS_FILE if ctx.is_main else None)
    checkpoint_dir = run_dir / "checkpoint"
    stage_ends = stage_plan(config)
    rows = _local_rows(config, ctx)

    saved_state = _restore(checkpoint_dir, model, config, ctx) if resume else None
    if saved_state is None:
        done, stage, skipped, in_a_row, window = 0, 0, 0, 0, _new_window()
        last_good = 0
    else:
        done, stage = saved_state["step"], saved_state["stage"]
        skipped, in_a_row = saved_state["skipped"], saved_state["skipped_in_a_row"]
        # The last step whose update was applied (older checkpoints did not keep it).
        last_good = saved_state.get("last_good_step", done)
        window = saved_state["window"]
        sampler.generator.set_state(saved_state["rng"]["data"])
        noise_generator.set_state(saved_state["rng"]["noise"])
        torch.set_rng_state(saved_state["rng"]["torch"])
    log.keep_until(done, final=done == config.steps)

    optimizer, scheduler = enter_stage(model, config, stage)
    if saved_state is not None:
        optimizer.load_state_dict(saved_state["optimizer"])
        scheduler.load_state_dict(saved_state["scheduler"])
        apply_settings(optimizer, scheduler, config)
    loss_module = _loss_module(model, ctx)

    def save(at_step: int) -> None:
        if not ctx.is_main:
            return
        state = {
            "step": at_step,
            "stage": stage,
            "skipped": skipped,
            "skipped_in_a_row": in_a_row,
            "last_good_step": last_good,
            "window": window,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {
                "data": sampler.generator.get_state(),
                "noise": noise_generator.get_state(),
                "torch": torch.get_rng_state(),
            },
            "train_config": asdict(config),
        }
        checkpoint.save(checkpoint_dir, model, at_step, state)

    bar = progress(config.steps, "train")
    bar.update(done)
    model.train()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    try:
        with StopRequest() as stop:
            for step in range(done + 1, config.steps + 1):
                if step > stage_ends[stage]:
                    stage += 1
                    optimizer, scheduler = enter_stage(model, config, stage)
                    loss_module = _loss_module(model, ctx)
                x = sampler.next_batch()  # (B, T), the global batch
                noise = model.noise_like(x, noise_generator)  # (B, T, D), or None
                local_noise = None if noise is None else noise[rows]
                loss, parts = loss_module(x[rows], local_noise)
                # The whole model, not the optimiser's share: a progressive stage's frozen
                # parameters would otherwise keep their last gradients and swell the norm.
                model.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                )

                # One reduction carries the loss, its parts and any stop request.
                reduced = _reduce_mean([loss.item(), *parts.values(), float(stop.requested)], ctx)
                loss_value = reduced[0]
                parts = dict(zip(parts, reduced[1:-1], strict=True))
                stop_now = reduced[-1] > 0

                # Gradients are averaged over ranks before the norm, so every rank agrees.
                if math.isfinite(loss_value) and math.isfinite(grad_norm):
                    optimizer.step()
                    in_a_row = 0
                    last_good = step
                    window["loss"] += loss_value
                    window["count"] += 1
                    for key, value in parts.items():
                        window["parts"][key] = window["parts"].get(key, 0.0) + value
                else:
                    model.zero_grad(set_to_none=True)
                    skipped += 1
                    in_a_row += 1
                    logger.warning(
                        "step %d skipped: loss %s, gradient norm %s (%d in a row)",
                        step,
                        loss_value,
                        grad_norm,
                        in_a_row,
                    )
                # The schedule follows the step count, skipped steps included.
                _step_scheduler(scheduler)
                bar.update(1)

                if in_a_row >= config.max_consecutive_skips:
                    error = NonFiniteStepsError(
                        f"training stopped at step {step}: {in_a_row} steps in a row had a "
                        f"non-finite loss or gradient; the checkpoint in {checkpoint_dir} "
                        f"holds the weights after step {last_good}, the last update applied",
                        hint="lower TrainConfig.lr or TrainConfig.grad_clip, then continue "
                        f"with --resume {run_dir} and a --bind that changes it; if no step "
                        "succeeds after that either, the weights themselves are unusable (a "
                        "finite but ruinous update): start a new run with the lower rate",
                    )
                    log({"train/skipped_steps": skipped}, step)
                    # A resumed run starts with a fresh allowance of skipped steps.
                    in_a_row = 0
                    save(step)
                    raise error

                if step % config.log_every == 0 or step == config.steps:
                    metrics = _window_metrics(window, corpus, config, stage)
                    metrics["train/lr"] = scheduler.get_last_lr()[0]
                    metrics["train/grad_norm"] = grad_norm
                    metrics["train/skipped_steps"] = skipped
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    metrics["train/tokens_per_second"] = (step - done) * x.numel() / elapsed
                    log(metrics, step)
                    bar.set_postfix(_postfix(metrics))
                    window = _new_window()

                if step % config.eval_every == 0 and step != config.steps and ctx.is_main:
                    val = validation_metrics(model, corpus, config)
                    log(val, step)
                    logger.info("step %d: %s", step, _format(val))
                if step % config.checkpoint_every == 0 or step == config.steps or stop_now:
                    save(step)
                if stop_now:
                    logger.warning("stopped at step %d; checkpoint saved in %s", step, run_dir)
                    raise KeyboardInterrupt
    finally:
        bar.close()
        model.requires_grad_(True)
    return metrics


def _restore(checkpoint_dir: Path, model, config: TrainConfig, ctx: Distributed):
    """Load the newest complete checkpoint's weights into `model`; return its trainer state,
    or None when the run has no checkpoint yet."""
    if ctx.is_main:
        checkpoint.recover(checkpoint_dir)
    if ctx.world_size > 1:
        torch.distributed.barrier()  # the others read what rank 0 recovered
    if not checkpoint_dir.exists():
        logger.warning("no checkpoint in %s yet: training starts from step 0", checkpoint_dir)
        return None
    checkpoint.read_manifest(checkpoint_dir)  # refuses what cannot resume, saying why
    manifest = checkpoint.load_weights(checkpoint_dir, model)
    saved_state = checkpoint.load_trainer_state(checkpoint_dir)
    changed = _settings_changed(saved_state.get("train_config", {}), config)
    if changed:
        logger.warning(
            "resuming with changed settings (%s): the run will differ from an uninterrupted one",
            "; ".join(changed),
        )
    logger.info("resuming from step %d (checkpoint %s)", manifest["step"], checkpoint_dir)
    return saved_state


def _postfix(metrics: dict) -> dict:
    """What the progress bar shows: the loss, and skipped steps once there are any."""
    postfix = {}
    if "train/nelbo" in metrics:
        postfix["nelbo"] = f"{metrics['train/nelbo']:.3f}"
    if metrics["train/skipped_steps"]:
        postfix["skipped"] = int(metrics["train/skipped_steps"])
    return postfix


def _window_metrics(window: dict, corpus: Corpus, config: TrainConfig, stage: int) -> dict:
    """Means over the steps since the last log line; none when every one was skipped."""
    metrics = {}
    n = window["count"]
    if n:
        nelbo = window["loss"] / n
        metrics["train/nelbo"] = nelbo
        for key, value in window["parts"].items():
            name = key if key.startswith("flow/") else f"train/{key}"
            metrics[name] = value / n
        if corpus.level == "char":
            metrics["train/bpc"] = nelbo / math.log(2)
    if config.progressive_shares is not None:
        metrics["train/stage"] = stage
    return metrics


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def _model_bindings(params: dict[str, str]) -> dict[str, str]:
    """The bindings that shape the model and its data, with macros written out."""
    macros = {key: value for key, value in params.items() if "." not in key}
    resolved = {}
    for key, value in params.items():
        if "." not in key or key.split("/")[-1].startswith(("TrainConfig.", "RunConfig.")):
            continue
        resolved[key] = macros.get(value[1:], value) if value.startswith("%") else value
    return resolved


LOCK_FILE = ".lock"


def _not_writable(run_dir: Path, error: OSError) -> TarflowError:
    return TarflowError(
        f"cannot write to the run folder {str(run_dir)!r}: {error.strerror}",
        hint="resume a run whose folder is writable (copy it somewhere writable)",
    )


@contextlib.contextmanager
def exclusive_use(run_dir: Path):
    """Hold the run folder for this process: a second command that would train in it (a
    resume while the run still goes on, say) is refused instead of writing over its files.
    The lock is the operating system's, so it ends with the process, however it ends."""
    if fcntl is None:  # pragma: no cover - not on this platform; the folder goes unguarded
        yield
        return
    try:
        handle = open(run_dir / LOCK_FILE, "a")
    except OSError as error:
        raise _not_writable(run_dir, error) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TarflowError(
                f"the run folder {str(run_dir)!r} is in use by another process",
                hint="wait for that run to end (or stop it), then resume",
            ) from None
        yield


def _check_resumable(run_dir: Path, corpus: Corpus, params: dict[str, str], model) -> dict:
    """Refuse to resume a folder that is no run, one whose model or data differ, or one whose
    checkpoint cannot carry this model on; before anything in the folder is touched."""
    record_path = run_dir / RUN_FILE
    if not run_dir.is_dir():
        raise CheckpointError(
            f"no run folder {str(run_dir)!r} to resume",
            hint="give the folder a run was written to, e.g. runs/<name>-<date>",
        )
    if not record_path.exists():
        raise CheckpointError(
            f"{str(run_dir)!r} is not a tarflow run folder (it has no {RUN_FILE})",
            hint="give the folder a run was written to, e.g. runs/<name>-<date>",
        )
    record = json.loads(record_path.read_text())
    before, now = _model_bindings(record.get("params", {})), _model_bindings(params)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        key = changed[0]
        raise CheckpointError(
            f"cannot resume {str(run_dir)!r} with a different model or data: {key} is "
            f"{before.get(key, 'unset')} there and {now.get(key, 'unset')} here"
            + (f" ({len(changed) - 1} more differ)" if len(changed) > 1 else ""),
            hint="resume with the run's own operative_config.gin: drop the --bind that changes "
            "the model or the data, or start a new run",
        )
    tokenizer_path = run_dir / "tokenizer.json"
    if tokenizer_path.exists() and tokenizer_path.read_text() != corpus.tokenizer.to_str():
        raise CheckpointError(
            f"the corpus {corpus.name!r} now gives another vocabulary than the run's "
            "tokenizer.json: the text changed since the run started",
            hint="restore the corpus file the run was trained on, or start a new run",
        )

    # The checkpoint is read as the resume will read it (the newest complete one, a save cut
    # short between its renames included), so a refusal comes before the run's files or its
    # tracked record change.
    folder = run_dir / "checkpoint"
    newest = checkpoint.find(folder)
    if newest is None and folder.exists():
        checkpoint.read_manifest(folder)  # refuses, saying what is wrong with it
    if newest is not None:
        checkpoint.check_shapes(checkpoint.read_manifest(newest), model, newest)
        checkpoint.load_trainer_state(newest)
    return record


def _prepare_run_dir(run: RunConfig, corpus, config_text, params, resume_dir, model, lock):
    """The run folder, new or resumed, locked for this process (`lock`, an ExitStack), with
    its config, tokenizer and record written."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        record = _check_resumable(run_dir, corpus, params, model)
        lock.enter_context(exclusive_use(run_dir))
        try:
            checkpoint.write_text_atomic(run_dir / "operative_config.gin", config_text)
        except OSError as error:
            raise _not_writable(run_dir, error) from None
        record["params"] = params
        checkpoint.write_text_atomic(run_dir / RUN_FILE, json.dumps(record, indent=2))
        return run_dir
    try:
        run_dir = new_run_dir(run)
    except OSError as error:
        raise TarflowError(
            f"cannot create a run folder under {run.output_dir!r}: {error.strerror}",
            hint="set RunConfig.output_dir to a writable folder",
        ) from None
    lock.enter_context(exclusive_use(run_dir))
    checkpoint.write_text_atomic(run_dir / "operative_config.gin", config_text)
    save_tokenizer(corpus, run_dir / "tokenizer.json")
    record = {"name": run.name, "params": params}
    checkpoint.write_text_atomic(run_dir / RUN_FILE, json.dumps(record, indent=2))
    return run_dir


def _shared_run_dir(
    run, corpus, config_text, params, resume_dir, model, lock, ctx: Distributed
) -> Path:
    """Rank 0 prepares the run folder; the others learn its path, or its error."""
    outcome: list = [None]
    if ctx.is_main:
        try:
            outcome[0] = _prepare_run_dir(
                run, corpus, config_text, params, resume_dir, model, lock
            )
        except TarflowError as error:
            outcome[0] = error
    if ctx.world_size > 1:
        torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], TarflowError):
        raise outcome[0]
    return Path(outcome[0])


def _share_start_failure(failure: BaseException | None, ctx: Distributed) -> None:
    """Raise rank 0's failure to start a run on every rank, so none waits for the others."""
    if ctx.world_size > 1:
        message = [None]
        if failure is not None:
            one_line = failure.one_line() if isinstance(failure, TarflowError) else None
            message[0] = one_line or f"{type(failure).__name__}: {failure}"
        torch.distributed.broadcast_object_list(message, src=0)
        if failure is None and message[0] is not None:
            raise TarflowError(f"rank 0 could not start the run: {message[0]}")
    if failure is not None:
        raise failure


def run_experiment(
    model,
    corpus: Corpus,
    config: TrainConfig,
    run: RunConfig,
    hook,
    config_text: str,
    params: dict[str, str],
    progress=null_progress,
    resume_dir: str | Path | None = None,
) -> dict:
    """The main job: train, score the validation split, sample, and record it all.

    With `resume_dir`, training continues in that run folder from its newest checkpoint, and
    a tracker that recorded the run (MLflow) continues the same tracked run.
    """
    ctx = distributed_context()
    if not ctx.is_main:
        hook, progress = SilentHook(), null_progress

    # Everything that can be checked without training is checked before anything is written.
    validation_windows(corpus.val_ids, config.seq_len)
    WindowSampler(corpus.train_ids, config.seq_len, config.batch_size, config.seed)
    check_world_size(config, ctx)
    check_stages_fit(model, config)
    resumed = resume_dir is not None
    # Held until the run ends, so that no second command trains in the same folder.
    with contextlib.ExitStack() as lock:
        run_dir = _shared_run_dir(run, corpus, config_text, params, resume_dir, model, lock, ctx)
        return _run_in(
            run_dir, model, corpus, config, run, hook, config_text, params, progress, resumed, ctx
        )


def _run_in(
    run_dir, model, corpus, config, run, hook, config_text, params, progress, resumed, ctx
) -> dict:
    """`run_experiment` once its run folder is ready and locked."""
    info = RunInfo(
        run.name,
        run_dir,
        params,
        config_text,
        run.track,
        run.tracking_uri,
        run.experiment,
        tags={"corpus": corpus.name, "tokenizer": corpus.level},
        resumed=resumed,
    )
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("run folder %s; %.2fM parameters", run_dir, num_params / 1e6)

    failure = None
    try:
        hook.tarflow_run_started(run=info)
    except BaseException as error:
        # Nothing has been trained: leave no half-written run behind (a resumed run keeps
        # its folder as it was).
        if not resumed and ctx.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        failure = error
    _share_start_failure(failure, ctx)
    status = "FAILED"
    try:
        hook.tarflow_log_artifact(path=run_dir / "operative_config.gin")
        hook.tarflow_log_artifact(path=run_dir / "tokenizer.json")
        started = time.perf_counter()
        train_metrics = train(model, corpus, config, hook, run_dir, progress, resume=resumed)
        train_seconds = time.perf_counter() - started

        # Rank 0 scores and samples; the others wait for it, then return the same summary
        # keys without figures.
        val, samples = {}, []
        if ctx.is_main:
            val = validation_metrics(model, corpus, config, config.iw_samples)
            MetricsLog(hook, run_dir / METRICS_FILE)(val, config.steps)
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
            text = "\n\n".join(f"--- sample {i}\n{s}" for i, s in enumerate(samples))
            checkpoint.write_text_atomic(samples_path, text)
            hook.tarflow_log_artifact(path=samples_path)
            hook.tarflow_log_artifact(path=run_dir / "checkpoint")
        if ctx.world_size > 1:
            torch.distributed.barrier()

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
