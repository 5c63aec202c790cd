"""A configuration matrix for the peft methods, each case compared with `peft.get_peft_model` on stock HF
GPT-2 (or HF GPT-2 with nn.Linear projections, for the methods whose layers take nn.Linear only).

The reference is built from the *user's* fields alone, as a peft user would write them: peft resolves
its own defaults (targets from its per-architecture mapping, `all-linear`) on the HF model, so a
difference in how we resolve them shows up. The same adapter tensors are copied by name into both.
Five comparisons per case (`compare`):
  1. logits;                                    4. export_peft -> PeftModel.from_pretrained(stock HF);
  2. the trainable set and its size;            5. merge_adapters against merge_and_unload.
  3. which parameters one SGD step changes, and the logits after it;
A case ends as "match", "diverges: <what>", "refused: <our message>" or "peft refuses: <its message>".
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from model import GPT2LMHeadModel
from model.adapters import merge_adapters
from model.trainable import set_trainable
from modules.peft_methods import ADAPTER_NAME, LINEAR_ONLY, METHODS, STOCK_GPT2

ATOL = 1e-5
VOCAB = 100
# Fields a method cannot do without on the test vocabulary and size, given to ours and to peft alike.
NEEDS = {
    "trainable_tokens": {"token_indices": [3, 17, 42]},
    "adalora": {"total_step": 100},
    "poly": {"n_tasks": 1},
}
WIDE = ("c3a", "vblora")  # their default block size / vector length (256) must divide the widths


def config_class(method: str):
    return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(method.upper())]


def init_field(method: str) -> tuple[str, Any] | None:
    """The method's non-identity init, where it has a boolean one (`init_lora_weights=False` style)."""
    fields = config_class(method).__dataclass_fields__
    for name in ("init_lora_weights", "init_ia3_weights", "init_weights"):
        if name in fields and fields[name].default is True:
            return name, False
    return None


