"""Checkpoint loading: name map, key accounting, clear errors, no unpickling, HF round trip."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import CheckpointError, GPT2Config, GPT2LMHeadModel
from tests.conftest import VOCAB


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_report_accounts_for_every_key(model_ckpt):
    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0])
    report = model.load_report
    stored = load_file(str(model_ckpt[0] / "model.safetensors"))
    assert len(report.loaded) + len(report.ignored) + len(report.unexpected) == len(stored)
    assert report.missing == [] and report.unexpected == []
    # every parameter except the tied head came from the file
    assert len(report.loaded) == len([n for n in model.state_dict() if n != "lm_head.weight"])


def test_missing_key_raises_with_its_name(model_ckpt, tmp_path):
    folder = _copy(model_ckpt[0], tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("h.1.mlp.c_fc.weight"))
    del state[key]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight"):
        GPT2LMHeadModel.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder, strict=False)
    assert model.load_report.missing == ["transformer.h.1.mlp.c_fc.weight"]


def test_unexpected_key_is_reported(model_ckpt, tmp_path, caplog):
    folder = _copy(model_ckpt[0], tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    state["score.weight"] = torch.zeros(2, 32)
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # old-style mask buffer: ignored
    save_file(state, str(folder / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        model = GPT2LMHeadModel.from_pretrained(folder)
    assert model.load_report.unexpected == ["score.weight"]
    assert "transformer.h.0.attn.bias" in model.load_report.ignored
    assert "score.weight" in caplog.text


def test_shape_mismatch_names_the_key(model_ckpt, tmp_path):
    folder = _copy(model_ckpt[0], tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("h.0.attn.c_proj.weight"))
    state[key] = torch.zeros(32, 31)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch for .*h\.0\.attn\.c_proj\.weight"):
        GPT2LMHeadModel.from_pretrained(folder)


def test_pytorch_bin_is_loaded_without_unpickling_objects(model_ckpt, tmp_path):
    folder = _copy(model_ckpt[0], tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 2, 3]])
    assert (model(ids).logits - model_ckpt[1](ids).logits).abs().max() <= 1e-5

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="plain tensors") as refused:
        GPT2LMHeadModel.from_pretrained(folder)
    message = str(refused.value)  # one line, and no advice to unpickle (torch's own text gives it)
    assert "\n" not in message and "weights_only=False" not in message and "refused" in message


@pytest.mark.parametrize(
    "setup, message",
    [
        ("no_config", "no config.json"),
        ("no_weights", "holds no weights"),
        ("not_gpt2", "not a GPT-2 checkpoint"),
        ("bad_json", "config.json is corrupt"),
        ("file", "is a file"),
    ],
)
def test_not_a_gpt2_folder(model_ckpt, tmp_path, setup, message):
    folder = _copy(model_ckpt[0], tmp_path / "ckpt")
    target = folder
    if setup == "no_config":
        (folder / "config.json").unlink()
    elif setup == "no_weights":
        (folder / "model.safetensors").unlink()
    elif setup == "not_gpt2":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "bert"
        (folder / "config.json").write_text(json.dumps(config))
    elif setup == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif setup == "file":
        target = folder / "config.json"
    with pytest.raises(CheckpointError, match=message):
        GPT2LMHeadModel.from_pretrained(target)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(CheckpointError, match="local folder"):
        GPT2LMHeadModel.from_pretrained("gpt2-this-repo-does-not-exist")


def test_config_overrides_apply(model_ckpt):
    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0], attn_pdrop=0.0, use_graph=False)
    assert model.config.attn_pdrop == 0.0
    with pytest.raises(ValueError, match="unknown GPT2Config field"):
        GPT2LMHeadModel.from_pretrained(model_ckpt[0], not_a_field=1)


def test_save_pretrained_loads_in_hf_with_equal_logits(model_ckpt, tmp_path):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    ours.save_pretrained(tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-5


def test_random_init_follows_gpt2_scheme():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("small-test", n_layer=4))
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    expected = 0.02 / (2 * 4) ** 0.5
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - expected) < 1e-3
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("vocab", "outside the vocabulary"),
        ("negative", "outside the vocabulary"),
        ("too_long", "exceeds the model's n_positions"),
        ("mask_shape", "attention_mask has shape"),
        ("mask_values", "only 0"),
        ("float_ids", "token ids"),
        ("one_dim", "shape"),
    ],
)
def test_bad_input_clear_errors(model_ckpt, case, message):
    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0])
    ids = torch.tensor([[1, 2, 3]])
    mask = None
    if case == "vocab":
        ids = torch.tensor([[1, VOCAB]])
    elif case == "negative":
        ids = torch.tensor([[-1, 2]])
    elif case == "too_long":
        ids = torch.zeros(1, 129, dtype=torch.long)
    elif case == "mask_shape":
        mask = torch.ones(1, 4)
    elif case == "mask_values":
        mask = torch.tensor([[1, 2, 1]])
    elif case == "float_ids":
        ids = ids.float()
    elif case == "one_dim":
        ids = ids[0]
    with pytest.raises((ValueError, TypeError), match=message):
        model(ids, attention_mask=mask)


def test_generate_rejects_right_padding_and_overlong(model_ckpt):
    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0])
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=200)
