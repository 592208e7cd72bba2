"""Gin configuration: the one module of the project that imports gin.

Core functions and every registered component become configurables here. Components are bound
by kind and name, for example `coupling.mixture.num_components = 32` or
`conditioner.causal_transformer.width = 128`.
"""

import contextlib
import difflib
import inspect
import logging
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import torch

import gin
from gin import config_parser
from tarflow_core import baseline, checkpoint, data, model, train
from tarflow_core.errors import ConfigError

# The gin folder of a source checkout, searched after the working directory.
PROJECT_GIN_DIR = Path(__file__).resolve().parent.parent / "gin"

CORE_CONFIGURABLES = {
    "load_corpus": data.load_corpus,
    "build_model": model.build_model,
    "build_ar_model": baseline.build_ar_model,
    "TrainConfig": train.TrainConfig,
    "RunConfig": train.RunConfig,
}

_wrapped: dict[str, object] = {}  # selector -> gin-wrapped callable
_originals: dict[str, object] = {}  # selector -> the callable before wrapping


def _wrap(selector: str, fn, name: str, module: str | None = None):
    if selector in _wrapped:
        if _originals[selector] is not fn:
            raise ConfigError(
                f"{selector!r} was configured from another object earlier in this process",
                hint="restart the process after changing installed plugins",
            )
        return _wrapped[selector]
    _wrapped[selector] = gin.external_configurable(fn, name=name, module=module)
    _originals[selector] = fn
    return _wrapped[selector]


def setup(registry) -> None:
    """Make core functions and every registered component configurable."""
    for name, fn in CORE_CONFIGURABLES.items():
        _wrap(name, fn, name)
    for component in registry.components():
        selector = f"{component.kind}.{component.name}"
        if component.factory is _wrapped.get(selector):
            continue
        wrapped = _wrap(selector, component.factory, component.name, component.kind)
        registry.replace_factory(component.kind, component.name, wrapped)


def configured(name: str):
    """The gin-configured version of a core configurable."""
    return _wrapped[name]


MODEL_BUILDERS = {"tarflow": "build_model", "ar": "build_ar_model"}


def build_configured_model(run_config, vocab_size: int, seq_len: int, registry):
    """The model family `RunConfig.model` names, built with its gin bindings."""
    builder = MODEL_BUILDERS.get(run_config.model)
    if builder is None:
        raise ConfigError(
            f"unknown model family {run_config.model!r}",
            hint=f"RunConfig.model is one of {', '.join(MODEL_BUILDERS)}",
        )
    return configured(builder)(vocab_size=vocab_size, seq_len=seq_len, registry=registry)


@dataclass
class Experiment:
    """What the parsed gin configuration describes, built and ready to train."""

    corpus: data.Corpus
    train_config: train.TrainConfig
    run_config: train.RunConfig
    model: torch.nn.Module


def build_experiment(registry) -> Experiment:
    """Load the corpus, read the configs, seed, and build the model, all from gin."""
    corpus = configured("load_corpus")()
    train_config = configured("TrainConfig")()
    run_config = configured("RunConfig")()
    torch.manual_seed(train.stream_seed(train_config.seed, "init"))
    try:
        model = build_configured_model(
            run_config, corpus.vocab_size, train_config.seq_len, registry
        )
    except (ValueError, TypeError, ArithmeticError, RuntimeError) as error:
        # Components refuse bad settings with plain exceptions (torch's own, for impossible
        # shapes, are RuntimeErrors); gin appends its call chain on later lines, which say
        # nothing to the user.
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"invalid configuration: {type(error).__name__}: {first}",
            hint="check the values bound in the gin files and --bind",
        ) from None
    return Experiment(corpus, train_config, run_config, model)


def resolve_gin_file(path: str) -> str:
    """A gin file as given, or relative to the project root or its gin folder."""
    for candidate in (Path(path), PROJECT_GIN_DIR.parent / path, PROJECT_GIN_DIR / path):
        if candidate.is_file():
            return str(candidate)
    root = PROJECT_GIN_DIR.parent
    known = sorted(str(p.relative_to(root)) for p in PROJECT_GIN_DIR.rglob("*.gin"))
    close = difflib.get_close_matches(path, known, n=1)
    hint = (f"did you mean {close[0]!r}? " if close else "") + f"gin files: {', '.join(known)}"
    raise ConfigError(f"no gin file {path!r}", hint=hint)


def parse(files: list[str], bindings: list[str]) -> None:
    """Parse gin files, then command-line bindings, which win. Errors name the bad binding."""
    gin.clear_config()
    # Includes are written 'gin/...', relative to the project root. (A bare 'runs/x.gin' would
    # also be tried as a Python package path, and gin crashes on a namespace package such as a
    # 'runs' folder in the working directory.)
    gin.add_config_file_search_path(str(PROJECT_GIN_DIR.parent))
    resolved = [resolve_gin_file(f) for f in files]
    try:
        with _quiet_include_search():
            gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
    except (ValueError, KeyError, SyntaxError, TypeError, OSError, ImportError) as error:
        raise ConfigError(*_explain(error)) from None
    except tokenize.TokenError as error:
        raise ConfigError(
            f"bad gin configuration: {error.args[0]}", hint="check brackets and quotes"
        ) from None
    _refuse_unused_macros(bindings)


