"""Corpora through `datasets`, tokenisation through `tokenizers`, and batches of windows.

A source is one of:
- `builtin:pydoc`: the English documentation topics that ship inside every CPython
  (`pydoc_data.topics`, about 465k characters), so the main job needs no download;
- a path to a UTF-8 text file, or to a folder whose files are all read in sorted order;
- `hub:NAME` or `hub:NAME:CONFIG`: a dataset from the hub, for users who are online.

The split is deterministic: the first `1 - val_fraction` of the text trains, the rest validates.
"""

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tarflow_core.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_PYDOC = "builtin:pydoc"
UNKNOWN = "<unk>"
TOKENIZER_LEVELS = ("char", "bpe")


@dataclass
class Corpus:
    """A tokenised corpus split into training and validation ids."""

    name: str
    tokenizer: Tokenizer
    level: str  # "char" or "bpe"
    train_ids: torch.Tensor  # (N_train,) long
    val_ids: torch.Tensor  # (N_val,) long

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(map(int, ids)))


def read_text(source: str, text_column: str = "text", max_chars: int | None = None) -> str:
    """The whole text of a source, as one string."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(
            f"load_corpus.source = {source!r} is not a corpus",
            hint="give a path to a UTF-8 text file or folder, 'builtin:pydoc', or 'hub:NAME'",
        )
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise DataError(
            f"load_corpus.max_chars = {max_chars!r} is not a positive whole number",
            hint="use None to read the whole corpus",
        )
    if source == BUILTIN_PYDOC:
        text = _builtin_pydoc()
    elif source.startswith("hub:"):
        text = _hub_text(source.removeprefix("hub:"), text_column)
    else:
        text = _local_text(Path(source))
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise DataError(f"corpus {source!r} is empty", hint="point load_corpus.source at text")
    return text


def _builtin_pydoc() -> str:
    from pydoc_data.topics import topics

    from datasets import Dataset

    rows = Dataset.from_dict({"text": [topics[key] for key in sorted(topics)]})
    return "\n\n".join(rows["text"])


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.exists() and not path.is_dir():
        raise DataError(f"{str(path)!r} is not a regular file", hint="copy the text to a file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"folder {str(path)!r} holds no files", hint="add .txt files to it")
        return files
    raise DataError(
        f"no such file or folder: {str(path)!r}",
        hint="give a path to a UTF-8 text file or folder, 'builtin:pydoc', or 'hub:NAME'",
    )


def _check_text_file(path: Path) -> None:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {str(path)!r}: {error.strerror}") from None
    if b"\x00" in data[:65536]:
        raise DataError(f"{str(path)!r} looks binary (it has NUL bytes)", hint="use a text file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text (bad byte at offset {error.start})",
            hint="re-encode it, for example with iconv -t utf-8",
        ) from None


def _local_text(path: Path) -> str:
    files = _local_files(path)
    for file in files:
        _check_text_file(file)

    from datasets import load_dataset

    # One row per file, the whole file as one document, line endings kept.
    rows = load_dataset(
        "text", data_files=[str(f) for f in files], sample_by="document", split="train"
    )
    return "\n".join(rows["text"])


def _hub_text(name: str, text_column: str) -> str:
    from datasets import load_dataset

    dataset_name, _, config = name.partition(":")
    try:
        rows = load_dataset(dataset_name, config or None, split="train")
    except Exception as error:  # offline, unknown name, no access: all say the same to a user
        raise DataError(
            f"cannot load hub dataset {dataset_name!r}: {type(error).__name__}: {error}",
            hint="check the name and the network, or download it and pass a local path",
        ) from None
    if text_column not in rows.column_names:
        raise DataError(
            f"hub dataset {dataset_name!r} has no column {text_column!r}",
            hint=f"set load_corpus.text_column to one of {rows.column_names}",
        )
    return "\n".join(rows[text_column])


def char_tokenizer(text: str) -> Tokenizer:
    """One token per character seen in `text`, plus an unknown token."""
    alphabet = sorted(set(text))
    vocab = {UNKNOWN: 0} | {ch: i + 1 for i, ch in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNKNOWN))
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `text`: any input can be encoded, nothing is unknown."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def describe_unknown(text: str, missing: list[str], shown: int = 10) -> str:
    """A short account of characters outside the vocabulary, for messages."""
    count = sum(text.count(ch) for ch in missing)
    kinds = ", ".join(repr(ch) for ch in missing[:shown])
    more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
    return (
        f"{count} characters of {len(missing)} kinds the training split never shows "
        f"({kinds}{more})"
    )


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text, encoded line by line so that no single input is huge."""
    lines = text.splitlines(keepends=True)
    ids = [i for encoding in tokenizer.encode_batch(lines) for i in encoding.ids]
    return torch.tensor(ids, dtype=torch.long)


