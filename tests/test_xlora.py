"""X-LoRA (modules/xlora.py) against peft's XLoraModel on HF GPT-2: logits for peft's options, cached
generation, padding sides, what trains, the experts' digests in the run identity, refusals, and a CLI
run whose experts are finished LoRA run folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from model import GPT2LMHeadModel
from model.config import GPT2Config
from model.trainable import set_trainable
from modules.peft_methods import peft_tag
from modules.xlora import XLoraLinear
from tests.conftest import make_hf_checkpoint

VOCAB, WIDTH = 100, 32
# three experts: different targets, ranks, and one rsLoRA (its scaling is alpha / sqrt(r))
EXPERTS = [
    {"r": 2, "target_modules": ["c_attn"]},
    {"r": 3, "target_modules": ["c_attn", "c_fc"]},
    {"r": 4, "target_modules": ["c_proj"], "use_rslora": True},
]
OPTIONS = {
    "defaults": {},
    "layerwise-deep": {"layerwise_scalings": True, "xlora_depth": 3, "xlora_size": 16},
    "top_k-softmax_topk": {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False},
    "pass_value-weight-temperature": {
        "scaling_pass_value": 0.3,
        "global_scaling_weight": 0.7,
        "softmax_temperature": 0.5,
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny HF GPT-2 checkpoint and three peft LoRA adapter folders trained on it (random B)."""
    root = tmp_path_factory.mktemp("xlora")
    make_hf_checkpoint(root / "ckpt", n_layer=2, n_head=4, n_embd=WIDTH, n_positions=64, vocab_size=VOCAB)
    for index, fields in enumerate(EXPERTS):
        torch.manual_seed(10 + index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.GPT2LMHeadModel.from_pretrained(root / "ckpt")
            wrapped = peft.get_peft_model(hf, peft.LoraConfig(lora_alpha=4, fan_in_fan_out=True, **fields))
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        wrapped.save_pretrained(root / f"expert{index}")
    # peft's X-LoRA loads its experts as adapters "0", "1", ... and then activates the names given
    adapters = {str(i): str(root / f"expert{i}") for i in range(len(EXPERTS))}
    return root, adapters


def ours_with(root: Path, adapters: dict, **options) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(
        root / "ckpt", peft_method="xlora", peft_config={"adapters": adapters, **options}
    ).eval()
    with torch.no_grad():  # a classifier far from its init, so a mis-wired scaling cannot pass unseen
        for param in model.transformer.expert_mixer.parameters():
            param.normal_(0, 1)
    return model


def reference(root: Path, adapters: dict, ours: GPT2LMHeadModel, **options):
    """peft's XLoraModel on HF GPT-2 holding our classifier's weights; returns forward(input_ids).

    peft 0.21.2 loads X-LoRA's experts under `model.model.<...>` (a LLaMA-style layout), so HF GPT-2
    (whose modules sit under `transformer`) goes inside a module that names it `model`."""
    from peft.tuners.xlora.model import XLoraModel

    class Outer(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model, self.config = inner, inner.config

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GPT2LMHeadModel.from_pretrained(root / "ckpt")
        hf.config.use_cache = False
        config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=WIDTH, adapters=adapters, **options)
        xlora = XLoraModel(Outer(hf), config, "xlora").eval()
    xlora.internal_xlora_classifier.load_state_dict(ours.transformer.expert_mixer.peft.state_dict())

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        with xlora._enable_peft_forward_hooks():
            return xlora(input_ids=input_ids).logits

    return forward


def test_logits_equal_peft_xlora_for_each_option(setup):
    root, adapters = setup
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    base = GPT2LMHeadModel.from_pretrained(root / "ckpt").eval()(ids).logits
    for name, options in OPTIONS.items():
        ours = ours_with(root, adapters, **options)
        theirs = reference(root, adapters, ours, **options)
        with torch.no_grad():
            got, expected = ours(ids).logits, theirs(ids)
        assert torch.allclose(got, expected, atol=1e-5), (name, (got - expected).abs().max())
        assert (got - base).abs().max() > 1e-2, name  # the experts are really mixed in


def test_layers_are_numbered_as_peft_numbers_them(setup):
    root, adapters = setup
    model = ours_with(root, adapters)
    layers = [(n, m.layer_number) for n, m in model.named_modules() if isinstance(m, XLoraLinear)]
    # every block: c_attn (experts 0, 1), c_proj (expert 2), c_fc (expert 1); the MLP's c_proj too
    assert [n for n, _ in layers[:4]] == [
        f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert [i for _, i in layers] == list(range(len(layers)))
    assert model.transformer.expert_mixer.n_layers == len(layers) == 8


def test_cached_generation_equals_full_forward_and_peft(setup):
    """Decoding keeps a second KV cache for the scaling pass: each token's scalings depend on its prefix
    only, so the cached tokens equal greedy decoding by full forwards (peft's X-LoRA, without a cache)."""
    root, adapters = setup
    ours = ours_with(root, adapters, layerwise_scalings=True)
    theirs = reference(root, adapters, ours, layerwise_scalings=True)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = ours.generate(prompt, max_new_tokens=6, eos_token_id=None)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, theirs(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_left_and_right_padding_give_the_same_last_token_logits(setup):
    root, adapters = setup
    model = ours_with(root, adapters)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(1, 3, dtype=ids.dtype)
    ones, zeros = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        alone = model(ids).logits[:, -1]
        right = model(torch.cat([ids, pad], 1), torch.cat([ones, zeros], 1)).logits[:, 5]
        left = model(torch.cat([pad, ids], 1), torch.cat([zeros, ones], 1)).logits[:, -1]
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)


def test_only_the_classifier_trains_and_the_experts_stay_fixed(setup):
    root, adapters = setup
    model = ours_with(root, adapters).train()
    set_trainable(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.transformer.expert_mixer.named_parameters(prefix="transformer.expert_mixer")}
    experts = {n: t.clone() for n, t in model.state_dict().items() if ".lora_" in n}
    assert len(experts) == 2 * 5 * 2  # per block: c_attn 2 experts, attn and mlp c_proj 1 each, c_fc 1; (A, B)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the scalings reach the loss
    optimizer.step()
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in experts.items())

    trainable_experts = ours_with(root, adapters, use_trainable_adapters=True)
    set_trainable(trainable_experts)
    names = {n for n, p in trainable_experts.named_parameters() if p.requires_grad}
    assert {n for n in names if ".lora_" in n} == set(experts)


def test_identity_counts_the_experts_by_content_not_folder(setup, tmp_path):
    import shutil

    root, adapters = setup
    moved = {name: str(shutil.copytree(path, tmp_path / f"moved{name}")) for name, path in adapters.items()}
    here, there = (
        GPT2Config.from_preset("tiny", peft_method="xlora", peft_config={"adapters": a}) for a in (adapters, moved)
    )
    assert here.peft_config["adapters"]["0"]["path"] != there.peft_config["adapters"]["0"]["path"]
    assert here.result_dict() == there.result_dict()
    assert peft_tag(here) == peft_tag(there)
    # another expert's content changes both
    weights = Path(moved["0"]) / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] + 1
    save_file(tensors, weights)
    changed = GPT2Config.from_preset("tiny", peft_method="xlora", peft_config={"adapters": {**moved}})
    assert changed.result_dict() != here.result_dict() and peft_tag(changed) != peft_tag(here)
    # and the configuration recorded before the change no longer builds: its expert is another adapter
    with pytest.raises(ValueError, match="not the adapter this run recorded"):
        GPT2LMHeadModel.from_pretrained(root / "ckpt", peft_method="xlora", peft_config=there.peft_config)


