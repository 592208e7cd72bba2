"""Training, evaluation and sampling of a TarFlowLM: the loop behind the main job."""

import logging
import math
import time
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


@dataclass
class RunConfig:
    """Where a run is written and tracked, and what it samples at the end."""

    name: str = "tarflow"
    output_dir: str = "runs"
    track: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "tarflow"
    num_samples: int = 4
    sample_temperature: float = 1.0


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


def cosine_schedule(config: TrainConfig):
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak, as a multiplier."""

    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return multiplier


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
    T = x.shape[1]
    terms = model.elbo(x, noise)
    loss = -terms.elbo.mean() / T
    parts = {
        "recon": -terms.log_px_z.mean().item() / T,
        "log_q": terms.log_q.mean().item() / T,
        "log_base": terms.log_base.mean().item() / T,
    }
    for index, ladj in enumerate(terms.ladj):
        parts[f"flow/{index}/ladj"] = ladj.mean().item() / T
    return loss, parts


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, seed: int = 1234) -> dict:
    """The NELBO per token over every window, with noise fixed by `seed` so that evaluations
    along a run differ only through the model."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size]
        noise = torch.randn(*x.shape, model.encoder.dim, generator=generator, dtype=dtype)
        total += -model.elbo(x, noise).elbo.sum().item()
        count += x.numel()
    model.train(was_training)
    return {"nelbo": total / count, "tokens": count}


def validation_metrics(model, corpus: Corpus, config: TrainConfig) -> dict[str, float]:
    windows = validation_windows(corpus.val_ids, config.seq_len)
    result = evaluate(model, windows, config.eval_batch_size)
    report = bits_per_token_to_report(result["nelbo"], corpus.level)
    return {"val/nelbo": result["nelbo"], **{f"val/{k}": v for k, v in report.items()}}


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
    sampler = WindowSampler(corpus.train_ids, config.seq_len, config.batch_size, config.seed)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config))
    bar = progress(config.steps, "train")
    model.train()
    window = {"loss": 0.0, "count": 0, "parts": {}}
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    try:
        for step in range(1, config.steps + 1):
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
                hook.tarflow_log_metrics(metrics=metrics, step=step)
                bar.set_postfix({"nelbo": f"{nelbo:.3f}"})
                window = {"loss": 0.0, "count": 0, "parts": {}}

            if step % config.eval_every == 0 and step != config.steps:
                val = validation_metrics(model, corpus, config)
                hook.tarflow_log_metrics(metrics=val, step=step)
                logger.info("step %d: %s", step, _format(val))
            if step % config.checkpoint_every == 0 and step != config.steps:
                checkpoint.save(run_dir / "checkpoint", model, optimizer, scheduler, step)
    finally:
        bar.close()

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
    run_dir = new_run_dir(run)
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

    hook.tarflow_run_started(run=info)
    status = "FAILED"
    try:
        hook.tarflow_log_artifact(path=run_dir / "operative_config.gin")
        hook.tarflow_log_artifact(path=run_dir / "tokenizer.json")
        started = time.perf_counter()
        train_metrics = train(model, corpus, config, hook, run_dir, progress)
        train_seconds = time.perf_counter() - started

        val = validation_metrics(model, corpus, config)
        hook.tarflow_log_metrics(metrics=val, step=config.steps)
        logger.info("validation: %s", _format(val))

        samples = sample_texts(
            model, corpus, run.num_samples, config.seq_len, run.sample_temperature, config.seed
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
