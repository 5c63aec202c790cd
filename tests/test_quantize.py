"""A quantised base (QLoRA, model/quantize.py) on the CPU through bitsandbytes' CPU backend: logits equal
HF GPT-2 whose linears are bitsandbytes layers built here + peft, the refusals, export, and a CLI run."""

from __future__ import annotations

import json
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from torch import nn

from model import GPT2Config, GPT2LMHeadModel
from model.adapters import merge_adapters
from model.quantize import BLOCK_LINEARS, storage_bytes
from model.trainable import set_trainable
from modules.lora import peft_lora_config
from modules.peft_methods import peft_config_for
from tests.conftest import data_limits, make_hf_checkpoint, perturb_adapters, run_paths

VOCAB = 100
CASES = {
    "nf4-lora": ("nf4", dict(use_lora=True, lora_r=4)),
    "nf4-dora": ("nf4", dict(use_lora=True, lora_r=4, lora_dora=True)),
    "int8-lora": ("int8", dict(use_lora=True, lora_r=4)),
    "nf4-ia3": ("nf4", dict(peft_method="ia3")),
    "int8-adalora": ("int8", dict(peft_method="adalora", peft_config={"init_r": 4, "target_r": 2})),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant_gpt2")
    make_hf_checkpoint(path, n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB)
    return path


def quantized_hf(path, mode: str) -> transformers.GPT2LMHeadModel:
    """Stock HF GPT-2 whose block Conv1Ds become bitsandbytes layers, built directly (independent of
    model/quantize.py): the reference a QLoRA user would build."""
    from transformers.pytorch_utils import Conv1D

    hf = transformers.GPT2LMHeadModel.from_pretrained(path, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    for block in hf.transformer.h:
        for path_ in BLOCK_LINEARS:
            parent_name, _, child = path_.rpartition(".")
            conv = getattr(block.get_submodule(parent_name), child)
            assert isinstance(conv, Conv1D)
            weight = conv.weight.data.t().contiguous()  # Conv1D stores (in, out)
            if mode == "nf4":
                layer = bnb.nn.Linear4bit(*weight.shape[::-1], quant_type="nf4", compute_dtype=torch.float32)
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                # the same plain nf4 maths as ours: not the packed bf16 kernel an AVX512-BF16 CPU switches to in
                # eval (model/quantize.py turns it off: it fails below width 64 and re-lays out the weight)
                layer.support_avx512bf16_for_cpu = False
            else:
                layer = bnb.nn.Linear8bitLt(*weight.shape[::-1], has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            layer.bias = nn.Parameter(conv.bias.data, requires_grad=False)
            setattr(block.get_submodule(parent_name), child, layer.to("cpu"))
    hf.is_loaded_in_4bit, hf.is_loaded_in_8bit = mode == "nf4", mode == "int8"
    return hf


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf_gpt2_with_bitsandbytes_layers_plus_peft(ckpt, case):
    mode, knobs = CASES[case]
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, lora_dropout=0.0)
    torch.manual_seed(0)
    ours = perturb_adapters(GPT2LMHeadModel.from_pretrained(ckpt, quantize=mode, **no_dropout, **knobs).eval())
    reference_config = peft_config_for(ours.config) if ours.config.peft_method else peft_lora_config(ours.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(quantized_hf(ckpt, mode), reference_config).eval()
    theirs = reference.state_dict()
    adapter = "peft" if ours.config.peft_method else "default"
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            if adapter in name.split("."):
                theirs_name = "base_model.model." + name.replace(f".{adapter}", ".default")
                reference.state_dict(keep_vars=True)[theirs_name].copy_(tensor)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gap = (ours(ids).logits - reference(input_ids=ids).logits).abs().max().item()
    assert gap <= 1e-4, gap
    assert sum("lora" in n or "ia3" in n for n in theirs) > 0
    # only the adapters train; the quantised weights are not parameters that could
    counts = set_trainable(ours, "adapters")
    assert counts["trainable"] > 0
    assert all(adapter in n.split(".") for n, p in ours.named_parameters() if p.requires_grad)


def test_quantised_base_is_close_to_the_float_base_and_smaller(ckpt):
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    base = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        reference = base(ids).logits
    sizes = {}
    for mode in ("nf4", "int8"):
        model = GPT2LMHeadModel.from_pretrained(ckpt, quantize=mode, use_lora=True).eval()
        with torch.no_grad():
            gap = (model(ids).logits - reference).abs().max().item()
        assert 0 < gap < 0.5 * reference.abs().max().item()  # quantisation error: present, and small
        sizes[mode] = storage_bytes(model.transformer.h)
    full = storage_bytes(base.transformer.h)
    assert sizes["nf4"] < sizes["int8"] < full


@pytest.mark.parametrize(
    "knobs, reason",
    [
        (dict(), "full-model fine-tuning"),
        (dict(use_kan=True), "KAN FFN"),
        (dict(use_lora=True, lora_init="pissa"), "PiSSA"),
        (dict(use_lora_xs=True), "SVD"),
        (dict(peft_method="vera"), "does not accept bitsandbytes"),
        (dict(use_lora=True, use_kan=True, lora_dora=True), "KOLMG-DoRA"),
    ],
)
def test_what_cannot_run_on_a_quantised_base_is_refused_with_the_reason(knobs, reason):
    with pytest.raises(ValueError, match=reason):
        GPT2Config.from_preset("tiny", quantize="nf4", **knobs)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_merge_is_refused_and_export_peft_loads_on_the_float_base(ckpt, tmp_path, mode):
    model = perturb_adapters(GPT2LMHeadModel.from_pretrained(ckpt, quantize=mode, use_lora=True, lora_r=4))
    ids = torch.randint(0, VOCAB, (2, 5))
    model(ids, labels=ids).loss.backward()  # after a step (int8 moves its scales to the layer's state)
    with pytest.raises(ValueError, match="quantised"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="quantised"):
        GPT2LMHeadModel.from_pretrained(ckpt, quantize=mode, fine_tune_mode="last-linear-layer").save_pretrained(
            tmp_path / "hf"
        )
    model.export_peft(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(ckpt), tmp_path)
    exported = {n: p for n, p in stock.named_parameters() if "lora_" in n}
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(exported) == len(ours) > 0
    for name, tensor in ours.items():  # the adapter travels as trained; the base it is applied to is the user's
        assert torch.equal(exported["base_model.model." + name], tensor)


@pytest.mark.slow
def test_cli_trains_resumes_and_evaluates_on_a_quantised_base(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    from train.cli import entry, evaluate

    runs = tmp_path / "runs"
    argv = ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, runs), *data_limits(8), "--wandb", "disabled"]
    argv += ["--use_lora", "--quantize", "nf4", "--epochs", "1"]
    assert entry.main(argv) == 0
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert run.name.startswith("sst-lora-r8-a16+nf4-")  # the folder says which base it trained on
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["quantize"] == "nf4" and record["parameters"]["trainable"] > 0
    assert entry.main([*argv, "--resume", "--extend_epochs", "1"]) == 0
    out = tmp_path / "eval"
    assert evaluate.main(["--task", "sst", "--model", str(run), "--out_dir", str(out), "--dev_limit", "4"]) == 0
    base_run = [*argv[:-5], "--quantize", "nf4", "--epochs", "1", "--out_dir", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as refused:  # full-model fine-tuning of a quantised base: one error line
        entry.main(base_run)
    assert refused.value.code == 2
    assert "full-model fine-tuning would train the quantised weights" in capsys.readouterr().err


@pytest.mark.slow
def test_peft_runs_do_not_import_bitsandbytes_until_a_base_is_quantised():
    """peft would import bitsandbytes (seconds) in every process; ours hides it until --quantize asks for
    it, and a quantised model built later in the same process still gets peft's bitsandbytes layers."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from model import GPT2Config, GPT2LMHeadModel\n"
        "GPT2LMHeadModel(GPT2Config.from_preset('tiny', use_lora=True))\n"
        "GPT2LMHeadModel(GPT2Config.from_preset('tiny', peft_method='ia3'))\n"
        "print('before', sys.modules.get('bitsandbytes') is not None)\n"
        "m = GPT2LMHeadModel(GPT2Config.from_preset('tiny', use_lora=True, quantize='nf4'))\n"
        "print('after', type(m.transformer.h[0].attn.c_attn).__module__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "before False" in run.stdout and "after peft.tuners.lora.bnb" in run.stdout
