"""Every peft option a user can pass, against peft itself (tests/peft_matrix.py says how): each case is
built the same as by `peft.get_peft_model` on stock HF GPT-2 (logits, trainable set, one step, export,
merge), or refused before anything is built with the reason checked here."""

from __future__ import annotations

import pytest

from modules.peft_methods import LINEAR_ONLY, STOCK_GPT2
from tests import peft_matrix
from tests.conftest import make_hf_checkpoint

# poly routes by task (test_peft_methods.py::test_poly_routes_each_task_as_peft_does)
METHODS = sorted(m for m in STOCK_GPT2 + LINEAR_ONLY if m != "poly")
CASES = peft_matrix.cases(METHODS)

# The refusals, each with the reason a user reads (what peft would say, or why this model differs).
BIAS = "peft then also trains base biases, while this model trains, saves and exports only the tensors a method adds"
LN_COPY = "LN tuning trains a full copy of each module it targets"
TIED_TOKENS = "on HF GPT-2 peft also gives the tied LM head the trained rows"
NO_GPT2_DEFAULT = "has no default targets for GPT-2 (peft says: Please specify `target_modules`"


def expected_refusal(method: str, label: str, fields: dict) -> str | None:
    if label.startswith("bias="):
        return BIAS
    if method == "ln_tuning" and label in ("targets list", "targets regex", "all-linear"):
        return LN_COPY
    if "trainable_token_indices" in fields:
        return TIED_TOKENS
    if method == "beft" and fields.get("target_modules") is None and label != "all-linear":
        return NO_GPT2_DEFAULT  # peft refuses the same config (the outcome says "peft refuses")
    return None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_matrix")
    make_hf_checkpoint(root / "small", n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=peft_matrix.VOCAB)
    make_hf_checkpoint(root / "wide", n_layer=2, n_head=4, n_embd=256, n_positions=64, vocab_size=peft_matrix.VOCAB)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method,label,fields", CASES, ids=[f"{m}-{label}" for m, label, _ in CASES])
def test_each_option_builds_what_peft_builds_or_is_refused_with_its_reason(checkpoints, method, label, fields):
    path = checkpoints / ("wide" if method in peft_matrix.WIDE else "small")
    outcome = peft_matrix.compare(path, method, fields)
    reason = expected_refusal(method, label, fields)
    if reason is None:
        assert outcome.status == "match", str(outcome)
    else:
        assert outcome.status in ("refused", "peft refuses") and reason in outcome.detail, str(outcome)


def test_the_matrix_covers_every_option_class():
    labels = {label for _, label, _ in CASES}
    expected = {"default", "targets null", "targets list", "targets regex", "all-linear", "layers_to_transform"}
    expected |= {"bias=all", "bias=lora_only", "modules_to_save", "targets wte", "targets lm_head"}
    expected |= {"trainable_token_indices list", "trainable_token_indices dict", "init_lora_weights=False"}
    assert expected <= labels, expected - labels
    assert {m for m, _, _ in CASES} == set(METHODS)
    assert len(CASES) >= 250


def test_records_written_before_targets_were_resolved_keep_their_targets():
    """A run recorded with left-out targets was built on c_attn, c_proj and c_fc (IA3, LN tuning: their own
    lists); evaluate and transfer rebuild it so. A record with resolved targets is read as it is."""
    from modules.peft_methods import legacy_peft_fields

    assert legacy_peft_fields({"peft_method": "lora", "peft_config": None})["peft_config"] == {
        "target_modules": ["c_attn", "c_proj", "c_fc"]
    }
    assert legacy_peft_fields({"peft_method": "ln_tuning"})["peft_config"] == {"target_modules": ["ln_1", "ln_2"]}
    new = {"peft_method": "lora", "peft_config": {"target_modules": ["c_attn"], "r": 4}}
    assert legacy_peft_fields(new) == new
    assert legacy_peft_fields({"peft_method": None}) == {"peft_method": None}


def test_merging_a_modules_to_save_copy_of_a_tied_matrix_is_refused(checkpoints):
    from model import GPT2LMHeadModel
    from model.adapters import merge_adapters

    for module in ("wte", "lm_head"):
        model = GPT2LMHeadModel.from_pretrained(
            checkpoints / "small", peft_method="lora", peft_config={"modules_to_save": [module]}
        )
        with pytest.raises(ValueError, match="cannot merge exactly: .* shared with the other end"):
            merge_adapters(model)


def test_ln_tuning_patterns_are_judged_by_the_modules_they_name():
    from model.config import GPT2Config

    GPT2Config.from_preset("tiny", peft_method="ln_tuning", peft_config={"target_modules": r".*ln_.*"})
    with pytest.raises(ValueError, match="LN tuning trains a full copy"):
        GPT2Config.from_preset("tiny", peft_method="ln_tuning", peft_config={"target_modules": r".*(ln_1|c_attn)"})