def cases(methods: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, label, user fields): the options peft documents for every tuner with targets."""
    out = []
    for method in methods:
        fields = config_class(method).__dataclass_fields__
        base = dict(NEEDS.get(method, {}))
        out.append((method, "default", base))
        if "target_modules" not in fields or method == "trainable_tokens":
            continue
        out.append((method, "targets null", {**base, "target_modules": None}))
        out.append((method, "targets list", {**base, "target_modules": ["c_fc", "mlp.c_proj"]}))
        out.append((method, "targets regex", {**base, "target_modules": r".*\.attn\.c_attn"}))
        out.append((method, "all-linear", {**base, "target_modules": "all-linear"}))
        if "layers_to_transform" in fields:
            picked = {**base, "target_modules": ["c_attn"], "layers_to_transform": [1]}
            out.append((method, "layers_to_transform", picked))
        if "bias" in fields:
            for mode in ("all", "lora_only") if method in ("lora", "adalora") else ("all",):
                out.append((method, f"bias={mode}", {**base, "bias": mode}))
        if "modules_to_save" in fields:
            out.append((method, "modules_to_save", {**base, "modules_to_save": ["ln_f"]}))
        if (init := init_field(method)) is not None:
            out.append((method, f"{init[0]}=False", {**base, init[0]: init[1]}))
    lora = dict(NEEDS.get("lora", {}))
    out += [
        ("lora", "targets wte", {**lora, "target_modules": ["wte"]}),
        ("lora", "targets lm_head", {**lora, "target_modules": ["lm_head"]}),
        ("lora", "trainable_token_indices list", {**lora, "trainable_token_indices": [3, 17]}),
        ("lora", "trainable_token_indices dict", {**lora, "trainable_token_indices": {"wte": [3, 17]}}),
    ]
    return out


def linear_hf_gpt2(path) -> transformers.GPT2LMHeadModel:
    """HF GPT-2 with each Conv1D replaced by the equal nn.Linear (for peft layers that take Linear only)."""
    from transformers.pytorch_utils import Conv1D

    hf = transformers.GPT2LMHeadModel.from_pretrained(path)
    for name, module in list(hf.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(*module.weight.shape)
            linear.weight.data, linear.bias.data = module.weight.data.t().contiguous(), module.bias.data
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent), child, linear)
    return hf


@dataclass
class Outcome:
    status: str  # "match", "diverges", "refused", "peft refuses"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def _theirs(name: str) -> str:
    return "base_model.model." + ".".join("default" if p == ADAPTER_NAME else p for p in name.split("."))


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def compare(path: Path, method: str, fields: dict[str, Any]) -> Outcome:
    stock = method in STOCK_GPT2
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    user = copy.deepcopy(fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hf = transformers.GPT2LMHeadModel.from_pretrained(path) if stock else linear_hf_gpt2(path)
            values = dict(user)
            if stock and "fan_in_fan_out" in config_class(method).__dataclass_fields__:
                values["fan_in_fan_out"] = True
            reference = peft.get_peft_model(hf, config_class(method)(**values)).eval()
        except Exception as error:  # noqa: BLE001 - peft's own refusal is an outcome
            theirs_refusal = f"{type(error).__name__}: {str(error)[:200]}"
            try:
                GPT2LMHeadModel.from_pretrained(path, peft_method=method, peft_config=user)
            except ValueError as ours_refusal:
                return Outcome("peft refuses", f"{theirs_refusal} | ours: {str(ours_refusal)[:200]}")
            return Outcome("diverges", f"accepted a config peft refuses ({theirs_refusal})")
        try:
            torch.manual_seed(0)
            ours = GPT2LMHeadModel.from_pretrained(
                path, peft_method=method, peft_config=user, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
            ).eval()
        except ValueError as error:
            return Outcome("refused", str(error))
    problems = []
    # copy our adapter tensors (moved off init) into peft's, by name
    gen = torch.Generator().manual_seed(1)
    theirs = reference.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name in ours.adapter_params:
                noise = 0.05 * torch.randn(param.shape, generator=gen)
                # TinyLoRA's init_weights=False leaves its vector uninitialised (torch.empty, in peft too):
                # memory garbage (inf, 1e30) would make the step comparison a matter of luck
                if not torch.isfinite(param).all() or param.abs().max() > 1e3:
                    param.copy_(noise)
                else:
                    param.add_(noise)
        for name, tensor in ours.state_dict().items():
            if ADAPTER_NAME in name.split("."):
                key = _theirs(name)
                if key not in theirs or theirs[key].shape != tensor.shape:
                    problems.append(f"no peft tensor {key}")
                    continue
                theirs[key].copy_(tensor)
    if problems:
        return Outcome("diverges", "names: " + "; ".join(problems[:3]))
    with torch.no_grad():
        gap = (ours(ids).logits - reference(input_ids=ids).logits).abs().max().item()
    if gap > ATOL:
        problems.append(f"logits {gap:.2g}")
    # 2. trainable set
    set_trainable(ours, "adapters")
    ours_trained = {_theirs(n) for n, p in ours.named_parameters() if p.requires_grad}
    peft_trained = {n for n, p in reference.named_parameters() if p.requires_grad}
    if ours_trained != peft_trained:
        extra, missing = sorted(ours_trained - peft_trained), sorted(peft_trained - ours_trained)
        problems.append(f"trainable: ours only {extra[:2]} ({len(extra)}), peft only {missing[:2]} ({len(missing)})")
    # 3. one SGD step on the same loss
    else:
        with torch.no_grad():
            before_step = ours(ids).logits
        changed = []
        for model in (ours, reference):
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            before = {n: p.detach().clone() for n, p in params}
            logits = model(ids).logits if model is ours else model(input_ids=ids).logits
            _loss(logits, ids).backward()
            with torch.no_grad():
                for _, p in params:
                    if p.grad is not None:
                        p.sub_(0.05 * p.grad)
                        p.grad = None
            moved = {n for n, p in params if (p.detach() - before[n]).abs().max() > 1e-7}  # float noise is not a move
            changed.append({_theirs(n) for n in moved} if model is ours else moved)
        if changed[0] != changed[1]:
            only_ours, only_peft = sorted(changed[0] - changed[1]), sorted(changed[1] - changed[0])
            problems.append(f"step moves ours only {only_ours[:2]}, peft only {only_peft[:2]}")
        with torch.no_grad():
            after_step = ours(ids).logits
            gap = (after_step - reference(input_ids=ids).logits).abs().max().item()
        # float32 rounding of the gradients (~1e-6 relative) grows with the step: allow 1e-4 of its effect
        if gap > ATOL + 1e-4 * (after_step - before_step).abs().max().item():
            problems.append(f"logits after a step {gap:.2g}")
    with torch.no_grad():
        logits = ours(ids).logits
    # 4. export to stock HF + peft
    if stock:
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ours.export_peft(folder)
                loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path), folder)
                with torch.no_grad():
                    gap = (loaded.eval()(input_ids=ids).logits - logits).abs().max().item()
                if gap > ATOL:
                    problems.append(f"export logits {gap:.2g}")
            except Exception as error:  # noqa: BLE001
                problems.append(f"export: {type(error).__name__}: {str(error)[:120]}")
    # 5. merge
    if not METHODS[method].not_mergeable:
        merged_ours = copy.deepcopy(ours)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                merge_adapters(merged_ours)
                merged_theirs = copy.deepcopy(reference).merge_and_unload()
                with torch.no_grad():
                    gap = (merged_ours(ids).logits - merged_theirs(input_ids=ids).logits).abs().max().item()
                    drift = (merged_ours(ids).logits - logits).abs().max().item()
                if gap > 1e-4:
                    problems.append(f"merged logits vs peft {gap:.2g}")
                if drift > 1e-4:
                    problems.append(f"merged logits vs unmerged {drift:.2g}")
            except ValueError as error:
                if "cannot merge" not in str(error):
                    problems.append(f"merge: {str(error)[:120]}")
            except Exception as error:  # noqa: BLE001
                problems.append(f"merge: {type(error).__name__}: {str(error)[:120]}")
    return Outcome("diverges", "; ".join(problems)) if problems else Outcome("match")


def main() -> None:
    """`python -m tests.peft_matrix`: every case's outcome and the tally (what the closing notes quote)."""
    import collections

    from tests.conftest import make_hf_checkpoint

    methods = sorted(m for m in STOCK_GPT2 + LINEAR_ONLY if m != "poly")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_hf_checkpoint(root / "small", n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB)
        make_hf_checkpoint(root / "wide", n_layer=2, n_head=4, n_embd=256, n_positions=64, vocab_size=VOCAB)
        tally: collections.Counter[str] = collections.Counter()
        for method, label, fields in cases(methods):
            outcome = compare(root / ("wide" if method in WIDE else "small"), method, fields)
            tally[outcome.status] += 1
            print(f"{method:16} {label:30} {outcome}"[:300], flush=True)
    print(f"{sum(tally.values())} cases: " + ", ".join(f"{n} {status}" for status, n in tally.most_common()))


if __name__ == "__main__":
    main()