def _refuse_unused_macros(bindings: list[str]) -> None:
    """gin accepts a macro that nothing reads without a word, so `--bind "STEP = 20"` (for
    STEPS) would train the full run. A macro bound on the command line must be read somewhere."""
    bound = []
    for text in bindings:
        for statement in config_parser.ConfigParser(text, _Delegate()):
            if isinstance(statement, config_parser.BindingStatement) and not statement.arg_name:
                bound.append(statement.selector)
    if not bound:
        return

    read = set()

    def visit(value):
        if isinstance(value, gin.config.ConfigurableReference):
            scope, selector = value.config_key
            if selector == "gin.macro":
                read.add(scope)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for params in gin.config._CONFIG.values():
        for value in params.values():
            visit(value)
    unused = [name for name in bound if name not in read]
    if unused:
        known = sorted(read)
        close = difflib.get_close_matches(unused[0], known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"macro {unused[0]!r} is bound but nothing in the configuration reads it",
            hint=hint + f"macros read here: {', '.join(known) or 'none'}",
        )


class _DropGinSearchNoise(logging.Filter):
    """gin logs every miss while it looks for an include along its search path."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Path not found:", "system_path_file_exists:"))


@contextlib.contextmanager
def _quiet_include_search():
    root, noise = logging.getLogger(), _DropGinSearchNoise()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


def _explain(error: Exception) -> tuple[str, str | None]:
    text = str(error).strip().strip('"')
    first = text.splitlines()[0] if text else type(error).__name__

    missing = re.search(r"No configurable matching '([^']+)'", text)
    if missing:
        known = sorted(_wrapped)
        close = difflib.get_close_matches(missing.group(1), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown configurable {missing.group(1)!r}", hint + f"known: {', '.join(known)}"

    bad_param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if bad_param:
        selector, param = bad_param.groups()
        fn = _originals.get(selector) or _originals.get(selector.split(".")[-1])
        names = list(inspect.signature(fn).parameters) if fn is not None else []
        close = difflib.get_close_matches(param, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{selector} has no parameter {param!r}", hint + f"parameters: {', '.join(names)}"
    return f"bad gin configuration: {first}", "check the gin file and --bind values"


def operative_config() -> str:
    return gin.operative_config_str()


class _Reference:
    """How a configurable reference or macro reads in the flat parameter listing."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _Reference("@" + scoped_configurable_name + ("()" if evaluate else ""))

    def macro(self, macro_name):
        return _Reference("%" + macro_name)


def flat_bindings(config_text: str) -> dict[str, str]:
    """`{"scope/selector.param": "value"}` for every binding of a gin text."""
    flat = {}
    for statement in config_parser.ConfigParser(config_text, _Delegate()):
        if isinstance(statement, config_parser.BindingStatement):
            key = ".".join(p for p in (statement.selector, statement.arg_name) if p)
            if statement.scope:
                key = f"{statement.scope}/{key}"
            flat[key] = repr(statement.value)
    return flat


@dataclass
class FinishedRun:
    """A trained model rebuilt from its run folder, with what it needs to read and write text."""

    run_dir: Path
    model: torch.nn.Module
    tokenizer: object  # tokenizers.Tokenizer
    train_config: train.TrainConfig
    run_config: train.RunConfig
    step: int


def load_finished_run(run_dir: Path, registry) -> FinishedRun:
    """Rebuild a run's model from the operative config saved beside it, and load its weights.

    The corpus is not read: the saved tokenizer is all the model needs, so a run folder can be
    sampled on a machine that never saw the training text.
    """
    run_dir = Path(run_dir)
    missing = [name for name in ("operative_config.gin", "tokenizer.json")
               if not (run_dir / name).is_file()]  # fmt: skip
    # A kill between the two renames of a save leaves the checkpoint under another name.
    weights = run_dir / "checkpoint" / checkpoint.WEIGHTS
    if not weights.is_file() and checkpoint.find(run_dir / "checkpoint") is None:
        missing.append(f"checkpoint/{checkpoint.WEIGHTS}")
    if missing:
        raise ConfigError(
            f"{str(run_dir)!r} is not a finished run folder: no {', '.join(missing)}",
            hint="give a folder under runs/ written by tarflow_core.run, or an MLflow run id",
        )

    parse([str(run_dir / "operative_config.gin")], [])
    tokenizer = data.load_tokenizer(run_dir / "tokenizer.json")
    train_config = configured("TrainConfig")()
    run_config = configured("RunConfig")()
    model = build_configured_model(
        run_config, tokenizer.get_vocab_size(), train_config.seq_len, registry
    )
    meta = checkpoint.load_weights(run_dir / "checkpoint", model)
    model.eval()
    return FinishedRun(
        run_dir, model, tokenizer, train_config, run_config, int(meta.get("step", 0))
    )
