from __future__ import annotations

from pathlib import Path

import pytest

from model import TokenizerNotFound, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_explicit_path(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("yes") == [8505] and tok.encode("no") == [3919]
    assert tok.pad_token_id == tok.eos_token_id == 50256


def test_environment_variable(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("GPT2_TOKENIZER", str(tokenizer_dir))
    assert load_tokenizer().encode(" yes") == [3763]


def test_explicit_path_wins_over_environment(tokenizer_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2_TOKENIZER", str(tmp_path / "nowhere"))
    assert load_tokenizer(tokenizer_dir).encode(" no") == [645]


def test_nothing_loadable_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT2_TOKENIZER", raising=False)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerNotFound, match="GPT2_TOKENIZER"):
        load_tokenizer(tmp_path / "empty")


def test_non_gpt2_vocabulary_is_rejected(tokenizer_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Hello"], vocab["world"] = vocab["world"], vocab["Hello"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerNotFound, match="not GPT-2's BPE"):
        load_tokenizer(folder)


def test_datasets_resolves_to_our_package():
    import datasets

    assert Path(datasets.__file__).resolve().parent == REPO / "datasets"
    assert datasets.IS_PROJECT_DATASETS is True


def test_required_top_level_layout():
    for name in ("requirements.txt", "model", "modules", "train", "datasets", "scripts", "README.md"):
        assert (REPO / name).exists(), name
