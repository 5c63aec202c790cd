"""One typed configuration for the forked GPT-2 and every variant built on it.

`GPT2Config` is the single source of truth: the size of the stack, the dropout rates and the
variant flags (`use_kan`, `use_lora`, `use_graph`, ...) with their knobs beside them. It is
validated in `__post_init__`, round-trips through JSON, and is saved with every checkpoint.
Unknown fields raise (`from_dict`), so a typo in a preset file never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

LORA_TARGETS = {"qkv": "attn.c_attn", "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}
LORA_INITS = ("default", "gaussian", "pissa")
KORA_TARGETS = ("query", "key", "value")
FINE_TUNE_MODES = ("full-model", "last-linear-layer", "adapters")
KAN_INITS = ("mlp", "random")
KAN_BASES = ("silu", "identity", "gelu")
GRAPH_BACKENDS = ("gatconv", "dense")

# HF config.json fields that map one-to-one onto ours.
_HF_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
    "layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range",
)


@dataclass
class GPT2Config:
    # --- the GPT-2 stack (defaults: gpt2 / 124M) ---
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # FFN width; None means 4 * n_embd as in GPT-2
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # --- dropout ---
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    # --- variant flags (the course project's switches); their knobs live beside them ---
    use_kan: bool = False
    use_lora: bool = False
    use_graph: bool = False
    # LoRA family (peft): scale alpha/r, or alpha/sqrt(r) with rslora
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("qkv", "attn_out", "mlp_in", "mlp_out")
    lora_layers: tuple[int, ...] | None = None  # None: every block
    lora_rslora: bool = False
    lora_dora: bool = False
    lora_init: str = "default"  # default (peft: kaiming A, zero B) | gaussian | pissa
    lora_plus_ratio: float = 1.0  # LoRA+: lr of B = ratio x lr (1.0 = plain LoRA)
    # KoRA: composed q/k/v adapters added to one projection through a zero-initialised gate
    use_kora: bool = False
    kora_r: int = 8
    kora_d_comp: int = 64
    kora_target: str = "value"  # value | query | key
    # KAN (use_kan alone: the FFN becomes a two-layer KAN; with use_lora: LoRA-KAN adapters)
    kan_grid_size: int = 5
    kan_grid_range: tuple[float, float] = (-2.0, 2.0)
    kan_spline_order: int = 3  # 1 (piecewise linear), 2, 3 (cubic)
    kan_init: str = "mlp"  # mlp: starts as the pretrained MLP exactly | random: parameter-matched KAN
    kan_hidden: int | None = None  # random init width; None = match the MLP's parameter count
    kan_base: str = "silu"  # base function b(x) of random-init KAN layers and of LoRA-KAN
    lora_kan_squash: bool = True  # LoRA-KAN: squash adapter inputs into the grid with tanh
    # Graph attention branch (torch_geometric GATConv) beside the block's attention
    graph_heads: int = 4
    graph_window: int | None = None  # None: every previous token; w: only the last w tokens (incl. self)
    graph_dropout: float = 0.1
    graph_backend: str = "gatconv"  # gatconv (torch_geometric) | dense (same maths, masked softmax)
    # What trains: full-model | last-linear-layer | adapters; None = adapters if a variant is on
    fine_tune_mode: str | None = None
    # Free-form provenance (e.g. the checkpoint this config was read from); never affects maths.
    name: str = field(default="gpt2")

    def __post_init__(self) -> None:
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{key} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"GPT2Config.n_inner must be a positive integer or None, got {self.n_inner!r}")
        for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, key)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"GPT2Config.{key} must be in [0, 1), got {value!r}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        for key in ("use_kan", "use_lora", "use_graph", "use_kora", "lora_rslora", "lora_dora", "lora_kan_squash"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"GPT2Config.{key} must be a bool, got {getattr(self, key)!r}")
        self._validate_variant_knobs()

    def _validate_variant_knobs(self) -> None:
        # JSON gives lists; keep tuples so configs compare equal after a round trip.
        if isinstance(self.lora_targets, str):
            self.lora_targets = (self.lora_targets,)
        self.lora_targets = tuple(self.lora_targets)
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or not self.lora_targets:
            raise ValueError(
                f"GPT2Config.lora_targets {list(self.lora_targets)} invalid; choose from {list(LORA_TARGETS)}")
        if self.lora_layers is not None:
            self.lora_layers = tuple(int(i) for i in self.lora_layers)
            bad = [i for i in self.lora_layers if not 0 <= i < self.n_layer]
            if bad or not self.lora_layers:
                raise ValueError(
                    f"GPT2Config.lora_layers {list(self.lora_layers)} must be block indices in [0, {self.n_layer})")
        for key in ("lora_r", "kora_r", "kora_d_comp"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{key} must be a positive integer, got {value!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"GPT2Config.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"GPT2Config.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"GPT2Config.lora_init {self.lora_init!r} unknown; choose from {list(LORA_INITS)}")
        if self.lora_plus_ratio < 1.0:
            raise ValueError(f"GPT2Config.lora_plus_ratio must be >= 1 (1 = plain LoRA), got {self.lora_plus_ratio!r}")
        if self.kora_target not in KORA_TARGETS:
            raise ValueError(f"GPT2Config.kora_target {self.kora_target!r} unknown; choose from {list(KORA_TARGETS)}")
        if self.fine_tune_mode is not None and self.fine_tune_mode not in FINE_TUNE_MODES:
            raise ValueError(
                f"GPT2Config.fine_tune_mode {self.fine_tune_mode!r} unknown; choose from {list(FINE_TUNE_MODES)}")
        self.kan_grid_range = tuple(float(v) for v in self.kan_grid_range)
        if len(self.kan_grid_range) != 2 or not self.kan_grid_range[0] < self.kan_grid_range[1]:
            raise ValueError(
                f"GPT2Config.kan_grid_range must be (low, high) with low < high, got {self.kan_grid_range}")
        if not isinstance(self.kan_grid_size, int) or self.kan_grid_size < 1:
            raise ValueError(f"GPT2Config.kan_grid_size must be a positive integer, got {self.kan_grid_size!r}")
        if self.kan_spline_order not in (1, 2, 3):
            raise ValueError(f"GPT2Config.kan_spline_order must be 1, 2 or 3, got {self.kan_spline_order!r}")
        if self.kan_init not in KAN_INITS:
            raise ValueError(f"GPT2Config.kan_init {self.kan_init!r} unknown; choose from {list(KAN_INITS)}")
        if self.kan_hidden is not None and (not isinstance(self.kan_hidden, int) or self.kan_hidden <= 0):
            raise ValueError(f"GPT2Config.kan_hidden must be a positive integer or None, got {self.kan_hidden!r}")
        if self.kan_base not in KAN_BASES:
            raise ValueError(f"GPT2Config.kan_base {self.kan_base!r} unknown; choose from {list(KAN_BASES)}")
        if not isinstance(self.graph_heads, int) or self.graph_heads <= 0 or self.n_embd % self.graph_heads:
            raise ValueError(f"GPT2Config.graph_heads must divide n_embd={self.n_embd}, got {self.graph_heads!r}")
        if self.graph_window is not None and (not isinstance(self.graph_window, int) or self.graph_window < 1):
            raise ValueError(f"GPT2Config.graph_window must be a positive integer or None, got {self.graph_window!r}")
        if not 0.0 <= self.graph_dropout < 1.0:
            raise ValueError(f"GPT2Config.graph_dropout must be in [0, 1), got {self.graph_dropout!r}")
        if self.graph_backend not in GRAPH_BACKENDS:
            raise ValueError(
                f"GPT2Config.graph_backend {self.graph_backend!r} unknown; choose from {list(GRAPH_BACKENDS)}")
        if self.lora_dora and self.lora_init == "pissa":
            raise ValueError("lora_dora with lora_init='pissa' is not supported (peft initialises one or the other)")

    @property
    def any_variant(self) -> bool:
        return self.use_kan or self.use_lora or self.use_graph or self.use_kora

    @property
    def resolved_fine_tune_mode(self) -> str:
        if self.fine_tune_mode is not None:
            return self.fine_tune_mode
        return "adapters" if self.any_variant else "full-model"

    def base_config(self) -> GPT2Config:
        """The same stack with every variant off: what checkpoints are loaded into."""
        return self.replace(use_kan=False, use_lora=False, use_graph=False, use_kora=False)

    # ---- derived ----
    @property
    def ffn_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # ---- construction ----
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPT2Config:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown GPT2Config field(s): {', '.join(unknown)}; "
                f"known fields: {', '.join(cls.field_names())}"
            )
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
        for flag, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                                ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if hf.get(flag, supported) != supported:
                raise ValueError(f"unsupported GPT-2 option {flag}={hf[flag]!r} in config.json")
        values = {key: hf[key] for key in _HF_FIELDS if key in hf}
        values["name"] = str(hf.get("_name_or_path") or hf.get("name") or "gpt2")
        return cls.from_dict({**values, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of a plain Hugging Face GPT-2 with this stack."""
        values = {key: getattr(self, key) for key in _HF_FIELDS}
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "activation_function": "gelu_new", "bos_token_id": 50256, "eos_token_id": 50256,
                "tie_word_embeddings": True, **values}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
