"""Heads read the last real token; the two-token cloze head equals the LM head there; metrics are
checked by hand and chrF against sacrebleu's own command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model import GPT2LMHeadModel
from model.heads import NO_ID, YES_ID, ClozeParaphraseHead, LastTokenClassifier, last_token_index
from tests.conftest import PAD, VOCAB
from train.tasks.metrics import accuracy, chrf, macro_f1


@pytest.mark.parametrize(
    "make_head",
    [
        lambda m: LastTokenClassifier(32, 5),
        lambda m: ClozeParaphraseHead(m.lm_head),
        lambda m: LastTokenClassifier(32, 2),
    ],
)
def test_same_prediction_however_padded(tiny_ckpt, make_head):  # the cloze head needs the real vocabulary
    model = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0]).eval()
    torch.manual_seed(0)
    head = make_head(model).eval()
    seq = [11, 22, 33, 44, 55]
    variants = [
        ([seq], [[1] * 5]),
        ([seq + [PAD] * 3], [[1] * 5 + [0] * 3]),  # right-padded
        ([[PAD] * 4 + seq], [[0] * 4 + [1] * 5]),
    ]  # left-padded
    outputs = []
    with torch.no_grad():
        for ids, mask in variants:
            ids, mask = torch.tensor(ids), torch.tensor(mask)
            outputs.append(head(model(ids, attention_mask=mask).last_hidden_state, mask))
    for out in outputs[1:]:
        assert (out - outputs[0]).abs().max().item() <= 1e-5


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask, 3, 4).tolist() == [1, 3, 3]


def test_cloze_logits_equal_full_lm_logits(tiny_ckpt):  # the real vocabulary: "yes" and "no" are in it
    model = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0]).eval()
    ids = torch.randint(0, VOCAB, (3, 9))
    with torch.no_grad():
        out = model(ids)
        two = ClozeParaphraseHead(model.lm_head)(out.last_hidden_state, None)
    assert (two - out.logits[:, -1, [NO_ID, YES_ID]]).abs().max().item() <= 1e-5


def test_metrics_hand_checked():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 0, 2]
    assert accuracy(gold, pred) == pytest.approx(4 / 6)
    # F1: class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class never predicted and never gold is left out; one in gold but never predicted counts 0
    assert macro_f1([0, 0], [0, 0], labels=range(5)) == 1.0
    assert macro_f1([0, 1], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError):
        accuracy([], [])


def test_chrf_equals_sacrebleu_command_line(tmp_path):
    from task_data.sonnets import load_sonnets
    from tests.conftest import DATA_DIR

    gold = [body for _, body in load_sonnets("dev_gold", DATA_DIR)]
    prompts = [body for _, body in load_sonnets("dev_prompts", DATA_DIR)]
    hypotheses = [p + "\n" + p for p in prompts]  # something imperfect
    (tmp_path / "ref.txt").write_text("".join(g.replace("\n", " ") + "\n" for g in gold))
    (tmp_path / "hyp.txt").write_text("".join(h.replace("\n", " ") + "\n" for h in hypotheses))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacrebleu",
            str(tmp_path / "ref.txt"),
            "-i",
            str(tmp_path / "hyp.txt"),
            "-m",
            "chrf",
            "-b",
            "-w",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    ours = chrf(hypotheses, gold)
    assert abs(ours - float(cli.stdout.strip())) <= 1e-5
    assert 10 < ours < 90
