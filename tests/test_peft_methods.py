"""Every supported peft method (`peft_method`) equals HF GPT-2 + `peft.get_peft_model` with the same
config and adapter weights; exports load into stock HF GPT-2 + peft; identity at init and exact merge
where the method defines them; every other installed peft method is refused with its reason."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from model import GPT2LMHeadModel
from model.adapters import merge_adapters
from model.config import GPT2Config
from model.trainable import set_trainable
from modules.peft_methods import (
    ADAPTER_NAME,
    EXPERT_MIXTURES,
    LINEAR_ONLY,
    METHODS,
    PROMPT_LEARNING,
    REFUSED,
    STANDALONE,
    STOCK_GPT2,
    SUPPORTED,
    peft_config_for,
)
from tests.conftest import DATA_DIR, REPO, make_hf_checkpoint, perturb_adapters, run_paths
from tests.peft_matrix import linear_hf_gpt2

ATOL = 1e-5
# Fields a method cannot do without (the token ids trainable_tokens trains), for the 100-token test vocabulary.
TEST_FIELDS = {"trainable_tokens": {"token_indices": [3, 17, 42]}, "beft": {"target_modules": ["c_attn"]}}


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """Width 256: C3A's default block size and VB-LoRA's vector length (256) must divide the widths."""
    path = tmp_path_factory.mktemp("wide_gpt2")
    make_hf_checkpoint(path, n_layer=2, n_head=4, n_embd=256, n_positions=64, vocab_size=100)
    return path


def perturbed(path, method: str) -> GPT2LMHeadModel:
    """Our model with the method attached and its trainable weights moved away from init."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel.from_pretrained(
            path,
            peft_method=method,
            peft_config=TEST_FIELDS.get(method),
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
        )
    return perturb_adapters(model)