def test_experts_that_cannot_be_mixed_are_refused_with_the_reason(setup, tmp_path):
    root, adapters = setup
    hf = transformers.GPT2LMHeadModel.from_pretrained(root / "ckpt")
    peft.get_peft_model(hf, peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[])).save_pretrained(
        tmp_path / "ia3"
    )
    hf = transformers.GPT2LMHeadModel.from_pretrained(root / "ckpt")
    peft.get_peft_model(hf, peft.LoraConfig(target_modules=["c_attn"], use_dora=True)).save_pretrained(
        tmp_path / "dora"
    )
    wide = tmp_path / "wide"
    make_hf_checkpoint(wide / "ckpt", n_layer=2, n_head=4, n_embd=48, n_positions=64, vocab_size=VOCAB)
    hf = transformers.GPT2LMHeadModel.from_pretrained(wide / "ckpt")
    peft.get_peft_model(hf, peft.LoraConfig(target_modules=["c_attn"])).save_pretrained(wide / "lora")
    cases = {
        str(tmp_path / "ia3"): "mixes LoRA adapters only",
        str(tmp_path / "dora"): "use_dora=True",
        str(tmp_path / "nothing"): "not a peft LoRA adapter folder",
        str(wide / "lora"): "another base model",
    }
    for folder, message in cases.items():
        with pytest.raises(ValueError, match=message):
            GPT2LMHeadModel.from_pretrained(root / "ckpt", peft_method="xlora", peft_config={"adapters": {"x": folder}})
    for options, message in [
        ({"top_k_lora": 4}, "top_k_lora=4"),
        ({"enable_softmax_topk": True}, "needs top_k_lora"),
        ({"hidden_size": 64}, "32 wide"),
        ({"xlora_depth": 0}, "xlora_depth"),
    ]:
        with pytest.raises(ValueError, match=message):
            GPT2LMHeadModel.from_pretrained(
                root / "ckpt", peft_method="xlora", peft_config={"adapters": adapters, **options}
            )
    with pytest.raises(ValueError, match="peft_config.adapters"):
        GPT2Config.from_preset("tiny", peft_method="xlora")
    model = ours_with(root, adapters)
    for action in (model.merge_adapters, lambda: model.export_peft(tmp_path / "out")):
        with pytest.raises(ValueError, match="X-LoRA|each token"):
            action()


