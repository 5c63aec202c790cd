"""One typed configuration for the forked GPT-2 and every variant built on it.

`GPT2Config` is the single source of truth: the size of the stack, the dropout rates, what trains
(`fine_tune_mode`) and, for every registered variant, its typed settings: the `use_*` switch and
the knobs beside it (`use_lora`, `lora_r`, ...), declared in the variant's own file
(modules/<variant>.py) and read here from the registry. To the user it is one flat set of fields:
`config.lora_r`, `GPT2Config(use_lora=True, lora_r=16)`, `config.replace(...)`, and a flat JSON
object, so saved config.json files of earlier versions still load.

Validation: types, choices and bounds of every field on construction; then each enabled variant
checks its knobs against this (resolved) model size, e.g. `graph_heads` must divide `n_embd` of
the checkpoint actually loaded. Unknown fields raise (`from_dict`), so a typo in a preset file
never silently becomes a default. A config is immutable: derive changed copies with `replace`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model.quantize import check_quantize
from modules.imports import peft_sees_bitsandbytes
from modules.registry import VARIANTS, Variant, enabled_variants, prefix_positions
from modules.variant import Settings, knob

STACK_LIMIT = 2**40  # ~1.1e12 parameters (4 TiB in fp32): no config of this project is near it


def stack_parameters(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_inner: int | None) -> int:
    """The plain GPT-2 stack's parameter count in closed form (gpt2: 124,439,808), checked before
    anything is built (model/size.py counts a whole configuration on the meta device)."""
    d = n_embd
    f = n_inner or 4 * d
    block = 4 * d * d + 2 * d * f + 9 * d + f
    return vocab_size * d + n_positions * d + n_layer * block + 2 * d


# Size presets keyed by the Hugging Face names, plus small ones for tests and smoke runs.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Test sizes keep the real GPT-2 vocabulary so they work with the real tokenizer.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, n_positions=256),
    "small-test": dict(n_layer=2, n_head=12, n_embd=768),
}
FINE_TUNE_MODES = ("full-model", "last-linear-layer", "adapters")


@dataclass(frozen=True)
class ModelSettings(Settings):
    """The GPT-2 stack (defaults: gpt2 / 124M), dropout, what trains, and provenance."""

    vocab_size: int = knob(50257, "vocabulary size", low=1)
    n_positions: int = knob(1024, "maximum sequence length", low=1)
    n_embd: int = knob(768, "width", low=1)
    n_layer: int = knob(12, "blocks", low=1)
    n_head: int = knob(12, "attention heads", low=1)
    n_inner: int | None = knob(None, "FFN width (default 4 x n_embd)", low=1)
    layer_norm_epsilon: float = knob(1e-5, "LayerNorm epsilon", low=0, low_open=True)
    initializer_range: float = knob(0.02, "init std", low=0)
    embd_pdrop: float = knob(0.1, "embedding dropout", low=0, high=1, high_open=True)
    attn_pdrop: float = knob(0.1, "attention dropout", low=0, high=1, high_open=True)
    resid_pdrop: float = knob(0.1, "residual dropout", low=0, high=1, high_open=True)
    fine_tune_mode: Literal["full-model", "last-linear-layer", "adapters"] | None = knob(
        None, "what trains: full-model | last-linear-layer | adapters (default: adapters if a variant is on)"
    )
    quantize: Literal["nf4", "int8"] | None = knob(
        None, "store the blocks' linears quantised with bitsandbytes (QLoRA): nf4 | int8 (model/quantize.py)"
    )
    name: str = knob("gpt2", "provenance (the checkpoint this config was read from); never affects maths")

    def validate(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        size = stack_parameters(self.vocab_size, self.n_positions, self.n_embd, self.n_layer, self.n_inner)
        if size > STACK_LIMIT:  # checked before anything is built: n_layer 10^6 would allocate until memory runs out
            raise ValueError(
                f"GPT2Config describes {size:.3g} parameters (vocab_size {self.vocab_size}, n_positions "
                f"{self.n_positions}, n_embd {self.n_embd}, n_layer {self.n_layer}), more than any machine can hold"
            )


# The stack a checkpoint fixes (never a CLI override).
STACK_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "layer_norm_epsilon",
    "initializer_range",
)
# HF config.json fields that map one-to-one onto ours.
_HF_FIELDS = (*STACK_FIELDS, "embd_pdrop", "attn_pdrop", "resid_pdrop")


class GPT2Config:
    """Flat, immutable view over `ModelSettings` + each registered variant's settings."""

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.field_names()))
        if unknown:
            raise ValueError(
                f"unknown GPT2Config field(s): {', '.join(unknown)}; known fields: {', '.join(self.field_names())}"
            )
        # Each settings class checks (and normalises) its own fields; the config keeps the flat values.
        flat: dict[str, Any] = {}
        for cls in (ModelSettings, *(v.settings for v in VARIANTS.values())):
            part = cls(**{f.name: values[f.name] for f in cls.knobs() if f.name in values})
            flat.update({f.name: getattr(part, f.name) for f in cls.knobs()})
        object.__setattr__(self, "_values", flat)
        with peft_sees_bitsandbytes(self.quantize is not None):  # (modules/imports.py says why)
            for variant in enabled_variants(self):  # checks against the resolved model size
                if variant.check is not None:
                    variant.check(self)
        check_quantize(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = self.__dict__["_values"]
        if name in values:
            return values[name]
        for variant in VARIANTS.values():  # a variant registered after this config was built: its default
            if name in variant.settings.__dataclass_fields__:
                return variant.settings.__dataclass_fields__[name].default
        raise AttributeError(f"GPT2Config has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"GPT2Config is immutable; use config.replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GPT2Config) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        defaults = GPT2Config().to_dict() if VARIANTS else {}
        changed = {k: v for k, v in self.to_dict().items() if defaults.get(k, object()) != v}
        return "GPT2Config(" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")"

    @classmethod
    def field_names(cls) -> list[str]:
        names = [f.name for f in ModelSettings.knobs()]
        return names + [f.name for v in VARIANTS.values() for f in v.settings.knobs()]

    # ---- derived ----
    @property
    def variants(self) -> list[Variant]:
        return enabled_variants(self)

    @property
    def any_variant(self) -> bool:
        return bool(enabled_variants(self))

    @property
    def resolved_fine_tune_mode(self) -> str:
        if self.fine_tune_mode is not None:
            return self.fine_tune_mode
        return "adapters" if self.any_variant else "full-model"

    def base_config(self) -> GPT2Config:
        """The same stack with every variant off: what checkpoints are loaded into."""
        return self.replace(**{f.name: f.default for f in settings_fields() if f.metadata.get("switch")})

    @property
    def ffn_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def prefix_positions(self) -> int:
        """Positions the variants' forward changes put ahead of the input (prompt learning's virtual tokens)."""
        return prefix_positions(self)

    @property
    def input_positions(self) -> int:
        """Positions left for an input's real tokens: n_positions less the prefix's."""
        return self.n_positions - self.prefix_positions

    # ---- construction ----
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPT2Config:
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> GPT2Config:
        if preset not in SIZE_PRESETS:
            raise ValueError(f"unknown size preset {preset!r}; known presets: {', '.join(SIZE_PRESETS)}")
        return cls.from_dict({**SIZE_PRESETS[preset], "name": preset, **overrides})

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> GPT2Config:
        """Read a Hugging Face GPT-2 `config.json` dict; refuse options our stack does not implement."""
        if hf.get("model_type") != "gpt2":
            raise ValueError(
                f"not a GPT-2 checkpoint: config.json has model_type={hf.get('model_type')!r}, expected 'gpt2'"
            )
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation_function {activation!r}: only tanh-GELU (gelu_new)")
        for flag, supported in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("add_cross_attention", False),
        ):
            if hf.get(flag, supported) != supported:
                raise ValueError(f"unsupported GPT-2 option {flag}={hf[flag]!r} in config.json")
        values = {key: hf[key] for key in _HF_FIELDS if key in hf}
        values["name"] = str(hf.get("_name_or_path") or hf.get("name") or "gpt2")
        return cls.from_dict({**values, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of a plain Hugging Face GPT-2 with this stack."""
        values = {key: getattr(self, key) for key in _HF_FIELDS}
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "activation_function": "gelu_new",
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": True,
            **values,
        }

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def result_dict(self) -> dict[str, Any]:
        """The fields that can change a result: the stack, dropout and training mode, and the knobs of
        the enabled variants (plus the knobs they read from others). A disabled variant's knobs cannot,
        so adding a variant leaves every other configuration's identity as it was."""
        values = {f.name: getattr(self, f.name) for f in ModelSettings.knobs() if f.name != "name"}  # name: provenance
        for variant in enabled_variants(self):
            for name in [f.name for f in variant.settings.knobs()] + list(variant.reads):
                values.setdefault(name, variant.settings.identity_value(name, getattr(self, name)))
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GPT2Config:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GPT2Config:
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes: Any) -> GPT2Config:
        return self.from_dict({**self.to_dict(), **changes})

    def __copy__(self) -> GPT2Config:
        return self

    def __deepcopy__(self, memo: dict) -> GPT2Config:
        return self  # immutable


def settings_fields() -> list[dataclasses.Field]:
    """Every GPT2Config field with its knob metadata (CLI help, bounds), model fields first."""
    return [*ModelSettings.knobs(), *(f for v in VARIANTS.values() for f in v.settings.knobs())]


def field_hint(name: str) -> Any:
    """The type hint of a GPT2Config field (for the CLI)."""
    if name in ModelSettings.__dataclass_fields__:
        return ModelSettings.hints()[name]
    for variant in VARIANTS.values():
        if name in variant.settings.__dataclass_fields__:
            return variant.settings.hints()[name]
    raise KeyError(name)
