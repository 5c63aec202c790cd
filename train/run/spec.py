"""A run as one typed value: `RunSpec`, its identity, its name.

A `RunSpec` holds the task(s), the resolved model config, the checkpoint (where it is read from and
what it is), the training settings, each task's settings, and the output and runtime settings.

**Identity is a rule by type, not a deny-list**: every field of the spec counts, except values whose
type says they do not: `OutputSettings` and `RuntimeSettings` (where results go, how the maths is
executed) and the command line as typed. The checkpoint counts by its *content* (model/fingerprint.py),
never by how its path is spelled, and the config's `name` (provenance) does not count. Of the model
config, the knobs of disabled variants do not count (they cannot change a result), so a new variant
leaves the other configurations' identities as they were; a copied or moved checkpoint keeps them.

A field added to a settings class does change identities (it is part of every run now). Records carry
the fingerprint of the settings schema they were named under (`identity_schema()`); a run folder
named under another schema is renamed to its name under today's rule when a run starts in its
out_dir (train/run/folder.py: `migrate_legacy`), so `--resume`, grids and reports still find it.

The run folder is `<label>-<variant tags>-lr<lr>-s<seed>-<hash>`: `hash` is 8 hex digits of the
SHA-256 of the identity without the seed (the seeds of one configuration share it; the report groups
them by it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from model.config import GPT2Config
from modules.registry import enabled_variants
from train.base.settings import CommandSettings, OutputSettings, RuntimeSettings, TrainingSettings

SPEC_VERSION = 2  # 1: the identity of commits before RunSpec (vars(args) minus a deny-list)
IDENTITY_RULE = 2  # 1: every config knob counted; 2: only the enabled variants' knobs (GPT2Config.result_dict)
MODE_TAGS = {"full-model": "full", "last-linear-layer": "lastlinear", "adapters": "adapters"}
NOT_IDENTITY = (OutputSettings, RuntimeSettings)  # the rule: values of these types never count


@dataclass(frozen=True)
class Checkpoint:
    """Where the base weights are read from (`source`, as given) and what they are (`identity`)."""

    source: str
    identity: dict[str, Any]

    def identity_value(self) -> dict[str, Any]:
        return dict(self.identity)


@dataclass(frozen=True)
class RunSpec:
    label: str  # the run-name prefix: "sst", "multitask-sst-quora", "sst-to-cfimdb"
    tasks: tuple[str, ...]
    config: GPT2Config  # resolved at the checkpoint's size, every variant knob validated
    checkpoint: Checkpoint
    training: TrainingSettings  # lr resolved
    task_settings: dict[str, CommandSettings]  # by task name ("multitask" for the mixture's own)
    output: OutputSettings
    runtime: RuntimeSettings
    transfer_from: dict[str, Any] | None = None  # a transfer run: the configuration and seed it starts from
    argv: tuple[str, ...] = field(default=(), metadata={"identity": False})  # the command as typed

    # ---- identity ----
    def identity(self) -> dict[str, Any]:
        """Everything that changes the run's result (seed included); see the module docstring."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("identity", True) or isinstance(value, NOT_IDENTITY):
                continue
            values[f.name] = _identity_value(value)
        return values

    def identity_hash(self) -> str:
        """The configuration's hash: the identity without the seed."""
        identity = self.identity()
        identity["training"] = {k: v for k, v in identity["training"].items() if k != "seed"}
        text = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def seed(self) -> int:
        return self.training.seed

    def run_name(self) -> str:
        return f"{self.label}-{variant_tag(self.config)}-lr{self.training.lr:g}-s{self.seed}-{self.identity_hash()}"

    def flat_settings(self) -> dict[str, Any]:
        """Every setting as {flag: value} (config.json's `training` block, the wandb config)."""
        flat: dict[str, Any] = {"model": self.checkpoint.source, "tasks": list(self.tasks)}
        for settings in (self.training, *self.task_settings.values(), self.output, self.runtime):
            flat.update(settings.to_dict())
        if self.transfer_from is not None:
            flat["transfer_from"] = self.transfer_from
        return flat

    def settings_of(self, task: str) -> CommandSettings | None:
        return self.task_settings.get(task)

    # ---- JSON (kept in the run's config.json, so transfer / evaluate / cka rebuild it) ----
    def to_json(self) -> dict[str, Any]:
        return {
            "version": SPEC_VERSION,
            "label": self.label,
            "tasks": list(self.tasks),
            "config": self.config.to_dict(),
            "checkpoint": {"source": self.checkpoint.source, "identity": self.checkpoint.identity},
            "training": self.training.to_dict(),
            "task_settings": {name: s.to_dict() for name, s in self.task_settings.items()},
            "output": self.output.to_dict(),
            "runtime": self.runtime.to_dict(),
            "transfer_from": self.transfer_from,
            "argv": list(self.argv),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], task_settings_classes: dict[str, type]) -> RunSpec:
        """The spec a run folder recorded; `task_settings_classes` maps each settings name to its class."""
        if data.get("version") != SPEC_VERSION:
            raise ValueError(f"run spec version {data.get('version')!r} unknown (this code reads {SPEC_VERSION})")
        return cls(
            label=data["label"],
            tasks=tuple(data["tasks"]),
            config=GPT2Config.from_dict(data["config"]),
            checkpoint=Checkpoint(**data["checkpoint"]),
            training=TrainingSettings(**data["training"]),
            task_settings={n: task_settings_classes[n](**v) for n, v in data["task_settings"].items()},
            output=OutputSettings(**data["output"]),
            runtime=RuntimeSettings(**data["runtime"]),
            transfer_from=data.get("transfer_from"),
            argv=tuple(data.get("argv", ())),
        )

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)


