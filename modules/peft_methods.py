"""Any peft tuner by name: `GPT2Config.peft_method="ia3"` (+ `peft_config={...}`, that method's fields).

    y = adapter_m(W, b, x)      one peft tuner m on the targeted linears (its own equation: IA3
                                scales activations, VeRA y = Wx + Λ_b B Λ_d A x with frozen random A/B,
                                OFT y = (R W) x with R orthogonal, LoHa ΔW = (B₁A₁) ⊙ (B₂A₂), ...)

Identity at init: where the method defines it (peft initialises the update to zero or R = I), the
adapted model equals the base exactly; a method's record (`METHODS`) says where its peft default
initialisation is not the identity, and why. Each method runs through peft's own tuner
class (`PEFT_TYPE_TO_TUNER_MAPPING`), which also builds the shared state of VeRA-like methods.

Targets default to GPT-2's attention and MLP linears, named as in HF GPT-2 (`c_attn`, `c_proj`,
`c_fc`), so an adapter exported with `export_peft` loads into stock HF GPT-2 for the methods whose
peft layer accepts HF's Conv1D (`fan_in_fan_out`). The others (`LINEAR_ONLY`) run here (our
projections are `nn.Linear`) and equal HF GPT-2 with its Conv1D layers as `nn.Linear`, but peft
cannot put them on stock GPT-2, so they are not exported in peft's format.

Parameter namespace: peft's adapter name `peft` (`ia3_l.peft`, `vera_lambda_b.peft`, ...), distinct
from the LoRA variant's `default`. Methods peft offers but that do not fit this model are refused
with the reason (`REFUSED`); `python scripts/peft_methods.py` prints both lists.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modules.lora_linear import use_fused_lora
from modules.prompt_learning import METHODS as PROMPT_LEARNING_METHODS
from modules.prompt_learning import (
    attach_virtual_tokens,
    check_virtual_tokens,
    derived_fields,
    export_state,
    num_virtual_tokens,
)
from modules.variant import (
    ForwardChangeHost,
    JSONObject,
    LrPrior,
    PeftMethod,
    Settings,
    Variant,
    knob,
    no_weight_init,
    register,
)
from modules.xlora import METHOD as XLORA
from modules.xlora import attach_xlora, resolve_experts

ADAPTER_NAME = "peft"
TASK_COUNT = 4  # the tasks train/tasks registers; a test checks it (this layer does not import train/)
ADALORA_PLACEHOLDER_STEPS = 10**9
ALLOCATOR = "peft_rank_allocator"  # the model's __dict__ entry holding AdaLoRA's RankAllocator
CONV1D_TARGETS = ("c_attn", "c_proj", "c_fc")
# What peft's `target_modules="all-linear"` resolves to on stock HF GPT-2, block by block: every
# Linear/Conv1D module except the output layer (peft drops `get_output_embeddings()`, the tied lm_head).
ALL_LINEAR = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# peft fills these from its per-architecture mappings when they are left out (`_prepare_adapter_config`).
MAPPED_FIELDS = ("target_modules", "feedforward_modules")

# Every supported method, one record each (modules/variant.py, PeftMethod). Learning-rate ranges: from peft's
# own method comparison (huggingface/peft method_comparison/MetaMathQA, Llama-3.2-3B: every method runs at its
# default_training_params.json's 1e-4 unless its experiment's training_params.json overrides it) and papers.
# Defaults peft has none for: AdaLoRA's schedule needs the run's step count, known only when training starts
# (a placeholder, replaced at the first step: adalora_after_step); poly gets one routing row per task this
# code knows (TASK_COUNT), so a task's id is the same in every run (model.for_task); trainable tokens adapt rows
# of the token embedding, which the tied LM head follows. Required fields, as the presets give them: trainable
# tokens, the paraphrase cloze head's answer tokens " no" and " yes"; BEFT (no GPT-2 targets in peft), c_attn.
_MC = "peft's method comparison (method_comparison/MetaMathQA)"
_DEFAULT_ONLY = f"{_MC} runs it at the suite's default 1e-4 and sets no rate of its own; LoRA's decade above"
METHODS: dict[str, PeftMethod] = {
    method.name: method
    for method in (
        PeftMethod(
            "adalora",
            "stock",
            LrPrior(1e-4, 1e-3, _DEFAULT_ONLY),
            defaults={"total_step": ADALORA_PLACEHOLDER_STEPS},
            quantized_base=True,
        ),
        PeftMethod("adamss", "linear", LrPrior(1e-4, 1e-3, f"{_MC}: experiments/adamss/llama-3.2-3B-rank32 sets 1e-4")),
        PeftMethod(
            "beft",
            "linear",
            LrPrior(1e-4, 3e-3, f"{_MC}: 1e-4 (v_proj only, below LoRA-like methods); searched up to 3e-3"),
            required={"target_modules": ["c_attn"]},
        ),
        PeftMethod("boft", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod(
            "c3a",
            "linear",
            LrPrior(3e-2, 3e-1, f"{_MC}: experiments/c3a/llama-3.2-3B-default trains at 3e-1"),
            not_identity_at_init=(
                "peft's default init draws the circulant kernels at random (init_weights='xavier_uniform')"
            ),
        ),
        PeftMethod("deft", "stock", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod(
            "delora", "linear", LrPrior(3e-4, 3e-3, f"{_MC}: results/delora--llama-3.2-3B-rank32 trained at 1e-3")
        ),
        PeftMethod(
            "fourierft",
            "stock",
            LrPrior(
                1e-2,
                3e-1,
                "FourierFT (Gao et al., 2024) trains its spectral coefficients at 2e-1..3e-1 (the authors' ViT "
                f"scripts); {_MC} at 1e-4 fails (GSM8K 0.001)",
            ),
            not_identity_at_init="peft's default init_weights=False draws a random spectrum",
        ),
        PeftMethod(
            "frod", "stock", LrPrior(1e-4, 1e-3, f"{_MC}: 1e-4 by default, a 1e-3 experiment (sparse0.02-lr_0.001)")
        ),
        PeftMethod(
            "glora",
            "linear",
            LrPrior(1e-4, 1e-3, f"{_MC}: 1e-4 by default, 5e-4 in experiments/glora/llama-3.2-3B-vector-paths"),
        ),
        PeftMethod(
            "gralora", "stock", LrPrior(1e-4, 1e-3, f"{_MC}: experiments/gralora/llama-3.2-3B-rank32 sets 2e-4")
        ),
        PeftMethod(
            "hira",
            "stock",
            LrPrior(1e-3, 1e-2, f"{_MC}: experiments/hira/llama-3.2-3B-rank32-lr4.5e-3 sets 4.5e-3"),
            quantized_base=True,
        ),
        PeftMethod("hra", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod(
            "ia3",
            "stock",
            LrPrior(
                1e-3,
                1e-2,
                f"{_MC}: experiments/ia3/llama-3.2-3B-all-attn-5k-lr0.005 sets 5e-3 (the default 1e-4 trails LoRA); "
                "T-Few (Liu et al., 2022) trains IA3 at 3e-3",
            ),
            quantized_base=True,
        ),
        PeftMethod(
            "lily",
            "linear",
            LrPrior(1e-4, 1e-3, _DEFAULT_ONLY),
            not_mergeable="peft 0.21.2 has no merge for Lily's shared routers",
        ),
        PeftMethod(
            "ln_tuning",
            "stock",
            LrPrior(3e-4, 1e-2, f"{_MC} at 1e-4 fails (GSM8K 0.0): layer-norm gains need more, like biases"),
        ),
        PeftMethod("loha", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod(
            "lokr",
            "linear",
            LrPrior(
                1e-4, 3e-3, f"{_MC}: 1e-4 (rank32) and 3e-3 (experiments/lokr/llama-3.2-3B-rank32-factor4-lr0.003)"
            ),
        ),
        PeftMethod(
            "lora",
            "stock",
            LrPrior(1e-4, 1e-3, f"{_MC}: experiments/lora/llama-3.2-3B-rank32 sets 1e-4; LoRA on GPT-2 used 2e-4"),
            quantized_base=True,
        ),
        PeftMethod("miss", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod("oft", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod("peanut", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod(
            "poly",
            "linear",
            LrPrior(1e-4, 1e-3, "not in peft's method comparison: its skills are LoRAs, so LoRA's range"),
            defaults={"n_tasks": TASK_COUNT},
            not_mergeable=(
                "its update depends on the task (a router mixes the LoRA skills per task): no one weight holds it"
            ),
            host_values=True,
        ),
        PeftMethod("psoft", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod(
            "pvera",
            "stock",
            LrPrior(1e-3, 1e-2, f"{_MC}: experiments/pvera/llama-3.2-3B-default sets 3e-3"),
            quantized_base=True,
        ),
        PeftMethod("randlora", "stock", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY), quantized_base=True),
        PeftMethod(
            "road",
            "linear",
            LrPrior(3e-4, 3e-3, f"{_MC}: experiments/road/llama-3.2-3B-lr_0.001 sets 1e-3"),
            quantized_base=True,
        ),
        PeftMethod(
            "shira",
            "linear",
            LrPrior(1e-4, 1e-3, f"{_MC}: experiments/shira/llama-3.2-3B-lr_0.0003-random_seed_42 sets 3e-4"),
        ),
        PeftMethod("supertuning", "linear", LrPrior(1e-4, 1e-3, _DEFAULT_ONLY)),
        PeftMethod(
            "tinylora",
            "stock",
            LrPrior(1e-3, 3e-2, f"{_MC}: results/tinylora--llama-3.2-3B-default trained at 1e-3 and failed"),
        ),
        PeftMethod(
            "trainable_tokens",
            "stock",
            LrPrior(
                1e-2, 2e-1, f"{_MC}: experiments/trainable_tokens/llama-3.2-3B-sos+eos sets 0.2 (embedding rows only)"
            ),
            defaults={"target_modules": ["wte"]},
            required={"token_indices": [3919, 8505]},
            host_values=True,
        ),
        PeftMethod(
            "unilora",
            "stock",
            LrPrior(
                1e-3,
                1e-2,
                f"{_MC}: 2e-3 in experiments/unilora/llama-3.2-3B-r4-td131072-lr0.002 (1e-4 fails, GSM8K 0.002)",
            ),
            not_identity_at_init="its shared vector is drawn at random",
        ),
        PeftMethod(
            "vblora",
            "stock",
            LrPrior(1e-4, 1e-3, f"{_MC}: 1e-4 by default, 5e-4 in experiments/vblora/llama-3.2-3B-bank1024-lr5e4"),
            not_identity_at_init="the logits that pick vectors from the bank are random, so the update is not zero",
        ),
        PeftMethod(
            "vera",
            "stock",
            LrPrior(
                1e-3,
                1e-2,
                f"{_MC}: results/vera--llama-3.2-3B-default trained at 1e-3; VeRA (Kopiczko et al., 2024) trains "
                "higher",
            ),
        ),
        PeftMethod(
            "waveft",
            "stock",
            LrPrior(1e-4, 3e-3, f"{_MC}: 1e-4 (n_frequency 5000, below LoRA-like methods); searched up to 3e-3"),
        ),
        *PROMPT_LEARNING_METHODS,  # modules/prompt_learning.py: virtual tokens through peft's encoders
        XLORA,  # modules/xlora.py: our classifier and layers, following peft's XLoraModel (HF models only)
    )
}


def methods_running_as(kind: str) -> tuple[str, ...]:
    """The supported methods of one kind (PeftMethod.runs_as), by name."""
    return tuple(sorted(name for name, method in METHODS.items() if method.runs_as == kind))


SUPPORTED = tuple(sorted(METHODS))
STOCK_GPT2, LINEAR_ONLY = methods_running_as("stock"), methods_running_as("linear")
PROMPT_LEARNING, EXPERT_MIXTURES = methods_running_as("prompt"), methods_running_as("experts")
# The methods a config alone defines (X-LoRA also needs finished LoRA runs as its experts): what a grid
# row or a cost-table row at peft's defaults can run.
STANDALONE = tuple(m for m in SUPPORTED if m not in EXPERT_MIXTURES)

REFUSED = {
    "adaption_prompt": (
        "LLaMA-Adapter wraps HF's own GPT2Attention module (its forward and weight layout) with gated "
        "prompts; this model's attention is its own module, so peft cannot wrap it"
    ),
    "cartridge": (
        "a prefix whose keys/values are initialised from a corpus' KV cache by a separate distillation "
        "step, which the runs do not have; plain prefix_tuning is supported"
    ),
    "cpt": (
        "context-aware prompt tuning needs per-token input type masks (input_type_mask) and its own loss, "
        "which the tasks' batches do not carry"
    ),
    "multitask_prompt_tuning": (
        "routes each batch by task_ids through a shared prompt decomposition, which the training loop does not pass"
    ),
    "osf": (
        "its SVD tensors are named differently on this model and on stock HF GPT-2 + peft (24 of them "
        "unmatched on a 2-block model), so its parity cannot be checked"
    ),
    "shadow": "rewrites the model config to add layers, which GPT2Config (immutable, validated) does not allow",
}

# peft config fields that describe a saved adapter, not the method; they are not ours to set.
BOOKKEEPING = {
    *("peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "task_type"),
    "peft_version",
}


def method_status(name: str) -> str:
    """'stock', 'linear', 'prompt', 'experts' (its record's runs_as), or the reason it is refused
    (ValueError for a name peft does not have)."""
    if name in METHODS:
        return METHODS[name].runs_as
    if name in REFUSED:
        return REFUSED[name]
    raise ValueError(f"peft has no method {name!r} (known: {', '.join(sorted([*SUPPORTED, *REFUSED]))})")


@dataclass(frozen=True)
class PeftSettings(Settings):
    peft_method: str | None = knob(
        None, "any supported peft tuner by name (ia3, vera, loha, oft, ...; see the README's list)", switch=True
    )
    peft_config: JSONObject | None = knob(
        None,
        "that method's peft config fields (CLI: a peft adapter_config.json; its peft_type sets the method)",
        cli="json_file",
    )
    peft_init_batches: int = knob(
        8,
        "training batches a data-driven init reads (EVA: init_lora_weights='eva'), drawn with the run's seed",
        low=1,
    )

    def validate(self) -> None:
        if self.peft_method is None:
            return
        status = method_status(self.peft_method)
        if status not in ("stock", "linear", "prompt", "experts"):
            raise ValueError(f"peft method {self.peft_method!r} is not supported on this model: {status}")
        if uses_eva(self) and float(((self.peft_config or {}).get("eva_config") or {}).get("rho", 1.0)) != 1.0:
            raise ValueError(
                "peft lora with EVA and eva_config.rho != 1: rank redistribution gives each layer a rank that "
                "depends on the data, while resume and evaluate rebuild the adapters at rank r; use rho 1 (the "
                "default here: every layer keeps rank r, its A the top-r directions of its inputs)"
            )
        if self.peft_method == "adamss" and (self.peft_config or {}).get("use_asa"):
            raise ValueError(
                "peft adamss with use_asa: its adaptive subspace allocation needs AdamssModel.update_and_allocate "
                "after every step, which is not wired to the step hook yet (AdaLoRA's is); train with use_asa off"
            )
        saved_type = (self.peft_config or {}).get("peft_type")
        if saved_type is not None and str(saved_type).lower() != self.peft_method:
            raise ValueError(f"peft_config is a {saved_type} config but peft_method is {self.peft_method!r}")
        if self.peft_config is not None or self.peft_method in STOCK_GPT2 + LINEAR_ONLY:
            # the method's fields only (they alone set the run's identity), with the targets peft would
            # fill in written out, so config.json and the identity say what is built
            fields = {k: v for k, v in (self.peft_config or {}).items() if k not in BOOKKEEPING}
            fields = resolve_peft_defaults(self.peft_method, fields)
            object.__setattr__(self, "peft_config", JSONObject(fields) if fields else None)
        if self.peft_method == "xlora":  # each expert: its folder and the digest of what it computes
            fields = dict(self.peft_config or {})
            fields["adapters"] = resolve_experts(fields.get("adapters"))
            object.__setattr__(self, "peft_config", JSONObject(fields))

    @classmethod
    def identity_value(cls, name: str, value: Any) -> Any:
        """X-LoRA's experts count by their digest, not by the folder they were read from."""
        if name == "peft_config" and value and isinstance(value.get("adapters"), dict):
            adapters = {k: v["sha256"] if isinstance(v, dict) else v for k, v in value["adapters"].items()}
            return {**value, "adapters": adapters}
        return value


def resolve_peft_defaults(method: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with what peft itself fills in on stock HF GPT-2 written out: left-out or null targets
    (and IA3's feed-forward modules) from the method's own mapping for model_type "gpt2", and
    `"all-linear"` as every linear but the output layer. A method peft has no GPT-2 defaults for is
    refused as peft refuses it. Trainable tokens, prompt learning and X-LoRA have their own paths."""
    if method not in STOCK_GPT2 + LINEAR_ONLY or method == "trainable_tokens":
        return fields
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    known = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(method.upper())].__dataclass_fields__
    fields = dict(fields)
    for name in ("target_modules", "feedforward_modules", "modules_to_save"):
        value = fields.get(name)
        if not (value is None or isinstance(value, str) or _names(value)):
            raise ValueError(
                f"peft_config.{name} must be a module name pattern or a list of module names, not {json.dumps(value)}"
            )
    left_out = [name for name in MAPPED_FIELDS if name in known and fields.get(name) is None]
    if not left_out or fields.get("target_parameters"):
        return fields
    tuner_class = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(method.upper()).value]
    # peft's own filling-in, run on a stand-in config holding only the fields it reads
    probe = types.SimpleNamespace(**{name: fields.get(name) for name in (*MAPPED_FIELDS, "target_parameters")})
    prepare = inspect.getattr_static(tuner_class, "_prepare_adapter_config")
    try:
        if isinstance(prepare, staticmethod):
            prepare.__func__(probe, {"model_type": "gpt2"})
        else:  # an instance method that reads only class attributes (its target mapping)
            prepare(tuner_class, probe, {"model_type": "gpt2"})
    except ValueError as error:
        raise ValueError(
            f"peft {method} has no default targets for GPT-2 (peft says: {error}); set peft_config.target_modules"
        ) from None
    for name in left_out:
        value = getattr(probe, name)
        fields[name] = value if isinstance(value, str) else sorted(value)
    return fields


# What a left-out `target_modules` meant before it followed peft's mapping (records written then carry
# no resolved targets): they are read with the targets those runs were built with.
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "ia3": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    "ln_tuning": {"target_modules": ["ln_1", "ln_2"]},
}


def legacy_peft_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A run record's config with the targets its peft method was built with, for records written before
    left-out targets were resolved (and written out) as peft resolves them: then they meant c_attn,
    c_proj and c_fc (IA3 and LN tuning: their own lists)."""
    method = saved.get("peft_method")
    fields = dict(saved.get("peft_config") or {})
    if method not in STOCK_GPT2 + LINEAR_ONLY or method == "trainable_tokens" or "target_modules" in fields:
        return saved
    return {**saved, "peft_config": {**LEGACY_DEFAULTS.get(method, {"target_modules": list(CONV1D_TARGETS)}), **fields}}


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def peft_config_for(config: Any, fan_in_fan_out: bool = False):
    """The peft config object for this model's method and fields. `fan_in_fan_out=True` is for stock
    HF GPT-2 (Conv1D); it is set only for methods that have the field."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(config.peft_method.upper())]
    fields = config_class.__dataclass_fields__
    values: dict[str, Any] = {}
    if config.peft_method in PROMPT_LEARNING:
        values.update(derived_fields(config), task_type="CAUSAL_LM")
    if config.peft_method == "xlora":
        values["hidden_size"] = config.n_embd
    values.update(METHODS[config.peft_method].defaults)
    user = {k: v for k, v in (config.peft_config or {}).items() if k not in BOOKKEEPING}
    unknown = sorted(set(user) - set(fields))
    if unknown:
        raise ValueError(f"peft_config: {config.peft_method} has no field(s) {unknown}")
    values.update(user)
    if config.peft_method == "lora" and values.get("init_lora_weights") == "eva":
        from peft import EvaConfig

        values["eva_config"] = EvaConfig(**{"rho": 1.0, **(values.get("eva_config") or {})})
    if "encoder_hidden_size" in fields and values.get("encoder_hidden_size") is None:
        values["encoder_hidden_size"] = config.n_embd  # peft's default (_prepare_prompt_learning_config)
    if "fan_in_fan_out" in fields:
        values["fan_in_fan_out"] = fan_in_fan_out
    if "layers_to_transform" in fields and getattr(config, "n_layer", None) is not None:
        bad = [i for i in _as_list(values.get("layers_to_transform")) if not 0 <= i < config.n_layer]
        if bad:
            raise ValueError(
                f"peft_config.layers_to_transform {bad} are not blocks of this {config.n_layer}-block model"
            )
    peft_config = config_class(**values)
    targets = getattr(peft_config, "target_modules", None)
    if isinstance(targets, str) and targets.lower() == "all-linear" and getattr(config, "n_layer", None) is not None:
        # as peft's own expansion does it, after the config is built: the full names of every linear but
        # the output layer (the form matters: methods like Lily group their shared weights by it)
        peft_config.target_modules = {f"transformer.h.{i}.{name}" for i in range(config.n_layer) for name in ALL_LINEAR}
    return peft_config


def _as_list(value: Any) -> list:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def check_peft(config: Any) -> None:
    if config.use_lora or config.use_kan:  # (KoRA adds its own adapters beside attention: it composes)
        others = [f"use_{n}" for n in ("lora", "kan") if getattr(config, f"use_{n}")]
        raise ValueError(
            f"peft_method with {', '.join(others)}: both would adapt the same linears; use one of them "
            "(peft_method='lora' is peft's LoRA, as use_lora)"
        )
    try:  # unknown fields and bad layer indices, before any weight loads; peft's own type checks
        peft_config = peft_config_for(config)
    except (TypeError, KeyError, AttributeError, IndexError) as error:  # a field of the wrong type
        raise ValueError(f"peft {config.peft_method}: peft_config is not a valid config ({error})") from None
    if config.peft_method == "xlora":
        check_xlora(config, peft_config)
        return
    if config.peft_method in PROMPT_LEARNING:
        check_virtual_tokens(config, peft_config)
        return
    if config.peft_method == "trainable_tokens":
        check_trainable_tokens(config, peft_config)
        return
    if getattr(peft_config, "trainable_token_indices", None):
        raise ValueError(
            f"peft {config.peft_method} with trainable_token_indices: on HF GPT-2 peft also gives the tied LM head "
            "the trained rows (through HF's tied-weight metadata, which this model does not expose), so here the "
            "LM head would keep the old rows; train token rows with peft_method='trainable_tokens' (tied, supported)"
        )
    if config.peft_method == "ln_tuning":
        targets = peft_config.target_modules
        if isinstance(targets, str):  # a pattern: the GPT-2 modules it names
            modules = [n for n, _ in _skeleton(config, config.n_layer).named_modules() if n]
            names = [n for n in modules if re.fullmatch(targets, n)]
        else:
            names = sorted(targets or ())
        if any(not (name.rpartition(".")[2].startswith("ln_")) for name in names):
            asked = (config.peft_config or {}).get("target_modules")
            raise ValueError(
                f"peft ln_tuning with target_modules={asked!r}: LN tuning trains a full copy of each module it "
                "targets; for a projection that copy is an nn.Linear here and a transposed Conv1D on stock GPT-2, so "
                "it could not be exported or compared; target LayerNorms only (ln_1, ln_2, ln_f)"
            )
    bias = getattr(peft_config, "bias", "none")
    if bias not in ("none", False, None):
        raise ValueError(
            f"peft {config.peft_method} with bias={bias!r}: peft then also trains base biases, while this model "
            "trains, saves and exports only the tensors a method adds (its adapter files hold no base weights), "
            "so those biases would silently stay frozen; use bias='none'"
        )
    if config.peft_method == "poly" and 1 < peft_config.n_tasks < TASK_COUNT:
        raise ValueError(
            f"peft poly with n_tasks={peft_config.n_tasks}: a task's route is its index among the {TASK_COUNT} "
            f"tasks (sst, cfimdb, quora, sonnet), so n_tasks is 1 (one route for all) or at least {TASK_COUNT}"
        )
    # peft checks sizes (block sizes, ranks, group sizes) when it builds a layer: build them on a
    # weightless skeleton of this model's linears, so a bad size is one error line, not a traceback.
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner_class = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(config.peft_method.upper()).value]
    # One block suffices for the sizes (they are per layer; block indices were checked above), unless
    # the method picks blocks by index, and it costs 1/n_layer of the whole (FourierFT draws its
    # spectrum indices per layer: seconds at gpt2 size).
    picks_blocks = any(getattr(peft_config, key, None) is not None for key in ("layers_to_transform", "layers_pattern"))
    # so do targets named by pattern or by their block ("transformer.h.3.attn.c_attn", all-linear's expansion)
    targets = getattr(peft_config, "target_modules", None)
    picks_blocks = picks_blocks or isinstance(targets, str) or any(any(c.isdigit() for c in t) for t in targets or ())
    depth = config.n_layer if picks_blocks else 1
    # Every GPT2Config built runs this check (a run builds several, a grid's plan several per run): the
    # verdict depends only on the method's config and the skeleton's shape, so it is computed once.
    key = json.dumps([peft_config.to_dict(), config.n_embd, config.n_inner, depth], sort_keys=True, default=repr)
    if key not in _SIZE_VERDICTS:
        _SIZE_VERDICTS[key] = _size_verdict(config, tuner_class, peft_config, depth)
    if _SIZE_VERDICTS[key] is not None:
        raise ValueError(f"peft {config.peft_method} on this {config.n_embd}-wide model: {_SIZE_VERDICTS[key]}")


_SIZE_VERDICTS: dict[str, str | None] = {}  # check_peft's skeleton builds: None, or peft's message


def _size_verdict(config: Any, tuner_class: type, peft_config: Any, depth: int) -> str | None:
    try:
        with warnings.catch_warnings(), no_weight_init():  # meta tensors: nothing to fill
            warnings.simplefilter("ignore")
            tuner_class(_skeleton(config, depth), peft_config, adapter_name=ADAPTER_NAME)
    except ValueError as error:  # peft's own message for a size that does not fit
        return str(error)
    except Exception:  # noqa: BLE001 - a method that reads weight values cannot run on meta; the real attach will
        pass
    return None


def check_xlora(config: Any, peft_config: Any) -> None:
    """The experts fit this model (modules, shapes, digests) and the options are peft's valid ones."""
    if peft_config.hidden_size != config.n_embd:
        raise ValueError(f"peft_config.hidden_size={peft_config.hidden_size}, but this model is {config.n_embd} wide")
    experts = len(peft_config.adapters)
    if peft_config.top_k_lora is not None and not 1 <= peft_config.top_k_lora <= experts:
        raise ValueError(f"peft_config.top_k_lora={peft_config.top_k_lora}: pick between 1 and the {experts} experts")
    if peft_config.enable_softmax_topk and peft_config.top_k_lora is None:
        raise ValueError("peft_config.enable_softmax_topk needs top_k_lora")
    if peft_config.softmax_temperature <= 0:
        raise ValueError(f"peft_config.softmax_temperature must be > 0, got {peft_config.softmax_temperature}")
    skeleton = _skeleton(config, config.n_layer)
    with torch.device("meta"):
        attach_xlora(skeleton, config, peft_config)


def _skeleton(config: Any, depth: int) -> nn.Module:
    """`depth` blocks of GPT-2 and its embeddings, LayerNorms and tied LM head, on the meta device,
    named as ours and HF's: every module a peft config can target on GPT-2, so a size check finds
    what the real attach finds (weightless: a gpt2-sized vocabulary costs nothing here)."""
    width, ffn = config.n_embd, config.n_inner or 4 * config.n_embd
    with torch.device("meta"):
        blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.ln_1, block.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            block.attn, block.mlp = nn.Module(), nn.Module()
            block.attn.c_attn, block.attn.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            block.mlp.c_fc, block.mlp.c_proj = nn.Linear(width, ffn), nn.Linear(ffn, width)
            blocks.append(block)
        skeleton = nn.Module()
        skeleton.transformer = ForwardChangeHost()  # X-LoRA's classifier attaches to it
        skeleton.transformer.wte = nn.Embedding(config.vocab_size, width)
        skeleton.transformer.wpe = nn.Embedding(config.n_positions, width)
        skeleton.transformer.h = blocks
        skeleton.transformer.ln_f = nn.LayerNorm(width)
        skeleton.lm_head = nn.Linear(width, config.vocab_size, bias=False)
        skeleton.lm_head.weight = skeleton.transformer.wte.weight
    return skeleton


def attach_peft(model: nn.Module, config: Any) -> None:
    if config.peft_method in PROMPT_LEARNING:
        attach_virtual_tokens(model, config, peft_config_for(config))
        return
    if config.peft_method == "trainable_tokens":
        attach_trainable_tokens(model, config)
        return
    if config.peft_method == "xlora":
        attach_xlora(model, config, peft_config_for(config))
    else:
        attach_tuner(model, config)
    frozen_new = [n for n, p in model.named_parameters() if ADAPTER_NAME in n.split(".") and not p.requires_grad]
    for name in frozen_new:  # peft keeps these fixed (e.g. random projections): buffers, never trained
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        tensor = getattr(owner, leaf).detach()
        delattr(owner, leaf)
        owner.register_buffer(leaf, tensor)


def attach_tuner(model: nn.Module, config: Any) -> None:
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner_class = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(config.peft_method.upper()).value]
    # peft's own tuner class (not inject_adapter_in_model): it also builds VeRA-like shared state,
    # which the layers keep references to; the tuner wrapper itself is not kept.
    tuner = tuner_class(model, peft_config_for(config), adapter_name=ADAPTER_NAME)
    if config.peft_method == "poly":
        route_poly_by_task(model)
    if config.peft_method == "lora":
        use_fused_lora(model)  # modules/lora_linear.py: peft's LoRA sum in one autograd function per linear
    if hasattr(tuner, "rankallocator"):  # AdaLoRA: its allocator runs after every optimizer step
        model.__dict__[ALLOCATOR] = tuner.rankallocator  # a plain attribute: not a module, not saved
    for _, layer in tuner_layers(model):
        if isinstance(layer.get_base_layer(), nn.Linear):  # projections (LN-tuning's LayerNorms stay float32)
            layer.register_forward_hook(_answer_in_run_precision)


def route_poly_by_task(model: nn.Module) -> None:
    """peft's Poly layers mix their LoRA skills with a router row per task: they need `task_ids` in
    every forward (PolyModel passes them through pre-hooks). Here the hooks read the task the model
    is running for (`model.task_index`, set by `model.for_task` around every training step and every
    evaluation); without one, the forward stops with an error rather than route every task to row 0."""
    from peft.tuners.poly.layer import PolyLayer

    def add_task_ids(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # n_tasks 1: one route shared by every task (nothing to choose)
        index = 0 if module.poly_router[ADAPTER_NAME].n_tasks == 1 else model.task_index
        if index is None:
            raise ValueError(
                "peft poly routes each batch by its task: run the model inside `with model.for_task(i):` "
                "(training and evaluation do; i is the task's index in train/tasks)"
            )
        batch = args[0].shape[0]
        return args, {**kwargs, "task_ids": torch.full((batch,), index, dtype=torch.long, device=args[0].device)}

    for layer in model.modules():
        if isinstance(layer, PolyLayer):
            layer.register_forward_pre_hook(add_task_ids, with_kwargs=True)


def attach_trainable_tokens(model: nn.Module, config: Any) -> None:
    """peft's TrainableTokensLayer on the token embedding (`wte`): the rows of `token_indices` become
    trained copies, the rest stay frozen. GPT-2 ties its LM head to `wte`, so the LM head gets a layer
    tied to the embedding's (peft does the same on HF GPT-2): both read the same trained rows, and the
    loss and the cloze head use the merged matrix (`lm_head_weight`)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    peft_config = peft_config_for(config)
    embedding = TrainableTokensLayer(model.transformer.wte, ADAPTER_NAME, config=peft_config)
    embedding.update_layer(ADAPTER_NAME, config=peft_config)
    model.transformer.wte = embedding
    model.lm_head = TrainableTokensLayer(model.lm_head, ADAPTER_NAME, config=peft_config, tied_adapter=embedding)


def check_trainable_tokens(config: Any, peft_config: Any) -> None:
    indices = list(peft_config.token_indices or [])
    if not indices:
        raise ValueError(
            "peft trainable_tokens needs peft_config.token_indices: the token ids whose embedding rows train "
            '(e.g. {"token_indices": [8505, 3919]} for " yes" and " no")'
        )
    bad = [i for i in indices if not (isinstance(i, int) and 0 <= i < config.vocab_size)]
    if bad:
        raise ValueError(
            f"peft_config.token_indices {bad[:5]} are not ids of this {config.vocab_size}-token vocabulary"
        )
    if len(set(indices)) != len(indices):
        raise ValueError("peft_config.token_indices repeats an id")


def _answer_in_run_precision(module: nn.Module, args: tuple, output: Any) -> Any:
    """Some peft layers (VeRA, LoHa) answer in float32 under bf16 autocast (their delta is computed
    from float32 factors); cast back, so attention, the MLP and the residual stream run in the run's
    precision for every method alike, and methods in one grid compare at one precision."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        kind = output.device.type
        if torch.is_autocast_enabled(kind) and output.dtype != torch.get_autocast_dtype(kind):
            return output.to(torch.get_autocast_dtype(kind))
    return output


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_peft(model: nn.Module) -> None:
    """Fold every tuner layer into its base layer (peft's merge) and put the base layer back; a
    `modules_to_save` copy replaces the module it trained (as peft's merge_and_unload does)."""
    from peft.utils.other import ModulesToSaveWrapper

    method = model.config.peft_method
    if METHODS[method].not_mergeable:
        raise ValueError(f"cannot merge exactly: peft {method}: {METHODS[method].not_mergeable}")
    layers = tuner_layers(model)
    # trainable tokens give the LM head a layer tied to the embedding's (the same rows at both ends), so
    # its merge writes one update that both ends already computed with
    tied = [] if method == "trainable_tokens" else _tied_targets(model, layers)
    if tied:
        raise ValueError(
            f"cannot merge exactly: peft {method} adapts {tied[0]}, whose weight is shared with the other end of "
            "GPT-2's tied embedding / LM head; a merge would write the update into both. Keep the adapter unmerged "
            "(save_adapters / export_peft)"
        )
    for name, module in layers:
        try:
            module.merge(safe_merge=True)
        except (NotImplementedError, TypeError, ValueError) as error:
            raise ValueError(f"{model.config.peft_method} cannot merge exactly ({name}): {error}") from error
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.modules_to_save[ADAPTER_NAME])


def _tied_targets(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
    """Adapted modules (tuner layers, and modules_to_save copies) whose base weight is also another
    module's (GPT-2's wte and lm_head)."""
    from peft.utils.other import ModulesToSaveWrapper

    owners: dict[int, int] = {}
    for module in model.modules():  # a weight registered on two modules (not a wrapper's view of one)
        weight = module._parameters.get("weight")
        if weight is not None:
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    bases = [(name, layer.get_base_layer()) for name, layer in layers]
    bases += [(n, m.original_module) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return [name for name, base in bases if owners.get(id(getattr(base, "weight", None)), 0) > 1]


def peft_state(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """The method's fixed tensors (random projections, shared banks, SVD factors): saved beside its
    parameters so a load reproduces the adapter exactly (peft shares some across layers; the file
    writer copies those)."""
    # by identity, not name: a parameter shared by every layer (VB-LoRA's vector bank) has one name in
    # named_parameters() but one per layer in state_dict()
    return {
        name: tensor.detach()
        for name, tensor in model.state_dict(keep_vars=True).items()
        if ADAPTER_NAME in name.split(".") and not isinstance(tensor, nn.Parameter)
    }


# ---------------------------------------------------------------- AdaLoRA's allocator and regulariser


def adalora_after_step(model: nn.Module, config: Any, step: int, total_steps: int) -> None:
    """peft's AdaLoraModel.update_and_allocate, with the schedule's total_step set from the run: score
    the triplets' importance from the gradients, prune the singular values (lora_E) to the budget every
    deltaT steps until total_step - tfinal, fix the rank pattern there, and keep it masked after."""
    allocator = model.__dict__.get(ALLOCATOR)
    if allocator is None:
        return
    settings = allocator.peft_config
    if settings.total_step != total_steps:
        allocator.set_total_step(total_steps)
    final = settings.total_step - settings.tfinal
    if step < final:
        _, pattern = allocator.update_and_allocate(model, step)
        if pattern:
            settings.rank_pattern = pattern
    elif step == final:
        _, pattern = allocator.update_and_allocate(model, step, force_mask=True)
        settings.rank_pattern = pattern
        allocator.reset_ipt()
    elif settings.rank_pattern:
        allocator.mask_using_rank_pattern(model, settings.rank_pattern)


def adalora_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The allocator's running importance scores and the rank pattern: what a resume needs to continue
    the same pruning."""
    allocator = model.__dict__.get(ALLOCATOR)
    if allocator is None:
        return {}, {}
    tensors = {
        f"{kind}/{name}": value
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
        for name, value in getattr(allocator, kind).items()
    }
    settings = allocator.peft_config
    return tensors, {"total_step": settings.total_step, "rank_pattern": settings.rank_pattern}


def load_adalora_state(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    allocator = model.__dict__.get(ALLOCATOR)
    if allocator is None:
        return
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        prefix = f"{kind}/"
        device = next(model.parameters()).device
        setattr(
            allocator, kind, {k.removeprefix(prefix): v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
        )
    allocator.set_total_step(meta["total_step"])
    allocator.peft_config.rank_pattern = meta.get("rank_pattern")


def adalora_orthogonality(model: nn.Module, config: Any) -> torch.Tensor | None:
    """AdaLoRA's regulariser (peft adds it in AdaLoraModel.forward): orth_reg_weight x the mean over
    the adapters of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F, keeping P and Q near orthogonal."""
    allocator = model.__dict__.get(ALLOCATOR)
    if allocator is None or not allocator.peft_config.orth_reg_weight:
        return None
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER_NAME in name.split("."):
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
    return allocator.peft_config.orth_reg_weight * torch.stack(terms).mean() if terms else None


# ---------------------------------------------------------------- EVA: data-driven LoRA initialisation


def uses_eva(config: Any) -> bool:
    return config.peft_method == "lora" and (config.peft_config or {}).get("init_lora_weights") == "eva"


@torch.no_grad()
def eva_init(model: nn.Module, config: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    """EVA (peft's get_eva_state_dict): each LoRA layer's A becomes the top-r right-singular vectors of
    that layer's inputs over `batches` (incremental PCA until the components converge, cycling the
    batches), B stays zero, so the model still equals the base at step 0. peft's own routine runs on
    this model: it sees peft's LoRA layers and, with B zero, the base model's forward."""
    import contextlib

    from peft.tuners.lora.eva import get_eva_state_dict

    lora_config = peft_config_for(config)
    layers = dict(tuner_layers(model))

    @contextlib.contextmanager
    def without_adapters():  # what PeftModel.disable_adapter does: the statistics are the base model's
        for layer in layers.values():
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers.values():
                layer.enable_adapters(True)

    def forward(target: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        target.transformer(inputs["input_ids"], inputs["attention_mask"])  # hidden states suffice

    # get_eva_state_dict treats a model with `peft_config` and `disable_adapter` as a PeftModel
    model.__dict__.update(peft_config={ADAPTER_NAME: lora_config}, disable_adapter=without_adapters)
    try:
        components = get_eva_state_dict(
            model,
            batches,
            forward_fn=forward,
            adapter_name=ADAPTER_NAME,
            gather_distributed_inputs=False,  # every process reads the same batches
            show_progress_bar=False,
        )
    finally:
        for key in ("peft_config", "disable_adapter"):
            model.__dict__.pop(key, None)
    for name, layer in layers.items():
        vectors = components.get(name)
        weight = layer.lora_A[ADAPTER_NAME].weight
        if vectors is None or vectors.shape != weight.shape:
            raise RuntimeError(
                f"EVA gave {name} components of shape {getattr(vectors, 'shape', None)}, not {weight.shape}"
            )
        weight.copy_(vectors.to(weight.dtype))
        layer.lora_B[ADAPTER_NAME].weight.zero_()


def peft_tag(config: Any) -> str:
    tag = f"peft-{config.peft_method}"
    if config.peft_config:  # what the fields count as (X-LoRA's experts: digests, not folders)
        text = json.dumps(PeftSettings.identity_value("peft_config", config.peft_config), sort_keys=True)
        tag += "-" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return tag


def peft_export(config: Any) -> tuple[Any, str, Any]:
    method = config.peft_method
    if method_status(method) == "experts":
        raise ValueError(
            "X-LoRA's experts are LoRA adapters that already exist (export those runs); its classifier "
            "has no stock HF form here: use save_adapters(dir)"
        )
    if method_status(method) not in ("stock", "prompt"):
        raise ValueError(
            f"peft's {method} layers accept nn.Linear only, not stock HF GPT-2's Conv1D, so an exported "
            "adapter could not load there; use save_adapters(dir), or export_hf(dir) for the merged model"
        )
    fill = export_state if method_status(method) == "prompt" else None  # peft saves the encoder's output
    return peft_config_for(config, fan_in_fan_out=True), ADAPTER_NAME, fill


def peft_quantize_refusal(config: Any) -> str | None:
    method = config.peft_method
    if METHODS[method].quantized_base:
        return None
    layers = sorted(m for m in STOCK_GPT2 + LINEAR_ONLY if METHODS[m].quantized_base)
    return f"peft's {method} layer does not accept bitsandbytes layers (those that do: {', '.join(layers)})"


register(
    Variant(
        name="peft",
        settings=PeftSettings,
        lr_prior=lambda config: METHODS[config.peft_method].lr,
        enabled=lambda c: c.peft_method is not None,
        attach=attach_peft,
        tag=peft_tag,
        namespace=f".{ADAPTER_NAME}",
        check=check_peft,
        merge=merge_peft,
        extra_state=peft_state,
        # VB-LoRA's and UniLoRA's frozen tensors are random draws: a rebuilt model would not have them
        extra_state_in_checkpoints=True,
        aux_loss=adalora_orthogonality,
        after_step=adalora_after_step,
        needs_after_step=lambda config: config.peft_method == "adalora",
        training_state=adalora_state,
        load_training_state=load_adalora_state,
        data_init=eva_init,
        needs_data_init=uses_eva,
        quantize_refusal=peft_quantize_refusal,
        peft_export=peft_export,
        prefix_positions=num_virtual_tokens,
        capture_blocker=lambda model, config: (
            f"peft's {config.peft_method} reads or copies host values in every forward (its task ids / token indices)"
            if METHODS[config.peft_method].host_values
            else None
        ),
    )
)