def reference_for(path, ours: GPT2LMHeadModel):
    """HF GPT-2 + peft.get_peft_model, built independently of our export, holding our adapter tensors."""
    method = ours.config.peft_method
    stock = method in STOCK_GPT2
    base = transformers.GPT2LMHeadModel.from_pretrained(path) if stock else linear_hf_gpt2(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(base, peft_config_for(ours.config, fan_in_fan_out=stock)).eval()
    theirs = reference.state_dict(keep_vars=True)
    copied = 0
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            if ADAPTER_NAME in name.split("."):
                key = "base_model.model." + name.replace(f".{ADAPTER_NAME}", ".default")
                theirs[key].copy_(tensor)
                copied += 1
    assert copied > 0
    return reference


def test_every_installed_peft_method_is_supported_or_refused():
    installed = {t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    assert not set(SUPPORTED) & set(REFUSED)
    assert installed == set(SUPPORTED) | set(REFUSED), "a peft method is neither supported nor refused"


def test_each_method_is_one_record_and_the_lists_are_views_of_them():
    """METHODS is the one table: every grouping and field the code reads comes from a method's record, and
    the methods with their own path (prompt learning, X-LoRA) bring their records from their own files."""
    import modules.prompt_learning
    import modules.xlora
    from modules.variant import LrPrior, PeftMethod

    groups = [STOCK_GPT2, LINEAR_ONLY, PROMPT_LEARNING, EXPERT_MIXTURES]
    assert sorted(m for group in groups for m in group) == sorted(METHODS) == list(SUPPORTED)
    assert all(
        METHODS[m].runs_as == kind
        for group, kind in zip(groups, ("stock", "linear", "prompt", "experts"), strict=True)
        for m in group
    )
    assert {m.name for m in modules.prompt_learning.METHODS} == set(PROMPT_LEARNING)
    assert METHODS["xlora"] is modules.xlora.METHOD
    assert all(isinstance(record, PeftMethod) and record.name == name for name, record in METHODS.items())
    with pytest.raises(ValueError, match="runs_as 'conv' unknown"):
        PeftMethod("new", "conv", LrPrior(1e-4, 1e-3, "a test"))


# prompt learning: test_prompt_learning.py; poly needs the task: test_poly_routes_each_task_as_peft_does;
# xlora needs LoRA experts: test_xlora.py
@pytest.mark.parametrize("method", [m for m in STANDALONE if m not in (*PROMPT_LEARNING, "poly")])
def test_logits_equal_hf_plus_peft_and_identity_merge(wide_ckpt, method):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    base = GPT2LMHeadModel.from_pretrained(wide_ckpt).eval()
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel.from_pretrained(wide_ckpt, peft_method=method, peft_config=TEST_FIELDS.get(method)).eval()
    with torch.no_grad():
        gap_at_init = (fresh(ids).logits - base(ids).logits).abs().max().item()
    if METHODS[method].not_identity_at_init:
        assert gap_at_init > ATOL  # the listed reason still holds: otherwise move the method off the list
    else:
        assert gap_at_init <= ATOL

    ours = perturbed(wide_ckpt, method)
    reference = reference_for(wide_ckpt, ours)
    with torch.no_grad():
        logits = ours(ids).logits
        assert (logits - base(ids).logits).abs().max().item() > 1e-3  # the perturbation moved the output
        assert (logits - reference(input_ids=ids).logits).abs().max().item() <= ATOL

    # adapters mode trains exactly what peft trains on the reference
    set_trainable(ours, "adapters")
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_trained = {
        n.removeprefix("base_model.model.").replace(".default", f".{ADAPTER_NAME}")
        for n, p in reference.named_parameters()
        if p.requires_grad
    }
    assert trained == peft_trained

    if METHODS[method].not_mergeable:
        with pytest.raises(ValueError, match="cannot merge"):
            merge_adapters(ours)
    else:
        merge_adapters(ours)
        assert not any(ADAPTER_NAME in n.split(".") for n in ours.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_reference = reference.merge_and_unload()
        with torch.no_grad():
            merged = ours(ids).logits
            # peft's own merge, to float rounding; both move the logits by float32 merge error, which is
            # larger for RandLoRA's big update (2e-4 at width 256, peft's merge alike)
            assert (merged - merged_reference(input_ids=ids).logits).abs().max().item() <= ATOL
            assert (merged - logits).abs().max().item() <= 5e-4


@pytest.mark.parametrize("method", STOCK_GPT2)
def test_export_peft_loads_into_stock_hf_gpt2(wide_ckpt, method, tmp_path):
    ours = perturbed(wide_ckpt, method)
    ours.export_peft(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"].lower() == method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(wide_ckpt), tmp_path)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - loaded.eval()(input_ids=ids).logits).abs().max().item() <= ATOL


def test_save_load_adapters_round_trip_with_shared_tensors(wide_ckpt, tmp_path):
    ours = perturbed(wide_ckpt, "vera")  # VeRA's frozen A/B are one tensor shared by every layer
    ours.save_adapters(tmp_path)
    fresh = GPT2LMHeadModel.from_pretrained(wide_ckpt).eval()
    fresh.load_adapters(tmp_path)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, fresh(ids).logits)


def test_linear_only_methods_are_not_exported_in_peft_format(wide_ckpt, tmp_path):
    ours = perturbed(wide_ckpt, LINEAR_ONLY[0])
    with pytest.raises(ValueError, match="nn.Linear only"):
        ours.export_peft(tmp_path)


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_refused_methods_exit_2_with_their_reason(tiny_ckpt, tokenizer_dir, tmp_path, capsys, method):
    from train import sentiment

    with pytest.raises(SystemExit) as exit_info:
        sentiment.main(["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), "--peft_method", method])
    assert exit_info.value.code == 2
    assert REFUSED[method][:40] in capsys.readouterr().err


def test_peft_method_with_use_lora_is_refused():
    with pytest.raises(ValueError, match="same linears"):
        GPT2LMHeadModel(GPT2Config.from_preset("tiny", peft_method="ia3", use_lora=True))


@pytest.mark.parametrize("other, namespace", [("use_graph", "graph"), ("use_kora", "kora")])
def test_peft_method_composes_with_graph_and_kora(wide_ckpt, other, namespace):
    model = GPT2LMHeadModel.from_pretrained(wide_ckpt, peft_method="vera", **{other: True})
    set_trainable(model, "adapters")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".peft" in n for n in trained) and any(namespace in n for n in trained)
    ids = torch.randint(0, 100, (2, 9))
    model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_cli_trains_a_peft_adapter_config_json(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    """`--peft_config adapter_config.json` (what peft users keep): its peft_type sets the method, its
    bookkeeping fields do not change the run's identity, and adapters mode trains the method's weights."""
    from train import sentiment

    perturbed(tiny_ckpt[0], "ia3").export_peft(tmp_path / "exported")
    saved = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] and saved["peft_type"] == "IA3"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps({**saved, "base_model_name_or_path": "elsewhere"}))
    flags = [*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "runs"), "--train_limit", "8", "--dev_limit", "4"]
    flags += ["--test_limit", "2", "--batch_size", "4", "--max_steps", "1", "--wandb", "disabled"]
    assert (
        sentiment.main(
            ["--dataset", "sst", *flags, "--peft_config", str(tmp_path / "exported" / "adapter_config.json")]
        )
        == 0
    )
    (run,) = [path for path in (tmp_path / "runs").iterdir() if path.is_dir()]
    capsys.readouterr()
    assert sentiment.main(["--dataset", "sst", *flags, "--peft_config", str(renamed)]) == 2
    assert f"{run} holds a finished run" in capsys.readouterr().err  # same identity, same folder
    assert run.name.startswith("sst-peft-ia3-")
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["peft_method"] == "ia3"
    assert record["config"]["peft_config"]["feedforward_modules"] == ["mlp.c_proj"]
    # IA3 vectors: c_attn's output (3 x 32) and mlp.c_proj's input (4 x 32) per block; plus the head
    assert record["parameters"]["trainable"] == 2 * (3 * 32 + 4 * 32) + 5 * 32 + 5


def test_docs_table_and_methods_presets_are_generated_from_the_code():
    from experiments import methods as peft_methods

    page = (REPO / "docs" / "peft-methods.md").read_text()
    assert peft_methods.methods_table() in page, "docs/peft-methods.md's table is stale: python scripts/peft_methods.py"
    from experiments.planning import load_preset

    for name, made in peft_methods.PRESETS_MADE_HERE.items():
        path = REPO / "experiments" / "presets" / f"{name}.toml"
        assert path.read_text() == made.text(), f"{name}.toml is stale: python scripts/peft_methods.py --write"
        preset = load_preset(path)  # the typed grid reads back every value the record holds
        assert (preset.name, preset.tasks, preset.seeds, preset.model, preset.common) == (
            made.name,
            made.tasks,
            made.seeds,
            made.model,
            made.common,
        )
        assert preset.variants == peft_methods.variants(made.smoke) and preset.xlora == {"experts": made.xlora_experts}
        assert preset.tune is not None and preset.tune.points == made.tune_points
    with pytest.raises(TypeError, match="strings, integers and lists"):
        peft_methods.toml_value(1.5)


def test_methods_smoke_grid_plans_every_method_without_collisions(tmp_path, tokenizer_dir):
    from experiments import methods as peft_methods
    from experiments import planning

    preset = planning.load_preset(REPO / "experiments" / "presets" / "methods_smoke.toml")
    inputs = ["--data_dir", str(DATA_DIR), "--tokenizer", str(tokenizer_dir)]
    grid = planning.plan_grid(preset, tmp_path, inputs)  # its [tune] stage: two rates per method, then 3 seeds
    runs = grid.tuning
    assert len({run.run_dir for run in runs}) == len(runs) == len(preset.variants) * 2
    assert grid.waiting == len(preset.variants) * 3 and not grid.runs
    expected = {*peft_methods.OWN_VARIANTS, *(f"peft_{m}" for m in STANDALONE)}
    assert {run.variant for run in runs} == expected
    assert {"kolmg_dora", "pissa", "lora_plus", "graph_lora", "kora"} <= expected


def test_sizes_peft_rejects_are_one_error_before_weights_load_and_gpt2_defaults_fit():
    from experiments.methods import SMOKE_SIZES
    from modules.peft_methods import check_peft

    for method in STANDALONE:  # every default fits gpt2 (768 wide, 12 blocks)
        check_peft(GPT2Config.from_preset("gpt2", peft_method=method, peft_config=METHODS[method].required or None))
    for method, sizes in SMOKE_SIZES.items():  # ... but not the 32-wide test model, unless resized
        with pytest.raises(ValueError, match=f"peft {method} on this 32-wide model"):
            check_peft(GPT2Config.from_preset("tiny", peft_method=method))
        check_peft(GPT2Config.from_preset("tiny", peft_method=method, peft_config=sizes))


def test_the_size_check_builds_each_method_once_and_refuses_every_time(monkeypatch):
    """Every GPT2Config built runs check_peft; its skeleton build is done once per method config and
    shape, and a size that does not fit is refused on every build, with peft's message."""
    from experiments.methods import SMOKE_SIZES
    from modules import peft_methods

    method = sorted(SMOKE_SIZES)[0]
    monkeypatch.setattr(peft_methods, "_SIZE_VERDICTS", {})
    built = []
    real = peft_methods._size_verdict
    monkeypatch.setattr(peft_methods, "_size_verdict", lambda *args: built.append(args[3]) or real(*args))
    messages = []
    for _ in range(2):
        with pytest.raises(ValueError, match=f"peft {method} on this 32-wide model") as refused:
            GPT2Config.from_preset("tiny", peft_method=method)
        messages.append(str(refused.value))
    assert len(built) == 1 and messages[0] == messages[1]
    GPT2Config.from_preset("tiny", peft_method=method, peft_config=SMOKE_SIZES[method])
    GPT2Config.from_preset("tiny", peft_method=method, peft_config=SMOKE_SIZES[method])
    assert len(built) == 2  # the resized config: one more build, then none


@pytest.mark.slow
def test_random_frozen_state_travels_in_checkpoints_to_evaluate(tiny_ckpt, tokenizer_dir, tmp_path):
    """VB-LoRA's frozen tensors are random draws: train.evaluate must use the run's, not new ones."""
    from train import sentiment
    from train.cli import evaluate
    from train.run.checkpoint import checkpoint_folder, load_checkpoint
    from train.run.trained import load_model

    flags = [*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "runs"), "--train_limit", "8", "--dev_limit", "8"]
    flags += ["--test_limit", "2", "--batch_size", "4", "--max_steps", "2", "--wandb", "disabled"]
    flags += ["--peft_method", "vblora", "--peft_config", '{"vector_length": 16}']
    assert sentiment.main(["--dataset", "sst", *flags]) == 0
    (run,) = [path for path in (tmp_path / "runs").iterdir() if path.is_dir()]
    weights, _, _ = load_checkpoint(checkpoint_folder(run / "checkpoints", "best"))
    frozen = {k: v for k, v in weights.items() if ".peft" in k and "vblora_vector_bank" not in k}
    torch.manual_seed(1234)  # a different draw than training's
    model, _, _ = load_model(str(run))
    state = model.state_dict()
    assert frozen and all(torch.equal(state[k.removeprefix("model.")], v) for k, v in frozen.items())
    out = tmp_path / "eval"
    limits = ["--dev_limit", "8", "--test_limit", "2"]
    assert evaluate.main(["--task", "sst", *run_paths(run, tokenizer_dir, out), *limits]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["dev_acc"] == trained["dev_acc"]


# ---------------------------------------------------------------- AdaLoRA's allocator

ADALORA = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "lora_dropout": 0.0}


def test_adalora_prunes_to_the_same_rank_pattern_as_peft_after_the_same_steps(wide_ckpt):
    """Our step hook against peft's own AdaLoraModel.update_and_allocate on stock HF GPT-2, with the same
    adapter weights, the same gradients (the same loss) and the same plain SGD update."""
    total, lr = 6, 0.1
    torch.manual_seed(0)
    ours = GPT2LMHeadModel.from_pretrained(
        wide_ckpt, peft_method="adalora", peft_config={**ADALORA, "total_step": total}, embd_pdrop=0.0,
        attn_pdrop=0.0, resid_pdrop=0.0,
    )  # fmt: skip
    perturb_adapters(ours, scale=0.2)
    theirs = reference_for(wide_ckpt, ours)
    set_trainable(ours)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))

    def step(model, logits_of) -> None:
        logits = logits_of(model)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.grad is not None:
                    p -= lr * p.grad

    def adapters(model, prefix="") -> dict[str, torch.Tensor]:
        return {n.removeprefix(prefix).replace(".default", f".{ADAPTER_NAME}"): p.detach().clone()
                for n, p in model.named_parameters() if "lora_" in n}  # fmt: skip

    for index in range(total + 2):  # through the final phase, where the pattern is only kept
        step(ours, lambda m: m(ids).logits)
        ours.after_optimizer_step(index, total)
        ours.zero_grad(set_to_none=True)
        step(theirs, lambda m: m(input_ids=ids).logits)
        theirs.base_model.update_and_allocate(index)
        theirs.zero_grad(set_to_none=True)
    mine, reference = adapters(ours), adapters(theirs, "base_model.model.")
    assert mine.keys() == reference.keys()
    pattern = theirs.peft_config["default"].rank_pattern
    ours_pattern = ours.__dict__["peft_rank_allocator"].peft_config.rank_pattern
    assert pattern and {k.replace(".default", f".{ADAPTER_NAME}"): v for k, v in pattern.items()} == ours_pattern
    kept = sum(sum(v) for v in ours_pattern.values())
    assert kept == ADALORA["target_r"] * len(ours_pattern)  # pruned to the budget: target_r per matrix
    for name in mine:
        torch.testing.assert_close(mine[name], reference[name], rtol=0, atol=1e-5)
    pruned = [p for n, p in mine.items() if "lora_E" in n]
    assert sum(int((p == 0).sum()) for p in pruned) == sum(len(v) - sum(v) for v in ours_pattern.values())