@pytest.mark.slow
def test_cli_mixes_finished_lora_runs(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    """As a user runs it: two LoRA runs (peft's and ours), then X-LoRA on sonnet with both run folders as
    experts; it trains only the classifier, resumes, is evaluated from its folder, and an expert
    trained from another base checkpoint is refused with one error line."""
    from tests.conftest import data_limits, run_paths
    from train.cli import entry, evaluate

    runs = tmp_path / "runs"
    common = [*run_paths(tiny_ckpt[0], tokenizer_dir, runs), *data_limits(8, dev=2), "--wandb", "disabled"]
    assert entry.main(["--task", "sst", "--peft_method", "lora", *common, "--epochs", "1"]) == 0
    assert entry.main(["--task", "quora", "--use_lora", "--lora_r", "4", *common, "--epochs", "1"]) == 0
    (sst_run,) = runs.glob("sst-peft-lora-*")
    (quora_run,) = runs.glob("quora-lora-*")
    experts = json.dumps({"adapters": {"sst": str(sst_run), "quora": str(quora_run)}})
    sonnet = ["--task", "sonnet", "--peft_method", "xlora", "--peft_config", experts, *common, "--max_new_tokens", "8"]
    assert entry.main([*sonnet, "--epochs", "1"]) == 0
    (run,) = runs.glob("sonnet-peft-xlora-*")
    record = json.loads((run / "config.json").read_text())
    assert record["parameters"]["trainable"] == 32 * 2 + 2  # the classifier: width x experts + bias
    recorded = record["config"]["peft_config"]["adapters"]
    (sst_export,) = (sst_run / "exports").glob("peft-best-000002-*")
    assert recorded["sst"]["path"] == str(sst_export)
    (quora_export,) = (quora_run / "exports").glob("peft-best-000002-*")
    assert (quora_export / "adapter_model.safetensors").is_file()
    # a best checkpoint changed after its export (same folder name) is exported anew, not read stale
    from safetensors.torch import load_file, save_file

    from train.run.experts import export_expert

    weights_file = quora_run / "checkpoints" / "best-000002" / "trainable.safetensors"
    weights = load_file(str(weights_file))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(weights_file))
    fresh = export_expert("quora", quora_run, record["spec"]["checkpoint"]["identity"])
    assert fresh != quora_export and (fresh / "adapter_model.safetensors").is_file()
    old, new = (load_file(str(f / "adapter_model.safetensors")) for f in (quora_export, fresh))
    assert old.keys() == new.keys() and all(not torch.equal(old[k], new[k]) for k in old)
    save_file(weights, str(weights_file))  # as trained: the runs below use the first export again
    assert entry.main([*sonnet, "--epochs", "1", "--resume", "--extend_epochs", "1"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "train/loss" in e] == [1, 2, 3, 4]
    out = tmp_path / "eval"
    flags = ["--dev_limit", "2", "--test_limit", "1", "--max_new_tokens", "8"]
    assert evaluate.main(["--task", "sonnet", "--model", str(run), "--out_dir", str(out), *flags]) == 0
    assert json.loads((out / "metrics.json").read_text())["dev_chrf"] >= 0

    other = tmp_path / "other"
    make_hf_checkpoint(other, seed=3, n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        entry.main([*sonnet, "--epochs", "1", "--model", str(other)])
    assert exit_info.value.code == 2
    assert "trained from another base checkpoint" in capsys.readouterr().err
