"""The command line of the main job: train, evaluate and sample a model described by gin files.

python -m tarflow_core.run --gin gin/mixture.gin [--bind 'TrainConfig.steps = 100'] ...
python -m tarflow_core.run --resume runs/<name>-<date>      # continue after a crash
torchrun --standalone --nproc_per_node 2 -m tarflow_core.run --gin ...   # several processes
"""

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tarflow_core import config, registry
from tarflow_core.errors import PluginHookError, TarflowError
from tarflow_core.train import RUN_FILE, distributed_context, run_experiment

logger = logging.getLogger("tarflow_core.run")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tarflow_core.run",
        description="Train a TarFlowLM, report its validation bound and print samples.",
    )
    parser.add_argument(
        "--gin", action="append", default=[], metavar="FILE", help="gin file (repeatable)"
    )
    parser.add_argument(
        "--bind",
        "--gin_param",
        action="append",
        default=[],
        metavar="BINDING",
        help="a gin binding applied after the files, e.g. 'TrainConfig.steps = 100'",
    )
    parser.add_argument(
        "--list-components", action="store_true", help="list registered components and exit"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in this folder from its last checkpoint; its own "
        "operative_config.gin is used unless --gin is given (--bind still applies)",
    )
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return int(text)


def resume_gin_files(args) -> list[str]:
    """The gin files of a run: those given, or the resumed run's own operative config."""
    if args.resume is None:
        return args.gin
    run_dir = Path(args.resume)
    if not (run_dir / RUN_FILE).is_file():
        raise TarflowError(
            f"{args.resume!r} is not a tarflow run folder (it has no {RUN_FILE})",
            hint="give the folder a run was written to, e.g. runs/<name>-<date>",
        )
    return args.gin or [str(run_dir / "operative_config.gin")]


def start_distributed() -> bool:
    """Join the process group torchrun describes in the environment; False without one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # Collectives on CPU tensors go through gloo; NCCL serves tensors on GPUs.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    return True


def blame_plugin(pm, error: BaseException) -> PluginHookError | None:
    """A plugin hook in the error's traceback (the deepest one), as an error naming it."""
    hooks = {}
    for hook_name, caller in vars(pm.hook).items():
        if hook_name.startswith("tarflow_"):
            for impl in caller.get_hookimpls():
                hooks[impl.function.__code__] = (impl.plugin_name, hook_name)
    found = None
    frame = error.__traceback__
    while frame is not None:
        found = hooks.get(frame.tb_frame.f_code, found)
        frame = frame.tb_next
    if found is None:
        return None
    plugin, hook_name = found
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return PluginHookError(
        f"plugin {plugin!r} raised in {hook_name}: {type(error).__name__}: {first[:300]}",
        hint="fix or uninstall the package that provides it; a run that had started "
        "training kept its last checkpoint for --resume",
    )


def stop_on_sigterm(signum, frame):
    """Turn SIGTERM into the interrupt path, so checkpoints are saved and trackers closed."""
    raise KeyboardInterrupt


class LogProgress:
    """Progress for a log file or a CI console: a line every tenth of the way, and at least
    every `every_seconds`, with the time spent and an estimate of the time left."""

    def __init__(self, total: int, desc: str, every_seconds: float = 30.0):
        self.total, self.desc, self.done, self.postfix = total, desc, 0, {}
        self.every = max(1, total // 10)
        self.every_seconds = every_seconds
        self.started = self.last_line = time.monotonic()
        # The rate is measured from the first update on: a resumed run's first update jumps
        # over the steps done before, at no cost.
        self.rate_from = None

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.rate_from is None:
            self.rate_from = (self.done, now)
        due = self.done % self.every == 0 or now - self.last_line >= self.every_seconds
        if self.done > 0 and (due or self.done == self.total):
            self.last_line = now
            elapsed = now - self.started
            counted, since = self.done - self.rate_from[0], now - self.rate_from[1]
            left = since / counted * (self.total - self.done) if counted > 0 else 0.0
            extra = " ".join(f"{k} {v}" for k, v in self.postfix.items())
            logger.info(
                "%s %d/%d %s [%s elapsed, %s left]",
                self.desc,
                self.done,
                self.total,
                extra,
                tqdm.format_interval(elapsed),
                tqdm.format_interval(left),
            )

    def set_postfix(self, values: dict) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str):
    """A live bar on a terminal, periodic log lines anywhere else."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, dynamic_ncols=True)
    return LogProgress(total, desc)


def print_summary(summary: dict) -> None:
    val = summary["val"]
    print()
    print(f"run folder:      {summary['run_dir']}")
    print(f"parameters:      {summary['parameters'] / 1e6:.2f}M")
    print(f"training time:   {summary['train_seconds']:.0f} s")
    print(f"val NELBO:       {val['val/nelbo']:.4f} nats/token (upper bound)")
    if "val/bpc" in val:
        print(f"val bits/char:   {val['val/bpc']:.4f} (upper bound)")
    if "val/iw_bpc" in val:
        print(f"  IW bits/char:  {val['val/iw_bpc']:.4f} (importance-weighted, tighter)")
    if "val/ppl" in val:
        print(f"val perplexity:  {val['val/ppl']:.2f} (upper bound)")
    if "val/iw_ppl" in val:
        print(f"  IW perplexity: {val['val/iw_ppl']:.2f} (importance-weighted, tighter)")
    for index, text in enumerate(summary["samples"]):
        print(f"\n--- sample {index} ---\n{text}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    distributed = start_distributed()
    try:
        return _main(args)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _main(args) -> int:
    ctx = distributed_context()
    # In a multi-process run, rank 0 speaks for all; the others report only problems.
    logging.basicConfig(
        level=args.log_level if ctx.is_main else "WARNING",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if ctx.world_size == 1
        else f"%(asctime)s rank {ctx.rank} %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    pm = None
    try:
        pm, components = registry.load()
        if args.list_components:
            print(registry.plugin_summary(components))
            return 0
        gin_files = resume_gin_files(args)
        if not gin_files:
            raise TarflowError("no gin file given", hint="try --gin gin/mixture.gin")
        config.setup(components)
        config.parse(gin_files, args.bind)

        experiment = config.build_experiment(components)
        operative = config.operative_config()

        with logging_redirect_tqdm():
            summary = run_experiment(
                experiment.model,
                experiment.corpus,
                experiment.train_config,
                experiment.run_config,
                pm.hook,
                operative,
                config.flat_bindings(operative),
                progress_bar,
                resume_dir=args.resume,
            )
    except TarflowError as error:
        print(f"error: {error.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; a run that had started training kept a checkpoint: continue it "
            "with --resume <its run folder>",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        blamed = blame_plugin(pm, error) if pm is not None else None
        if blamed is None:
            raise
        print(f"error: {blamed.one_line()}", file=sys.stderr)
        return 2
    if ctx.is_main:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
