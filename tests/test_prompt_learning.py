"""Prompt learning (prompt tuning, P-tuning, prefix tuning) against HF GPT-2 + peft: logits, loss,
padding sides, generation, export to stock PeftModel, and what the pipeline does with virtual tokens."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers

from model import GPT2LMHeadModel
from model.adapters import merge_adapters
from model.trainable import set_trainable
from modules.peft_methods import PROMPT_LEARNING, peft_config_for
from tests.conftest import make_hf_checkpoint

ATOL = 1e-5
VOCAB = 100
N_VIRTUAL = 3
CASES = {
    "prompt_tuning": {},
    "prompt_tuning-sample_vocab": {"prompt_tuning_init": "SAMPLE_VOCAB"},
    "p_tuning": {},
    "p_tuning-lstm": {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 16},
    "prefix_tuning": {},
    "prefix_tuning-projection": {"prefix_projection": True, "encoder_hidden_size": 16},
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt_gpt2")
    make_hf_checkpoint(path, n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=VOCAB)
    return path


def ours_with(ckpt, case: str) -> GPT2LMHeadModel:
    method = case.split("-")[0]
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(
        ckpt, peft_method=method, peft_config={"num_virtual_tokens": N_VIRTUAL, **CASES[case]}
    ).eval()
    with torch.no_grad():  # away from init, so a mis-wired encoder cannot pass by being zero
        for p in model.transformer.virtual_tokens.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def reference(ckpt, ours: GPT2LMHeadModel):
    """HF GPT-2 + peft.get_peft_model with the same config, holding our encoder's weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GPT2LMHeadModel.from_pretrained(ckpt)
        wrapped = peft.get_peft_model(hf, peft_config_for(ours.config)).eval()
    wrapped.prompt_encoder["default"].load_state_dict(ours.transformer.virtual_tokens.peft.state_dict())
    return wrapped


def batch(seed: int = 1, length: int = 7):
    ids = torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding: peft's convention for positions holds there
    mask[2, 3:] = 0
    return ids, mask


def left_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [torch.cat([ids[i][mask[i] == 0], ids[i][mask[i] == 1]]) for i in range(len(ids))]
    masks = [torch.cat([mask[i][mask[i] == 0], mask[i][mask[i] == 1]]) for i in range(len(ids))]
    return torch.stack(rows), torch.stack(masks)


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_equal_hf_plus_peft(ckpt, case):
    ours = ours_with(ckpt, case)
    theirs = reference(ckpt, ours)
    ids, mask = batch()
    # The first token is nobody's target here: peft's prompt and P-tuning would also score it (predicted
    # from the last virtual token), while our loss has the same targets with or without virtual tokens
    # (so methods compare on one loss), as peft's own prefix tuning does.
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    with torch.no_grad():
        out = ours(ids, mask, labels=labels, return_logits=True)
        ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ids.shape + (VOCAB,)  # only the input's own positions come out
    ref_logits = ref.logits[:, -ids.shape[1] :]  # prompt and P-tuning return the virtual positions too
    gap = (out.logits - ref_logits)[mask.bool()].abs().max().item()
    assert gap <= ATOL, gap
    # the sonnet loss: next-token cross-entropy over real tokens only, as peft's (-100 on virtual tokens)
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL


@pytest.mark.parametrize("case", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_left_and_right_padding_give_the_same_last_token_logits(ckpt, case):
    ours = ours_with(ckpt, case)
    ids, mask = batch(seed=3)
    lids, lmask = left_padded(ids, mask)
    with torch.no_grad():
        right = ours(ids, mask).logits
        left = ours(lids, lmask).logits
    last = mask.sum(1) - 1
    gap = (right[torch.arange(3), last] - left[:, -1]).abs().max().item()
    assert gap <= ATOL, gap
    # and a padded row equals that row alone
    with torch.no_grad():
        alone = ours(ids[2:, :3]).logits[0, -1]
    assert (alone - right[2, 2]).abs().max().item() <= ATOL


@pytest.mark.parametrize("case", ["prompt_tuning", "prefix_tuning"])
def test_cached_generation_equals_full_forwards_and_peft_generate(ckpt, case):
    ours = ours_with(ckpt, case)
    theirs = reference(ckpt, ours)
    ids, mask = batch(seed=4)
    lids, lmask = left_padded(ids, mask)
    generated = ours.generate(lids, attention_mask=lmask, max_new_tokens=6, eos_token_id=None)
    # greedy by hand: a full forward (no cache) per token
    sequence, seq_mask = lids, lmask
    with torch.no_grad():
        for _ in range(6):
            nxt = ours(sequence, seq_mask).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, nxt], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(generated, sequence)
    # peft's generate on HF GPT-2 (unpadded rows: HF's positions ignore left padding)
    row = ids[:1]
    with torch.no_grad():
        peft_out = theirs.generate(
            input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(ours.generate(row, max_new_tokens=6, eos_token_id=None), peft_out[:, -row.shape[1] - 6 :])


@pytest.mark.parametrize("case", CASES)
def test_export_peft_loads_in_stock_peft_model(ckpt, case, tmp_path):
    ours = ours_with(ckpt, case)
    ours.export_peft(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(ckpt), tmp_path).eval()
    ids, mask = batch(seed=5)
    with torch.no_grad():
        gap = (ours(ids, mask).logits - stock(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :])[
            mask.bool()
        ]
    assert gap.abs().max().item() <= ATOL


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_only_the_virtual_tokens_train_and_peft_trains_the_same(ckpt, method):
    ours = ours_with(ckpt, method)
    theirs = reference(ckpt, ours)
    set_trainable(ours, "adapters")
    prefix = "transformer.virtual_tokens.peft."
    trained = {n.removeprefix(prefix) for n, p in ours.named_parameters() if p.requires_grad}
    assert all(n.startswith("transformer.virtual_tokens.peft.") for n in ours.adapter_params)
    peft_trained = {n.removeprefix("prompt_encoder.default.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert trained == peft_trained
    ids, mask = batch(seed=6)
    ours.train()
    ours(ids, mask, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_not_identity_at_init_and_no_merge(ckpt, method):
    base = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    fresh = GPT2LMHeadModel.from_pretrained(ckpt, peft_method=method, peft_config={"num_virtual_tokens": 2}).eval()
    ids, _ = batch()
    with torch.no_grad():
        assert (fresh(ids).logits - base(ids).logits).abs().max().item() > ATOL
    with pytest.raises(ValueError, match="cannot merge"):
        merge_adapters(fresh)


def test_virtual_tokens_count_against_the_context(ckpt):
    model = GPT2LMHeadModel.from_pretrained(ckpt, peft_method="prompt_tuning", peft_config={"num_virtual_tokens": 10})
    assert model.config.input_positions == 64 - 10
    with pytest.raises(ValueError, match="10 virtual \\+ 60 real tokens exceed"):
        model(torch.zeros(1, 60, dtype=torch.long))
    with pytest.raises(ValueError, match="10 virtual tokens"):
        model.generate(torch.zeros(1, 50, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(ValueError, match="leaves no position"):
        GPT2LMHeadModel.from_pretrained(ckpt, peft_method="prefix_tuning", peft_config={"num_virtual_tokens": 64})
    with pytest.raises(ValueError, match="does not match this model"):
        GPT2LMHeadModel.from_pretrained(ckpt, peft_method="p_tuning", peft_config={"token_dim": 48})
    with pytest.raises(ValueError, match="graph branch"):
        GPT2LMHeadModel.from_pretrained(ckpt, peft_method="prompt_tuning", use_graph=True)


@pytest.mark.slow
def test_cli_trains_resumes_and_evaluates_each_task_with_virtual_tokens(tiny_ckpt, tokenizer_dir, tmp_path):
    """Through the CLI as a user runs it: sonnet (loss and generation), the paraphrase cloze head and
    multitask with prefix / prompt tuning; a resumed run continues the same virtual tokens, and
    train.evaluate rebuilds them from the run folder."""
    import json

    from tests.conftest import data_limits, run_paths
    from train.cli import entry, evaluate

    runs = tmp_path / "runs"
    common = [*run_paths(tiny_ckpt[0], tokenizer_dir, runs), *data_limits(8, dev=2), "--wandb", "disabled"]
    virtual = ["--peft_config", '{"num_virtual_tokens": 4}']
    sonnet = ["--task", "sonnet", "--peft_method", "prefix_tuning", *virtual, *common, "--max_new_tokens", "12"]
    assert entry.main([*sonnet, "--epochs", "1"]) == 0
    assert entry.main(["--task", "quora", "--peft_method", "prompt_tuning", *virtual, *common, "--epochs", "1"]) == 0
    (sonnet_run,) = runs.glob("sonnet-peft-prefix_tuning-*")
    metrics = json.loads((sonnet_run / "metrics.json").read_text())
    assert metrics["dev_chrf"] > 0  # generation with the prefix in the cache produced text
    record = json.loads((sonnet_run / "config.json").read_text())
    assert record["parameters"]["trainable"] == 4 * 2 * 2 * 32  # n x 2 (K, V) x layers x width
    # resume with one more epoch: the virtual tokens continue from the checkpoint
    assert entry.main([*sonnet, "--epochs", "1", "--resume", "--extend_epochs", "1"]) == 0
    log = [json.loads(line) for line in (sonnet_run / "log.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in log if "train/loss" in entry]
    assert steps == [1, 2, 3, 4]  # resumed at step 3, not from scratch
    out = tmp_path / "eval"
    flags = ["--dev_limit", "2", "--test_limit", "1", "--max_new_tokens", "12"]
    assert evaluate.main(["--task", "sonnet", "--model", str(sonnet_run), "--out_dir", str(out), *flags]) == 0
