from __future__ import annotations

import json

import pytest

from model import SIZE_PRESETS, GPT2Config


def test_presets_match_hf_sizes():
    assert GPT2Config.from_preset("gpt2").n_embd == 768
    medium = GPT2Config.from_preset("gpt2-medium")
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024)
    large = GPT2Config.from_preset("gpt2-large")
    assert (large.n_layer, large.n_head, large.n_embd) == (36, 20, 1280)
    xl = GPT2Config.from_preset("gpt2-xl")
    assert (xl.n_layer, xl.n_head, xl.n_embd) == (48, 25, 1600)
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"} <= set(SIZE_PRESETS)


def test_json_round_trip_keeps_variant_flags(tmp_path):
    config = GPT2Config.from_preset("tiny", use_kan=True, use_lora=True, use_graph=True, attn_pdrop=0.0)
    assert GPT2Config.from_json(config.to_json()) == config
    config.save(tmp_path / "c.json")
    assert GPT2Config.load(tmp_path / "c.json") == config
    assert json.loads(config.to_json())["use_graph"] is True


def test_variant_flags_default_off():
    config = GPT2Config()
    assert (config.use_kan, config.use_lora, config.use_graph) == (False, False, False)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_lyer": 2}, "unknown GPT2Config field"),
        ({"n_embd": 30, "n_head": 4}, "divisible"),
        ({"attn_pdrop": 1.5}, "attn_pdrop"),
        ({"use_lora": "yes"}, "use_lora must be a bool"),
        ({"n_layer": 0}, "n_layer"),
    ],
)
def test_invalid_configs_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config.from_dict(bad)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT2Config.from_preset("gpt3")


def test_hf_config_options_we_do_not_implement_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        GPT2Config.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        GPT2Config.from_hf_dict({"model_type": "gpt2", "reorder_and_upcast_attn": True})
    with pytest.raises(ValueError, match="activation_function"):
        GPT2Config.from_hf_dict({"model_type": "gpt2", "activation_function": "relu"})
