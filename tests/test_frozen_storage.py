"""Frozen weights held at the compute precision (model/trainable.py `hold_frozen_at`): in a bf16 run the
blocks' frozen linears are stored in bf16, the training is bit-for-bit the one that re-cast them every
step, and what trains, its optimizer state and the checkpoints stay fp32."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from model import GPT2Config, GPT2LMHeadModel
from model.trainable import build_optimizer, hold_frozen_at, set_trainable
from tests.conftest import DATA_DIR, data_limits, perturb_adapters, run_command

CASES = {  # knobs, and which frozen linears are converted
    "lora": ({"use_lora": True}, "every block linear (LoRA's bases)"),
    "kora_qkv_lora": ({"use_kora": True, "use_lora": True, "lora_targets": ("qkv",)}, "every block linear"),
    "last_linear": ({"fine_tune_mode": "last-linear-layer"}, "every block linear"),
    "dora": ({"use_lora": True, "lora_dora": True}, "the linears without an adapter"),
    "ia3": ({"peft_method": "ia3"}, "the linears without an adapter"),
    "pissa": ({"use_lora": True, "lora_init": "pissa"}, "none: its bases are saved state"),
    "full_model": ({}, "none: everything trains"),
}


def train_steps(model, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    optimizer = build_optimizer(model, lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    losses = []
    torch.manual_seed(5)  # the same dropout masks
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    for state in optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_frozen_linears_in_bf16_train_exactly_as_recast_ones(case):
    knobs, _ = CASES[case]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("tiny", n_layer=2, **knobs))
    perturb_adapters(model).train()
    set_trainable(model, None if knobs.get("fine_tune_mode") != "last-linear-layer" else "full-model")
    if knobs.get("fine_tune_mode") == "last-linear-layer":  # no task head here: freeze all but ln_f
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("transformer.ln_f"))
    reference = copy.deepcopy(model)
    converted = hold_frozen_at(model, torch.bfloat16)
    blocks = [f"transformer.h.{i}" for i in range(2)]
    linears = [f"{b}.{p}" for b in blocks for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]

    def owners(leaf: str) -> set[str]:
        return {n.removesuffix(f".{leaf}").removesuffix(".base_layer") for n in converted if n.endswith(leaf)}

    untouched = {f"{b}.{p}" for b in blocks for p in ("attn.c_proj", "mlp.c_fc")}  # IA3's targets stay
    expected = {  # (linears whose weight is converted, linears whose bias is)
        "lora": (set(linears), set(linears)),
        "kora_qkv_lora": (set(linears), set(linears)),
        "last_linear": (set(linears), set(linears)),
        "dora": (set(), set()),  # every linear has a DoRA adapter (its norms read W)
        "ia3": (untouched, untouched),
        "pissa": (set(), set(linears)),  # its residual W - BA is saved state; the biases are the base's
        "full_model": (set(), set()),
    }[case]
    assert (owners("weight"), owners("bias")) == expected
    for name, param in model.named_parameters():
        is_converted = name in converted
        assert param.dtype == (torch.bfloat16 if is_converted else torch.float32), name
        assert not (is_converted and param.requires_grad)
    losses, trained = train_steps(model)
    ref_losses, ref_trained = train_steps(reference)
    assert losses == ref_losses  # bit for bit: autocast rounds the same values to the same bf16 numbers
    assert trained.keys() == ref_trained.keys()
    assert all(torch.equal(trained[n], ref_trained[n]) and trained[n].dtype == torch.float32 for n in trained)


@pytest.mark.slow
def test_a_bf16_runs_checkpoint_holds_fp32_trained_weights(tiny_ckpt, tokenizer_dir, tmp_path):
    argv = [
        sys.executable, "-m", "train", "--task", "sst", "--model", str(tiny_ckpt[0]), "--tokenizer",
        str(tokenizer_dir), "--data_dir", str(DATA_DIR), "--out_dir", str(tmp_path), "--use_lora",
        "--precision", "bf16", "--max_steps", "2", "--wandb", "disabled", *data_limits(8),
    ]  # fmt: skip
    done = run_command(argv)
    assert done.returncode == 0, done.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if (p / "metrics.json").is_file()]
    assert json.loads((run_dir / "config.json").read_text())["precision"] == "bf16"
    files = list((run_dir / "checkpoints").rglob("*.safetensors"))
    assert files
    for path in files:
        tensors = load_file(path)
        floats = {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}
        assert floats and all(dtype == torch.float32 for dtype in floats.values()), (path, floats)


def test_a_resumed_bf16_run_keeps_its_loss_precision():
    from train.run.state import RunFolderError
    from train.trainer.loop import check_loss_precision

    old_run = {"training": {"precision": "bf16"}}  # recorded before --loss_precision: its loss was fp32
    check_loss_precision(old_run, "bf16", "fp32", "r")
    with pytest.raises(RunFolderError, match="pass --loss_precision fp32"):
        check_loss_precision(old_run, "bf16", "run", "r")
    with pytest.raises(RunFolderError, match="pass --loss_precision run"):
        check_loss_precision({"training": {"loss_precision": "run"}}, "bf16", "fp32", "r")
    check_loss_precision(old_run, "fp32", "run", "r")  # fp32: the same maths either way
    check_loss_precision(None, "bf16", "run", "r")  # a fresh start
