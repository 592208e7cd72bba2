"""Corpora and tokenizers: the built-in default, local files, and refusal of bad input."""

import json

import pytest
import torch

from tarflow_core import data
from tarflow_core.errors import DataError


def test_builtin_corpus_needs_no_file():
    corpus = data.load_corpus(data.BUILTIN_PYDOC)
    assert corpus.vocab_size > 50
    assert len(corpus.train_ids) > 300_000
    assert "statement" in corpus.decode(corpus.train_ids[:2000])


def test_split_is_deterministic_and_ordered(shakespeare):
    first = data.load_corpus(shakespeare, max_chars=50_000)
    second = data.load_corpus(shakespeare, max_chars=50_000)
    assert torch.equal(first.train_ids, second.train_ids)
    text = data.read_text(shakespeare, max_chars=50_000)

    # Characters the training split never shows come back as the unknown token.
    alphabet = set(text[:45_000])
    expected = "".join(ch if ch in alphabet else data.UNKNOWN for ch in text[45_000:])
    assert first.decode(first.val_ids) == expected


def test_char_tokenizer_round_trips_text_with_whitespace():
    text = "To be,\n  or not\tto be: that is the question.\n"
    tokenizer = data.char_tokenizer(text)
    ids = data.encode(tokenizer, text)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids.tolist()) == text


def test_unknown_characters_become_the_unknown_token():
    tokenizer = data.char_tokenizer("abc")
    assert data.encode(tokenizer, "abz").tolist()[-1] == tokenizer.token_to_id(data.UNKNOWN)


def test_bpe_tokenizer_round_trips(shakespeare):
    text = data.read_text(shakespeare, max_chars=30_000)
    tokenizer = data.bpe_tokenizer(text, vocab_size=300)
    ids = data.encode(tokenizer, text[:2000])
    assert len(ids) < 2000
    assert tokenizer.decode(ids.tolist()) == text[:2000]


def test_folder_of_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n" * 50)
    (tmp_path / "b.txt").write_text("second file\n" * 50)
    text = data.read_text(str(tmp_path))
    assert text.index("first") < text.index("second")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"\x00\x01\x02binary", "looks binary"),
        ("caf\u00e9".encode("latin-1") * 10, "not UTF-8"),
    ],
)
def test_bad_corpus_files_are_refused(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        data.load_corpus(str(path))


def test_missing_corpus_says_what_sources_exist(tmp_path):
    with pytest.raises(DataError, match="no such file or folder.*builtin:pydoc"):
        data.load_corpus(str(tmp_path / "nope.txt"))


def test_corpus_shorter_than_a_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny corpus\n")
    corpus = data.load_corpus(str(path))
    with pytest.raises(DataError, match="fewer than one window"):
        data.WindowSampler(corpus.train_ids, 64, 2, 0)


def test_hub_loading_code_runs_on_a_local_dataset_folder(tmp_path):
    # `load_dataset` takes a folder exactly as it takes a hub name, so the hub code path is
    # exercised offline on files made here.
    rows = [{"text": f"line {i} of a small dataset"} for i in range(200)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = data.load_corpus(f"hub:{tmp_path}")
    assert "small dataset" in corpus.decode(corpus.train_ids[:100])


def test_hub_dataset_without_the_text_column_names_the_columns(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"body": "words " * 50}))
    with pytest.raises(DataError, match="no column 'text'.*'body'"):
        data.load_corpus(f"hub:{tmp_path}")


def test_unreachable_hub_dataset_is_one_clear_error():
    with pytest.raises(DataError, match="cannot load hub dataset 'no-such-user/no-such-set'"):
        data.load_corpus("hub:no-such-user/no-such-set")