def load_corpus(
    source: str = BUILTIN_PYDOC,
    tokenizer: str = "char",
    vocab_size: int = 1024,
    val_fraction: float = 0.1,
    text_column: str = "text",
    max_chars: int | None = None,
) -> Corpus:
    """Read, split and tokenise a corpus.

    Args:
        source: see the module docstring.
        tokenizer: "char" (one token per character) or "bpe" (byte-level, trained here).
        vocab_size: target vocabulary of the BPE tokenizer; ignored at character level.
        val_fraction: the final share of the text kept for validation.
        text_column: the column that holds text, for hub datasets.
        max_chars: keep only the first characters of the text (quick experiments).
    """
    if tokenizer not in TOKENIZER_LEVELS:
        raise DataError(f"unknown tokenizer {tokenizer!r}", hint=f"use one of {TOKENIZER_LEVELS}")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(
            f"load_corpus.val_fraction must lie in (0, 1), not {val_fraction!r}",
            hint="0.1 keeps the last 10 % of the text for validation",
        )

    text = read_text(source, text_column, max_chars)
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    if tokenizer == "char":
        tok = char_tokenizer(train_text)
    else:
        tok = bpe_tokenizer(train_text, vocab_size)

    train_ids, val_ids = encode(tok, train_text), encode(tok, val_text)
    if tokenizer == "char":
        missing = unknown_characters(tok, val_text)
        if missing:
            logger.warning(
                "the validation split has %s; they are encoded as %s and scored as that token",
                describe_unknown(val_text, missing),
                UNKNOWN,
            )
    logger.info(
        "corpus %s: %d characters, vocabulary %d, %d train / %d validation tokens",
        source,
        len(text),
        tok.get_vocab_size(),
        len(train_ids),
        len(val_ids),
    )
    return Corpus(source, tok, tokenizer, train_ids, val_ids)


class WindowSampler:
    """Random training windows of `seq_len` tokens, reproducible from its generator's state."""

    def __init__(self, ids: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if len(ids) <= seq_len:
            raise DataError(
                f"the training split has {len(ids)} tokens, fewer than one window of {seq_len}",
                hint="use a longer corpus or a shorter TrainConfig.seq_len",
            )
        self.ids, self.seq_len, self.batch_size = ids, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        starts = torch.randint(
            len(self.ids) - self.seq_len + 1, (self.batch_size,), generator=self.generator
        )
        return torch.stack([self.ids[s : s + self.seq_len] for s in starts.tolist()])


def validation_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The validation split cut into consecutive windows, (num_windows, seq_len).

    The tail shorter than one window is left out; with seq_len 256 that is at most 255 tokens.
    """
    count = len(ids) // seq_len
    if count == 0:
        raise DataError(
            f"the validation split has {len(ids)} tokens, fewer than one window of {seq_len}",
            hint="use a longer corpus, a larger val_fraction or a shorter seq_len",
        )
    return ids[: count * seq_len].view(count, seq_len)


def save_tokenizer(corpus: Corpus, path: Path) -> None:
    path.write_text(corpus.tokenizer.to_str())
    path.with_suffix(".meta.json").write_text(json.dumps({"level": corpus.level}))


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer a run saved beside its checkpoint."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # missing, truncated or not a tokenizer file
        raise DataError(
            f"cannot read the tokenizer {str(path)!r}: {str(error).splitlines()[0][:200]}",
            hint="point at a run folder written by tarflow_core.run",
        ) from None


def unknown_characters(tokenizer: Tokenizer, text: str) -> list[str]:
    """The characters of `text` that the tokenizer maps to its unknown token, in order seen."""
    vocab = tokenizer.get_vocab()
    if UNKNOWN not in vocab:
        return []  # byte-level BPE: every input has tokens
    return list(dict.fromkeys(ch for ch in text if ch not in vocab))


def bits_per_token_to_report(nelbo_per_token: float, level: str) -> dict[str, float]:
    """The headline figure for a corpus: bits per character, or perplexity for word pieces."""
    if level == "char":
        return {"bpc": nelbo_per_token / math.log(2)}
    return {"ppl": math.exp(min(nelbo_per_token, 700.0))}
