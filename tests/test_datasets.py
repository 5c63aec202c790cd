"""Loaders on the real release files and on small broken fixtures (errors name file and line)."""

from __future__ import annotations

import logging

import pytest

from task_data.batching import collate, encode, make_batches, padding_fraction
from task_data.common import DataError
from task_data.paraphrase import load_paraphrase
from task_data.sentiment import load_sentiment
from task_data.sonnets import load_sonnets, read_sonnet_file
from tests.conftest import DATA_DIR


@pytest.mark.parametrize(
    "name, split, rows",
    [
        ("sst", "train", 8544),
        ("sst", "dev", 1101),
        ("sst", "test", 2210),
        ("cfimdb", "train", 1707),
        ("cfimdb", "dev", 245),
        ("cfimdb", "test", 488),
    ],
)
def test_sentiment_row_counts(name, split, rows):
    examples = load_sentiment(name, split, DATA_DIR)
    assert len(examples) == rows
    if split == "test":
        assert all(e.label is None for e in examples)
    else:
        assert {e.label for e in examples} == set(range(5 if name == "sst" else 2))


def test_quora_counts_and_broken_rows(caplog):
    with caplog.at_level(logging.WARNING):
        train = load_paraphrase("train", DATA_DIR)
    assert len(train) == 16014 - 2
    assert "skipped 2 row(s)" in caplog.text and "2010" in caplog.text and "11273" in caplog.text
    with pytest.raises(DataError, match=r"quora-train\.csv:2010: empty is_duplicate"):
        load_paraphrase("train", DATA_DIR, bad_rows="error")
    assert len(load_paraphrase("dev", DATA_DIR)) == 2000 and len(load_paraphrase("test", DATA_DIR)) == 2200
    assert {e.label for e in train} == {0, 1}
    assert isinstance(train[0].text, tuple) and len(train[0].text) == 2


def test_sonnet_files():
    assert len(load_sonnets("train", DATA_DIR)) == 131
    prompts, gold = load_sonnets("dev_prompts", DATA_DIR), load_sonnets("dev_gold", DATA_DIR)
    assert len(prompts) == len(gold) == 12 and len(load_sonnets("test_prompts", DATA_DIR)) == 12
    assert [n for n, _ in prompts] == [n for n, _ in gold]
    assert all(len(body.split("\n")) == 3 for _, body in prompts)
    assert all(len(body.split("\n")) == 14 for _, body in gold)
    assert gold[0][1].startswith(prompts[0][1])
    assert "\r" not in load_sonnets("train", DATA_DIR)[0][1]  # CRLF normalised


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "content, message",
    [
        ("\tid\tsentence\n0\ta\tgood film\n", r"ids-sst-dev\.csv:1: missing column\(s\) \['sentiment'\]"),
        ("\tid\tsentence\tsentiment\n0\ta\tgood\t3\n1\tb\tbad\t7\n", r"ids-sst-dev\.csv:3: sentiment '7'"),
        ("\tid\tsentence\tsentiment\n0\ta\t  \t3\n", r"ids-sst-dev\.csv:2: empty sentence"),
        ("\tid\tsentence\tsentiment\n0\ta\tgood\t3\n1\tb\n", r"ids-sst-dev\.csv:3: wrong number of fields"),
        ("\tid\tsentence\tsentiment\n0\ta\tgood\t2.5\n", r"ids-sst-dev\.csv:2: sentiment '2.5'"),
    ],
)
def test_broken_sentiment_files(tmp_path, content, message):
    _write(tmp_path, "ids-sst-dev.csv", content)
    with pytest.raises(DataError, match=message):
        load_sentiment("sst", "dev", tmp_path)


def test_missing_file_names_download_command(tmp_path):
    with pytest.raises(DataError, match=r"scripts/download_data\.py --out"):
        load_sentiment("cfimdb", "train", tmp_path)


def test_broken_sonnet_files(tmp_path):
    _write(tmp_path, "a.txt", "just a header\nno numbers here\n")
    with pytest.raises(DataError, match="no numbered sonnet blocks"):
        read_sonnet_file(tmp_path / "a.txt")
    _write(tmp_path, "sonnets_held_out_dev.txt", "header\n\n1\n\nline one\nline two\n\n2\n\na\nb\nc\n")
    with pytest.raises(DataError, match=r"sonnets_held_out_dev\.txt:3: sonnet 1 has fewer than 3"):
        load_sonnets("dev_prompts", tmp_path)


def test_crlf_and_lf_sonnets_read_the_same(tmp_path):
    text = "header\n\n7\n\nfirst line,\nsecond line.\n  third line\n\n8\n\nanother\n"
    (tmp_path / "lf.txt").write_text(text)
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    assert read_sonnet_file(tmp_path / "lf.txt") == read_sonnet_file(tmp_path / "crlf.txt")
    assert read_sonnet_file(tmp_path / "lf.txt")[0] == ("7", "first line,\nsecond line.\n  third line")


def test_truncation_count_and_sides(tokenizer_dir):
    from model import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    texts = ["one two three four five six", "short"]
    right = encode(tok, texts, 3)
    left = encode(tok, texts, 3, truncation_side="left")
    assert right.truncated == left.truncated == 1
    assert tok.decode(right.ids[0]) == "one two three" and tok.decode(left.ids[0]) == " four five six"


def test_bucketing_reduces_padding():
    lengths = [5, 100, 7, 98, 6, 99, 4, 97] * 10
    plain = padding_fraction(lengths, make_batches(lengths, 4, bucket=False))
    bucketed = padding_fraction(lengths, make_batches(lengths, 4, bucket=True))
    assert bucketed < 0.05 < 0.4 < plain
    batches = make_batches(lengths, 4, bucket=True, shuffle=True, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every example exactly once


def test_collate_sides():
    ids, mask = collate([[1, 2, 3], [4]], side="left")
    assert ids.tolist() == [[1, 2, 3], [50256, 50256, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = collate([[1, 2, 3], [4]], side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 50256, 50256]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