def test_adalora_orthogonality_is_peft_s_regulariser(wide_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(wide_ckpt, peft_method="adalora", peft_config=ADALORA)
    perturb_adapters(ours, scale=0.3)
    theirs = reference_for(wide_ckpt, ours)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    with_reg = theirs.base_model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds the regulariser
    plain = theirs.base_model.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(ours.auxiliary_loss(), with_reg - plain, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adalora_run_prunes_on_schedule_and_resumes_bit_exactly(tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch):
    """Through the CLI: SIGTERM after step 3 (mid-budgeting), --resume, and the end state equals an
    uninterrupted run's: weights, pruned singular values and the allocator's rank pattern."""
    import os
    import signal

    from train import sentiment
    from train.run.checkpoint import checkpoint_folder, load_checkpoint

    adalora = json.dumps({**ADALORA, "target_r": 1})
    flags = ["--train_limit", "32", "--dev_limit", "4", "--test_limit", "2", "--batch_size", "4", "--epochs", "1"]
    flags += ["--wandb", "disabled", "--peft_method", "adalora", "--peft_config", adalora, "--lr", "1e-2"]

    def final_state(out):
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        weights, state, _ = load_checkpoint(checkpoint_folder(run / "checkpoints", "last"))
        return weights, state["variant_state"]["peft"]["rank_pattern"]

    assert sentiment.main(["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "a"), *flags]) == 0
    original = GPT2LMHeadModel.after_optimizer_step

    def interrupt_after_step_3(self, step, total):
        original(self, step, total)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(GPT2LMHeadModel, "after_optimizer_step", interrupt_after_step_3)
    argv = ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "b"), *flags]
    assert sentiment.main(argv) == 143
    monkeypatch.setattr(GPT2LMHeadModel, "after_optimizer_step", original)
    assert sentiment.main([*argv, "--resume"]) == 0
    (weights_a, pattern_a), (weights_b, pattern_b) = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    # the budget is global: target_r x the number of adapted matrices, shared out by importance
    assert pattern_a == pattern_b and sum(map(sum, pattern_a.values())) == len(pattern_a)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    singular = [v for k, v in weights_a.items() if "lora_E" in k]  # pruned ones are exactly 0
    assert len(singular) == len(pattern_a) and sum(int((v != 0).sum()) for v in singular) <= len(pattern_a)


def test_adamss_with_asa_is_refused_with_its_reason(tiny_ckpt, tmp_path, capsys):
    from train.cli import entry

    argv = ["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path), "--peft_method", "adamss"]
    with pytest.raises(SystemExit) as stop:
        entry.parse(entry.GENERIC, [*argv, "--peft_config", '{"use_asa": true}'], inputs=False)
    assert stop.value.code == 2 and "use_asa" in capsys.readouterr().err


def test_trainable_tokens_reach_the_loss_and_the_cloze_head_through_the_tied_lm_head(wide_ckpt):
    """The trained rows replace the embedding's and the tied LM head's rows alike: the fused loss and
    the paraphrase cloze head read the merged matrix, as HF GPT-2 + peft's tied layer does."""
    from model.heads import ClozeParaphraseHead

    ours = perturbed(wide_ckpt, "trainable_tokens")
    reference = reference_for(wide_ckpt, ours)
    ids = torch.tensor([[3, 17, 42, 5, 3, 9], [42, 42, 17, 8, 3, 17]])
    with torch.no_grad():
        out = ours(ids, labels=ids, return_logits=True)
        theirs = reference(input_ids=ids, labels=ids)
        assert abs(out.loss.item() - theirs.loss.item()) <= ATOL
        head = ClozeParaphraseHead(ours.lm_head, no_id=3, yes_id=17)
        cloze = head(ours.transformer(ids).last_hidden_state, None)
        assert (cloze - out.logits[:, -1, [3, 17]]).abs().max().item() <= ATOL
        base = GPT2LMHeadModel.from_pretrained(wide_ckpt).eval()
        assert (out.logits[:, -1, [3, 17]] - base(ids).logits[:, -1, [3, 17]]).abs().max().item() > 1e-3


def test_trainable_tokens_without_token_indices_is_one_error_naming_the_field():
    with pytest.raises(ValueError, match="token_indices"):
        GPT2Config.from_preset("tiny", peft_method="trainable_tokens")
    with pytest.raises(ValueError, match="not ids of this"):
        GPT2Config.from_preset("tiny", peft_method="trainable_tokens", peft_config={"token_indices": [60000]})


def test_poly_routes_each_task_as_peft_does(wide_ckpt):
    """peft's poly mixes LoRA skills with a router row per task: under `model.for_task(i)` our logits
    equal HF GPT-2 + peft given task_ids = i, for each of the four tasks; the tasks differ; a forward
    without a task stops with one error (a 4-task router has no default row); identity at init."""
    from train.tasks import TASKS

    assert peft_config_for(GPT2Config.from_preset("tiny", peft_method="poly")).n_tasks == len(TASKS)
    base = GPT2LMHeadModel.from_pretrained(wide_ckpt).eval()
    fresh = GPT2LMHeadModel.from_pretrained(wide_ckpt, peft_method="poly").eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), fresh.for_task(2):
        assert (fresh(ids).logits - base(ids).logits).abs().max().item() <= ATOL
    ours = perturbed(wide_ckpt, "poly")
    reference = reference_for(wide_ckpt, ours)
    outputs = []
    with torch.no_grad():
        for task in range(len(TASKS)):
            with ours.for_task(task):
                mine = ours(ids).logits
            # PolyModel.forward takes task_ids (PeftModel's forward drops them in peft 0.21.2)
            theirs = reference.base_model(input_ids=ids, task_ids=torch.full((2,), task)).logits
            assert (mine - theirs).abs().max().item() <= ATOL
            outputs.append(mine)
        assert (outputs[0] - outputs[1]).abs().max().item() > 1e-4
        with pytest.raises(ValueError, match="routes each batch by its task"):
            ours(ids)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_adapters(ours)


@pytest.mark.slow
def test_poly_runs_train_each_task_s_own_route(tiny_ckpt, tokenizer_dir, tmp_path):
    """Through the CLI: a multitask poly run moves every task's router row, an SST run only SST's
    (rows start within ±1e-3; lr 0.05 moves a trained row far beyond)."""
    from safetensors.torch import load_file

    from train import multitask, sentiment

    def router_rows(out) -> torch.Tensor:
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        (weights,) = (run / "checkpoints").glob("last-*/trainable.safetensors")
        tensors = load_file(str(weights))
        return tensors["model.transformer.h.0.attn.c_attn.poly_router.peft.module_logits"]

    def flags(out: str) -> list[str]:
        found = [*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / out), "--train_limit", "8", "--dev_limit", "2"]
        found += ["--test_limit", "1", "--batch_size", "4", "--epochs", "1"]
        return [*found, "--peft_method", "poly", "--lr", "0.05", "--wandb", "disabled"]

    assert multitask.main([*flags("multi"), "--max_new_tokens", "4"]) == 0
    moved = router_rows(tmp_path / "multi").abs().amax(dim=1) > 1e-2
    assert moved.tolist() == [True, True, True, True]  # sst, cfimdb, quora, sonnet
    assert sentiment.main(["--dataset", "sst", *flags("sst")]) == 0
    moved = router_rows(tmp_path / "sst").abs().amax(dim=1) > 1e-2
    assert moved.tolist() == [True, False, False, False]
