"""The variant contract: one file per variant, which registers itself.

A variant module (`modules/lora.py`, `modules/kora.py`, ...) defines, in one place:

* its **typed settings**: a `Settings` dataclass holding the knobs it owns (its `use_*` switch
  included), each declared with `knob(...)`: a type (`int`, `float`, `bool`, `str`, a `Literal`
  of choices, a tuple, `... | None`), a help text and optional bounds. The settings are checked on
  construction (types, choices, bounds); `check(config)` then validates them against the
  *resolved* model config (the checkpoint's width, depth, heads), e.g. LoRA's block indices;
* a `Variant` record: when it is enabled, how it attaches to a loaded base model, its run-name tag,
  the substring every parameter it adds carries (its namespace), how it merges or why it cannot,
  its auxiliary loss, the extra state to save beside its parameters, its LoRA+ parameters, and its
  prior learning-rate range (`LrPrior`: where a grid's [tune] stage searches, with its source);
* one call `register(Variant(...))` at import time.

Everything else (GPT2Config's fields, CLI flags, run names, adapters mode, save/load/merge, the
training loop's auxiliary loss) loops over `VARIANTS`, so adding a variant is its file, one import
line in `modules/registry.py` and one row in the test matrix (tests/variant_cases.py).

This file is the bottom of the dependency graph: it imports torch only. Variants receive the model
config duck-typed (`config.n_embd`, `config.lora_r`, ...) and never import `model/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import torch
from torch import nn


@dataclass(frozen=True)
class LrPrior:
    """Where a method's learning rate is searched (a log grid over [low, high] in a grid's [tune] stage),
    and where that range comes from (a paper, peft's method comparison, or why there is none)."""

    low: float
    high: float
    source: str

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high or not math.isfinite(self.high):
            raise ValueError(f"a learning-rate prior needs 0 < low <= high < inf, got [{self.low}, {self.high}]")
        if not self.source:
            raise ValueError("a learning-rate prior needs its source (paper, example, or why there is none)")


@dataclass(frozen=True)
class PeftMethod:
    """One peft method as this model runs it, in one record (modules/peft_methods.py's METHODS; prompt
    learning's records are in modules/prompt_learning.py, X-LoRA's in modules/xlora.py).

    `runs_as`: "stock" (peft's layer takes HF's Conv1D: parity with stock HF GPT-2 + peft, and
    `export_peft` writes an adapter stock GPT-2 loads), "linear" (peft's layer takes nn.Linear only:
    parity with HF GPT-2 whose Conv1D are nn.Linear), "prompt" (virtual tokens through peft's encoders)
    or "experts" (a mixture of finished LoRA runs). `defaults`: fields given where peft has no default
    (user fields override them); `required`: fields with no default, and the value the `methods` presets
    give. `not_identity_at_init` / `not_mergeable`: why not, where it is not. `quantized_base`: peft has a
    bitsandbytes layer for it (peft/tuners/<method>/bnb.py), so it can sit on a `--quantize` base.
    `host_values`: its forward reads host values (task ids, token indices), so CUDA graphs must not
    capture it (`quantized_base` is also true of prompt learning, which leaves the linears alone). `lr`:
    the range a grid's [tune] stage searches, with its source."""

    name: str
    runs_as: Literal["stock", "linear", "prompt", "experts"]
    lr: LrPrior
    defaults: dict[str, Any] = field(default_factory=dict)
    required: dict[str, Any] = field(default_factory=dict)
    not_identity_at_init: str = ""
    not_mergeable: str = ""
    quantized_base: bool = False
    host_values: bool = False

    def __post_init__(self) -> None:
        if self.runs_as not in ("stock", "linear", "prompt", "experts"):
            raise ValueError(f"peft method {self.name!r}: runs_as {self.runs_as!r} unknown")


class JSONObject(dict):
    """A knob holding a JSON object (e.g. a peft method's config fields): a plain dict for json and
    `==`, read-only so a frozen config stays frozen."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a GPT2Config JSON field is read-only; use config.replace(...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        import json

        return hash(json.dumps(self, sort_keys=True))


def knob(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    switch: bool = False,
    cli: str | None = None,
) -> Any:
    """A typed setting. Bounds are inclusive unless `*_open`; `switch` marks a variant's on/off flag
    (`use_lora`); `cli` overrides how a tuple is given on the command line ("pair" for (low, high))."""
    meta = {
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "switch": switch,
        "cli": cli,
    }
    if isinstance(default, list | dict | set) and not isinstance(default, JSONObject):  # JSONObject: read-only
        raise TypeError("knob defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "None"
    if hint is JSONObject:
        return "a JSON object"
    if origin is tuple:
        args = get_args(hint)
        inner = _describe(args[0])
        return f"a list of {inner}" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} values ({inner})"
    return getattr(hint, "__name__", str(hint))


def setting_label(owner: str, name: str) -> str:
    """How an error names a setting: `GPT2Config.lora_r` for the model config, `--lr` for a command-line
    setting (an empty owner)."""
    return f"{owner}.{name}" if owner else f"--{name}"


def coerce(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Check `value` against a type hint and normalise it (JSON lists -> tuples, ints -> floats).
    Floats must be finite: a NaN passes every bound check and an inf turns guards off silently."""
    origin = get_origin(hint)
    label = setting_label(owner, name)
    bad = ValueError(f"{label} must be {_describe(hint)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise bad
        real = [option for option in options if option is not type(None)]
        for option in real:
            try:
                return coerce(owner, name, value, option)
            except ValueError as error:
                if len(real) == 1:  # `float | None`: the float's own message (e.g. "a finite number")
                    raise error from None
                continue
        raise bad
    if origin is Literal:
        if value not in get_args(hint) or isinstance(value, bool) != any(isinstance(a, bool) for a in get_args(hint)):
            raise ValueError(f"{label} {value!r} unknown; choose from {list(get_args(hint))}")
        return value
    if origin is tuple:
        args = get_args(hint)
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, list | tuple):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            if not value:
                raise ValueError(f"{label} must not be empty")
            return tuple(coerce(owner, name, v, args[0]) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(coerce(owner, name, v, a) for v, a in zip(value, args, strict=True))
    if hint is JSONObject:
        import json

        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        try:  # a JSON round trip: what is saved in config.json is what the model was built with
            return JSONObject(json.loads(json.dumps(value, allow_nan=False)))
        except ValueError as error:
            if "Out of range float" in str(error):  # NaN or infinity, at any depth (Python's json reads them)
                raise ValueError(f"{label} holds NaN or infinity, which no field accepts: {value}") from None
            raise ValueError(f"{label} must be JSON-serialisable: {error}") from error
        except TypeError as error:
            raise ValueError(f"{label} must be JSON-serialisable: {error}") from error
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be a bool, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{label} must be an integer, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{label} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{label}: unsupported knob type {hint!r}")


def _check_bounds(owner: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None or isinstance(v, str | bool):
            continue
        low, high = meta.get("low"), meta.get("high")
        too_low = low is not None and (v <= low if meta.get("low_open") else v < low)
        too_high = high is not None and (v >= high if meta.get("high_open") else v > high)
        if too_low or too_high:
            raise ValueError(f"{setting_label(owner, f.name)} must be {bounds_text(meta)}, got {value!r}")


def bounds_text(meta: Any) -> str:
    """A knob's allowed range as a person writes it: `in [0, 1)`, `> 0`, `>= 1` (no infinite end: an
    infinite value is refused anyway)."""
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"in {'(' if meta.get('low_open') else '['}{low:g}, {high:g}{')' if meta.get('high_open') else ']'}"
    if low is not None:
        return f"{'>' if meta.get('low_open') else '>='} {low:g}"
    return f"{'<' if meta.get('high_open') else '<='} {high:g}"


@contextlib.contextmanager
def no_weight_init():
    """Every `torch.nn.init` initialiser a no-op: a meta tensor has no values to fill, and filling one
    still goes through torch's reference kernels (most of a meta build's time)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, _unchanged)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _unchanged(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A settings class's resolved annotations (cached: resolving them costs more than the checks)."""
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class Settings:
    """Base of every typed settings dataclass: fields declared with `knob`, checked on construction.
    `owner` names the settings in errors: the model config's fields as `GPT2Config.lora_r`, the
    command-line settings of train/base/settings.py (owner "") as `--lr`."""

    owner: typing.ClassVar[str] = "GPT2Config"

    def __post_init__(self) -> None:
        hints = type(self).hints()
        for f in dataclasses.fields(self):
            value = coerce(self.owner, f.name, getattr(self, f.name), hints[f.name])
            _check_bounds(self.owner, f, value)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks that need no model size (override where needed)."""

    @classmethod
    def identity_value(cls, name: str, value: Any) -> Any:
        """What a knob's value counts as in a run's identity: the value itself, unless part of it is
        provenance (where a file was read from) and another part says what the file is (override)."""
        return value

    @classmethod
    def knobs(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return _type_hints(cls)


class ForwardChange(nn.Module):
    """What a variant that changes GPT-2's forward pass, not a layer, attaches to the backbone with
    `model.transformer.add_forward_change(name, module)` (its parameters then sit under
    `transformer.<name>.`). It overrides the hooks it needs; GPT2Model calls them and names no method.

    * **A prefix** of `prefix_length` positions ahead of the input, made at a sequence's first forward:
      `prefix_embeddings(batch)` gives (B, n, C) input embeddings put in front of the tokens' (prompt
      tuning, P-tuning), or, where that gives None, `prefix_cache(kv_cache, batch)` gives a cache whose
      first n entries of every layer are the prefix's keys and values (prefix tuning). The prefix takes
      positions 0..n-1 and is always attended; real tokens count from n over real tokens only; only the
      input's own positions come out. The variant's `prefix_positions` hook says n from the config alone
      (for length checks before a model exists).
    * **Its own passes** over the blocks: `run_blocks(blocks, x, kv_cache, final_norm)`, where
      `blocks(h, cache)` runs every block once (X-LoRA: a scaling pass, then the pass with its scalings).

    `decode_blocker` / `capture_blocker`: why a static-cache decode / a CUDA-graph capture cannot run it.
    Neither path runs a prefix or the change's own passes, so a change with either is blocked from both
    (`blockers()`) even where it names no reason; a change with neither (its own state only) may set
    them. Identity at init is the variant's to state (its method record or docstring).
    """

    prefix_length: int = 0
    decode_blocker: str | None = None
    capture_blocker: str | None = None

    def blockers(self) -> tuple[str | None, str | None]:
        """(why no static-cache decode, why no CUDA-graph capture): the change's own reasons, and a
        prefix or own passes always (static decoding and the captured step run neither)."""
        changes = self.prefix_length > 0 or self.own_passes
        default = f"{type(self).__name__}: a forward change with a prefix or its own passes" if changes else None
        return self.decode_blocker or default, self.capture_blocker or default

    def prefix_embeddings(self, batch: int) -> torch.Tensor | None:
        return None

    def prefix_cache(self, kv_cache: Any, batch: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has a prefix but neither embeddings nor a cache")

    def run_blocks(
        self, blocks: Callable[[torch.Tensor, Any], torch.Tensor], x: torch.Tensor, kv_cache: Any, final_norm: nn.Module
    ) -> torch.Tensor:
        return blocks(x, kv_cache)

    @property
    def own_passes(self) -> bool:
        return type(self).run_blocks is not ForwardChange.run_blocks


class ForwardChangeHost(nn.Module):
    """A backbone that forward changes attach to: GPT2Model, and the weightless skeleton peft's size checks
    build. It keeps the changes' names in attach order."""

    def __init__(self) -> None:
        super().__init__()
        self.forward_changes: list[str] = []

    def add_forward_change(self, name: str, change: ForwardChange) -> None:
        """Attach a variant's change of the forward pass as `self.<name>` (at most one prefix and one
        owner of the passes: two would each assume they see the plain model)."""
        if not isinstance(change, ForwardChange):
            raise TypeError(f"{name}: a forward change is a modules.variant.ForwardChange, not {type(change).__name__}")
        for kind, taken in (("prefix", self.prefix), ("own passes", self.passes)):
            has = change.prefix_length > 0 if kind == "prefix" else change.own_passes
            if has and taken is not None:
                raise ValueError(f"{name}: the model already has a forward change with a {kind}")
        self.add_module(name, change)
        self.forward_changes.append(name)

    @property
    def changes(self) -> list[ForwardChange]:
        return [getattr(self, name) for name in self.forward_changes]

    @property
    def prefix(self) -> ForwardChange | None:
        """The forward change that puts positions ahead of the input, or None."""
        return next((change for change in self.changes if change.prefix_length > 0), None)

    @property
    def passes(self) -> ForwardChange | None:
        """The forward change that runs the blocks its own way, or None."""
        return next((change for change in self.changes if change.own_passes), None)


@dataclass(frozen=True)
class Variant:
    """What a variant is, in one record. `config` arguments are the full model config (duck-typed)."""

    name: str
    settings: type[Settings]  # the knobs this variant owns
    enabled: Callable[[Any], bool]
    attach: Callable[[nn.Module, Any], None]
    tag: Callable[[Any], str]  # short run-name part, e.g. "lora-r8-a16"
    namespace: str  # every parameter this variant adds has this in its name
    reads: tuple[str, ...] = ()  # knobs owned by other variants that this one uses
    check: Callable[[Any], None] | None = None  # validation against the resolved model config
    merge: Callable[[nn.Module], None] | None = None  # exact merge into the base weights
    not_mergeable: str = ""  # why not, when merge is None
    aux_loss: Callable[[nn.Module, Any], torch.Tensor | None] | None = None
    extra_state: Callable[[nn.Module, Any], dict[str, torch.Tensor]] | None = None  # saved with the adapters
    # ... and in training checkpoints too, when rebuilding the model does not reproduce it (random draws)
    extra_state_in_checkpoints: bool = False
    before_load: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None  # e.g. resize KAN grids
    lora_plus: Callable[[str], bool] | None = None  # parameters that get lr x lora_plus_ratio
    # Training-time state outside the parameters (AdaLoRA's rank allocator): a hook the trainer calls
    # after every optimizer step, before the gradients are cleared, with (model, config, step, total
    # steps), and the state it must carry in training checkpoints (tensors, JSON) to resume exactly.
    after_step: Callable[[nn.Module, Any, int, int], None] | None = None
    needs_after_step: Callable[[Any], bool] = lambda config: True  # (a peft method: AdaLoRA only)
    training_state: Callable[[nn.Module], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
    load_training_state: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, Any]], None] | None = None
    # A data-driven initialisation (EVA): called once before a fresh run's first step with (model, config,
    # batches), each batch a dict of input_ids and attention_mask from the run's training data.
    data_init: Callable[[nn.Module, Any, list[dict[str, torch.Tensor]]], None] | None = None
    needs_data_init: Callable[[Any], bool] = lambda config: True
    # the variant as one adapter in peft's own format for stock HF GPT-2 (model.export_peft): (peft config,
    # this model's adapter name, None or a function (model, peft model) that fills the peft model itself
    # instead of the adapter tensors being copied by name); ValueError says why not
    peft_export: Callable[[Any], tuple[Any, str, Callable[[nn.Module, Any], None] | None]] | None = None
    # how many positions the variant's forward change puts ahead of the input (ForwardChange), from the
    # config alone: the model's length checks count them before a model exists
    prefix_positions: Callable[[Any], int] | None = None
    # why a quantised base (--quantize) cannot carry this variant as configured, or None
    quantize_refusal: Callable[[Any], str | None] | None = None
    # why CUDA graphs must not capture a forward of this variant (e.g. it reads host values), or None
    capture_blocker: Callable[[nn.Module, Any], str | None] | None = None
    # The learning-rate range a grid's [tune] stage searches for this variant: one prior, or a function of
    # the config when the variant holds several methods (peft's, by peft_method; LoRA's PiSSA init).
    lr_prior: LrPrior | Callable[[Any], LrPrior] | None = None

    def prior(self, config: Any) -> LrPrior:
        return self.lr_prior(config) if callable(self.lr_prior) else self.lr_prior

    def uses(self) -> set[str]:
        """Every knob this variant reads: its own and the ones it borrows."""
        return {f.name for f in self.settings.knobs()} | set(self.reads)


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add a variant to the registry (attach order = registration order); knob names must be unique."""
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is registered twice")
    owned = {f.name: v.name for v in VARIANTS.values() for f in v.settings.knobs()}
    clash = sorted(f.name for f in variant.settings.knobs() if f.name in owned)
    if clash:
        raise ValueError(
            f"variant {variant.name!r}: knobs {clash} are already owned by {sorted({owned[c] for c in clash})}"
        )
    if not variant.namespace:
        raise ValueError(f"variant {variant.name!r} needs a parameter namespace")
    if variant.merge is None and not variant.not_mergeable:
        raise ValueError(f"variant {variant.name!r}: give merge or the reason it cannot merge (not_mergeable)")
    if variant.lr_prior is None:
        raise ValueError(f"variant {variant.name!r}: declare its learning-rate range (lr_prior=LrPrior(...))")
    VARIANTS[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove a variant (tests that register a throw-away variant clean up with this)."""
    VARIANTS.pop(name, None)
