"""EVA (data-driven LoRA init, peft's get_eva_state_dict) on our GPT-2: the same adapters as peft's
initialize_lora_eva_weights on HF GPT-2, identity at init, determinism, and the trainer's wiring."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers
from peft.tuners.lora.eva import initialize_lora_eva_weights
from safetensors.torch import load_file

from model import GPT2LMHeadModel
from modules.peft_methods import peft_config_for
from tests.conftest import data_limits, make_hf_checkpoint, run_paths

VOCAB = 100
EVA = {"r": 4, "init_lora_weights": "eva"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("eva_gpt2")
    make_hf_checkpoint(path, n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=VOCAB)
    return path


def batches(seed: int, count: int = 6) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (4, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # padding: EVA's statistics skip padded tokens
        found.append({"input_ids": ids, "attention_mask": mask})
    return found


def eva_model(ckpt, data) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel.from_pretrained(ckpt, peft_method="lora", peft_config=EVA, resid_pdrop=0.0).eval()
    assert model.needs_data_init
    model.initialize_from_data(data)
    return model


def lora_a(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model.").replace(f".{adapter}.", "."): p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_A" in n
    }


def test_eva_adapters_equal_peft_on_hf_gpt2_and_start_at_the_base(ckpt):
    data = batches(seed=1)
    ours = eva_model(ckpt, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GPT2LMHeadModel.from_pretrained(ckpt, resid_pdrop=0.0)
        reference = peft.get_peft_model(hf, peft_config_for(ours.config, fan_in_fan_out=True)).eval()
        initialize_lora_eva_weights(reference, dataloader=data, show_progress_bar=False)
    mine, theirs = lora_a(ours, "peft"), lora_a(reference, "default")
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 1  # peft's GPT-2 default: c_attn in each block
    for name in mine:
        assert mine[name].shape == (4, theirs[name].shape[1])
        assert torch.allclose(mine[name], theirs[name], atol=1e-4), name
        # rows are orthonormal directions (principal components of the layer's inputs)
        assert torch.allclose(mine[name] @ mine[name].T, torch.eye(4), atol=1e-4)
    base = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    ids = data[0]["input_ids"]
    with torch.no_grad():
        assert (ours(ids).logits - base(ids).logits).abs().max().item() <= 1e-5  # B = 0: the base at step 0


def test_eva_is_deterministic_and_follows_its_data(ckpt):
    first, again, other = (lora_a(eva_model(ckpt, batches(seed)), "peft") for seed in (1, 1, 2))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.allclose(first[n], other[n], atol=1e-3) for n in first)


def test_eva_rank_redistribution_is_refused_with_its_reason(ckpt):
    with pytest.raises(ValueError, match="rank redistribution"):
        GPT2LMHeadModel.from_pretrained(ckpt, peft_method="lora", peft_config={**EVA, "eva_config": {"rho": 2.0}})


@pytest.mark.slow
def test_a_run_initialises_from_its_seeded_training_batches(tiny_ckpt, tokenizer_dir, tmp_path):
    """Through the CLI: the init reads --peft_init_batches batches drawn with the run's seed, so the
    same seed gives the same adapters and another seed others."""
    from train.cli import entry

    def run(out: str, seed: int, *extra: str) -> dict[str, torch.Tensor]:
        argv = ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / out), *data_limits(16)]
        argv += ["--peft_method", "lora", "--peft_config", json.dumps(EVA), "--peft_init_batches", "2"]
        argv += ["--max_steps", "1", "--lr", "1e-9", "--seed", str(seed), "--wandb", "disabled", *extra]
        assert entry.main(argv) == 0
        (folder,) = [p for p in (tmp_path / out).iterdir() if p.is_dir()]
        assert json.loads((folder / "config.json").read_text())["data_init_seconds"] > 0
        (weights,) = (folder / "checkpoints").glob("last-*/trainable.safetensors")
        return {k: v for k, v in load_file(str(weights)).items() if "lora_A" in k}

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a)


@pytest.mark.slow
def test_batches_too_short_for_r_are_one_error_line(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    """peft's incremental SVD skips a batch with fewer real tokens than r and cycles the rest forever."""
    from train.cli import entry

    argv = ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *data_limits(4, batch=1)]
    argv += ["--peft_method", "lora", "--peft_config", json.dumps({**EVA, "r": 64}), "--wandb", "disabled"]
    assert entry.main(argv) == 2
    err = capsys.readouterr().err
    assert "EVA needs at least r=64 real tokens per batch" in err and "Traceback" not in err