def _identity_value(value: Any) -> Any:
    if isinstance(value, GPT2Config):
        return value.result_dict()  # without `name`: the checkpoint's identity says what was loaded
    if isinstance(value, Checkpoint):
        return value.identity_value()
    if isinstance(value, CommandSettings):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _identity_value(v) for k, v in value.items() if not isinstance(v, NOT_IDENTITY)}
    if isinstance(value, tuple):
        return list(value)
    return value


@functools.cache
def identity_schema() -> str:
    """A fingerprint of what identities are made of: every settings class's fields and defaults and
    the identity rule's version. It changes when a field is added, removed or re-defaulted."""
    from model.config import ModelSettings
    from modules.registry import VARIANTS
    from train.tasks.base import settings_classes

    classes = [ModelSettings, *(v.settings for v in VARIANTS.values()), TrainingSettings]
    classes += list(settings_classes().values())
    schema = {
        "rule": IDENTITY_RULE,
        **{cls.__qualname__: [(f.name, repr(f.default)) for f in dataclasses.fields(cls)] for cls in classes},
    }
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:12]


def variant_tag(config: Any) -> str:
    parts = [variant.tag(config) for variant in enabled_variants(config)] or ["base"]
    if config.quantize is not None:  # QLoRA is not LoRA: the folder name says which base it trained on
        parts.append(config.quantize)
    mode = config.resolved_fine_tune_mode
    if mode != ("adapters" if config.any_variant else "full-model"):
        parts.append(MODE_TAGS[mode])
    return "+".join(parts)


def flat_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """An identity as {flag: value} (the model config, training and task settings side by side), for
    messages that say which flags differ between two runs."""
    flat = {"task": identity.get("label", identity.get("task"))}
    flat.update(identity.get("config", {}))
    flat.update(identity.get("training", {}))
    for values in (identity.get("task_settings") or {}).values():
        flat.update(values)
    if "checkpoint" in identity:
        flat["model"] = identity["checkpoint"]
    if identity.get("transfer_from"):
        flat["transfer_from"] = identity["transfer_from"]
    return flat
