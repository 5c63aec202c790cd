"""X-LoRA (Buehler & Buehler 2024): a mixture of frozen LoRA experts, `peft_method="xlora"`.

    scaling pass   h̃ = GPT-2 with every expert weighted by c (peft's `scaling_pass_value`, default 0:
                   the base model), no gradient
    scalings       s = softmax(classifier(ln_f(h̃_L)) / T)          (B, T, n_layers, K): per token, per
                                                                   adapted layer (or one row broadcast)
    adapted layer  y = W x + Σ_k g · (α_k / r_k) · B_k A_k (s_{·,k} ⊙ x)      g: `global_scaling_weight`

The K experts are LoRA adapters trained before (a run folder of `--peft_method lora` or `--use_lora`,
or a peft LoRA adapter folder); they stay frozen and only the classifier trains (peft's default,
`use_trainable_adapters=False`). Everything follows peft's XLoraModel: the classifier's layers (depth
1: one linear; deeper: linear-ReLU-dropout stacks of `xlora_size`), `top_k_lora` and
`enable_softmax_topk`, and the layer numbering (the adapted linears in module order). The classifier
reads the scaling pass's last hidden state after ln_f, as peft reads HF's `hidden_states[-1]`.

Identity at init: no. A fresh classifier mixes the experts (softmax ≈ 1/K each), so the model starts as
the experts' average, not the base. It does not merge (the weights depend on the input). Generation
keeps a second KV cache for the scaling pass, so it decodes one token per step as without experts
(peft's X-LoRA turns the cache off); each token's scalings depend on its prefix only, so this is exact.

An expert is named in `peft_config.adapters` by its folder (experts are indexed in name order); the
config records each one's folder and the SHA-256 of its configuration and tensors, and only the digest
is part of the run's identity, so a moved expert folder keeps the run. The weights read at every build
must match the recorded digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.variant import ForwardChange, LrPrior, PeftMethod

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
METHOD = PeftMethod(
    "xlora",
    "experts",
    LrPrior(1e-4, 1e-3, "not in peft's method comparison: its classifier is a small new head over frozen LoRA experts"),
    not_identity_at_init=(
        "a fresh classifier already mixes the experts (softmax ≈ 1/K each): the model starts as their average"
    ),
    not_mergeable="each token weighs the experts by its own scalings: no one weight holds the update",
)
# LoRA config fields an expert may use (values other than peft's defaults for the rest are refused)
EXPERT_DEFAULTS = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "modules_to_save": None,
    "trainable_token_indices": None,
}


@dataclass(frozen=True)
class Expert:
    """One LoRA adapter: per adapted module (its name in this model), A (r, in) and B (out, r)."""

    folder: Path
    r: int
    alpha: float
    rslora: bool
    dropout: float
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    def digest(self) -> str:
        """SHA-256 of what the expert computes: its configuration and tensors (not its path or file bytes)."""
        h = hashlib.sha256(json.dumps([self.r, self.alpha, self.rslora, self.dropout]).encode())
        for name in sorted(self.tensors):
            for tensor in self.tensors[name]:
                h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def read_expert(folder: str | Path) -> Expert:
    """A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors); ValueError says
    what is wrong with it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"X-LoRA expert {folder}: not a peft LoRA adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}) "
            "nor a finished LoRA run folder"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"X-LoRA expert {config_path}: unreadable ({error})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"X-LoRA expert {folder}: a {kind} adapter; X-LoRA mixes LoRA adapters only")
    for field, default in EXPERT_DEFAULTS.items():
        if config.get(field, default) not in (default, None, {}, False):
            raise ValueError(
                f"X-LoRA expert {folder}: {field}={config[field]!r}; peft's X-LoRA mixes plain LoRA layers only"
            )
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"X-LoRA expert {config_path}: r={r!r} is not a positive integer")
    try:
        raw = load_file(weights_path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"X-LoRA expert {weights_path}: unreadable ({error})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        module, _, leaf = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight"):
            raise ValueError(f"X-LoRA expert {weights_path}: tensor {key!r} is not a LoRA A or B weight")
        pairs.setdefault(module, {})[leaf[0]] = tensor.float()
    tensors = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != r or pair["B"].shape[1] != r:
            raise ValueError(f"X-LoRA expert {weights_path}: {module} lacks a rank-{r} A and B pair")
        tensors[module] = (pair["A"], pair["B"])
    if not tensors:
        raise ValueError(f"X-LoRA expert {weights_path}: no LoRA tensors")
    return Expert(
        folder=folder,
        r=r,
        alpha=float(config.get("lora_alpha", 8)),
        rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout", 0.0)),
        tensors=tensors,
    )


def resolve_experts(adapters: Any) -> dict[str, dict[str, str]]:
    """`peft_config.adapters` as recorded: {name: {"path": absolute folder, "sha256": digest}}, in name
    order (an expert's index, its column in the scalings, must not depend on how a JSON file orders its
    keys: config.json is written sorted). A name given as a folder is read and hashed; a recorded entry
    is kept (its digest is checked at build)."""
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(
            'peft xlora needs peft_config.adapters: {"name": "<LoRA run folder or peft LoRA adapter folder>", ...}'
        )
    resolved = {}
    for name, value in sorted(adapters.items()):
        if isinstance(value, dict) and set(value) == {"path", "sha256"}:
            resolved[str(name)] = dict(value)
        elif isinstance(value, str):
            folder = Path(value).expanduser().resolve()
            resolved[str(name)] = {"path": str(folder), "sha256": read_expert(folder).digest()}
        else:
            raise ValueError(f"peft_config.adapters[{name!r}] must be a folder path, got {value!r}")
    return resolved


def load_experts(adapters: dict[str, dict[str, str]]) -> list[Expert]:
    """The recorded experts, read again and checked against their digests."""
    experts = []
    for name, entry in adapters.items():
        expert = read_expert(entry["path"])
        if expert.digest() != entry["sha256"]:
            raise ValueError(
                f"X-LoRA expert {name!r} ({entry['path']}) is not the adapter this run recorded: its weights or "
                "configuration changed since (sha256 differs)"
            )
        experts.append(expert)
    return experts


class Scalings:
    """The scalings every X-LoRA layer reads in the current forward (a plain holder, not a module)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None  # (B, T, n_layers, K)


class XLoraLinear(nn.Module):
    """A linear with K frozen LoRA experts, weighted per token by the current scalings."""

    def __init__(
        self,
        base_layer: nn.Module,
        experts: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]],
        layer_number: int,
        scalings: Scalings,
        options: Any,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_number = layer_number
        self.__dict__["scalings"] = scalings  # shared holder: not a submodule, not saved
        self.top_k, self.softmax_top_k = options.top_k_lora, options.enable_softmax_topk
        self.global_weight = options.global_scaling_weight
        self.peft = nn.ModuleDict()  # expert index (its column in the scalings) -> its A, B, dropout
        self.expert_scaling: dict[int, float] = {}
        for index, (lora_a, lora_b, scaling, dropout) in experts.items():
            pair = nn.Module()
            pair.lora_A = nn.Linear(lora_a.shape[1], lora_a.shape[0], bias=False)
            pair.lora_B = nn.Linear(lora_b.shape[1], lora_b.shape[0], bias=False)
            with torch.no_grad():
                pair.lora_A.weight.copy_(lora_a)
                pair.lora_B.weight.copy_(lora_b)
            pair.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.peft[str(index)] = pair
            self.expert_scaling[index] = scaling

    @property
    def weight(self) -> torch.Tensor:  # what callers that read a linear's weight (dtype, device) expect
        return self.base_layer.weight

    def layer_scalings(self, scalings: torch.Tensor) -> torch.Tensor:
        """This layer's (B, T, K) scalings, with peft's top-k selection and top-k softmax."""
        scalings = scalings[:, :, self.layer_number, :]
        if self.top_k is not None:
            picked = torch.topk(scalings, k=self.top_k, dim=-1).indices
            keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, picked, True)
            scalings = scalings * keep.to(scalings.dtype)
        if self.softmax_top_k:
            nonzero = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return scalings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        current = self.scalings.value
        # Without scalings (a layer called outside the model's forward) every expert counts fully, as in peft.
        weights = self.layer_scalings(current).to(x.dtype) if current is not None else None
        for key, pair in self.peft.items():
            index = int(key)
            x_mod = x * weights[..., index : index + 1] if weights is not None else x
            weight = self.global_weight if weights is not None else 1.0
            update = pair.lora_B(pair.lora_A(pair.dropout(x_mod)))
            result = result + update.to(result.dtype) * (self.expert_scaling[index] * weight)
        return result


class ExpertMixer(ForwardChange):
    """peft's X-LoRA classifier (`self.peft`, the `peft` parameter namespace) and the two-pass forward
    (the ForwardChange hook `run_blocks`)."""

    decode_blocker = "X-LoRA's two passes"
    capture_blocker = "X-LoRA's two passes (that path has not yet been run under CUDA graphs on a GPU)"

    def __init__(self, width: int, n_experts: int, n_layers: int, options: Any, scalings: Scalings) -> None:
        super().__init__()
        self.n_experts, self.n_layers = n_experts, n_layers
        self.layerwise = options.layerwise_scalings
        self.softmax = options.enable_softmax
        self.temperature = options.softmax_temperature
        self.pass_value = options.scaling_pass_value
        self.__dict__["scalings"] = scalings
        outputs = n_experts * n_layers if self.layerwise else n_experts
        if options.xlora_depth < 1:
            raise ValueError(f"peft xlora: xlora_depth must be >= 1, got {options.xlora_depth}")
        layers: list[nn.Module] = []
        size = width
        for _ in range(options.xlora_depth - 1):  # peft's hidden stack: linear, ReLU, dropout
            layers += [nn.Linear(size, options.xlora_size), nn.ReLU()]
            if options.xlora_dropout_p > 0:
                layers.append(nn.Dropout(options.xlora_dropout_p))
            size = options.xlora_size
        self.peft = nn.Module()
        self.peft.layers = nn.Sequential(*layers, nn.Linear(size, outputs))

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, n_layers, K) scalings from the scaling pass's final hidden states (B, T, C)."""
        batch, length = hidden.shape[:2]
        logits = self.peft.layers(hidden)
        if not self.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, length, self.n_layers, self.n_experts)
        return torch.softmax(scalings / self.temperature, dim=-1) if self.softmax else scalings

    def run_blocks(
        self,
        layers: Callable[[torch.Tensor, Any], torch.Tensor],
        x: torch.Tensor,
        kv_cache: Any,
        final_norm: nn.Module,
    ) -> torch.Tensor:
        """`layers(x, cache)` runs the blocks: once with every expert at the scaling-pass value (no
        gradient; its own cache when decoding), then with the classifier's scalings."""
        batch, length = x.shape[:2]
        scaling_cache = self._scaling_cache(kv_cache)
        self.scalings.value = x.new_full((batch, length, self.n_layers, self.n_experts), self.pass_value)
        with torch.no_grad():
            hidden = final_norm(layers(x, scaling_cache))
        # Kept until the next forward: gradient checkpointing re-runs the layers during backward (the
        # training loop runs each micro-batch's backward before the next forward).
        self.scalings.value = self.classify(hidden)
        out = layers(x, kv_cache)
        if scaling_cache is not None:  # in step with the model's cache, which GPT2Model advances next
            scaling_cache.length += length
        return out

    @staticmethod
    def _scaling_cache(kv_cache: Any) -> Any:
        """The scaling pass's own KV cache beside the real one (same shape; kept in its `extras`)."""
        if kv_cache is None:
            return None
        cache = kv_cache.extras.get("xlora_scaling_pass")
        if cache is None:
            cache = type(kv_cache).like(kv_cache)
            kv_cache.extras["xlora_scaling_pass"] = cache
        if cache.length != kv_cache.length:
            raise RuntimeError(
                f"X-LoRA's scaling-pass cache holds {cache.length} tokens, the model's {kv_cache.length}"
            )
        return cache


def attach_xlora(model: nn.Module, config: Any, options: Any) -> None:
    """Wrap every linear an expert adapts with an `XLoraLinear` (in module order: the layer numbers) and
    put the classifier on `model.transformer.expert_mixer`. `options`: peft's XLoraConfig."""
    experts = load_experts(config.peft_config["adapters"])
    targets = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted({m for e in experts for m in e.tensors} - set(targets))
    if missing:
        raise ValueError(f"X-LoRA experts adapt modules this model does not have: {missing[:4]}")
    scalings = Scalings()
    n_layers = 0
    for name, module in targets.items():  # named_modules order: peft's layer numbering
        mine = {}
        for index, expert in enumerate(experts):
            if name in expert.tensors:
                lora_a, lora_b = expert.tensors[name]
                if lora_a.shape[1] != module.in_features or lora_b.shape[0] != module.out_features:
                    raise ValueError(
                        f"X-LoRA expert {expert.folder}: {name} is {lora_b.shape[0]}x{lora_a.shape[1]}, this "
                        f"model's is {module.out_features}x{module.in_features} (another base model?)"
                    )
                mine[index] = (lora_a, lora_b, expert.scaling, expert.dropout)
        if not mine:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, XLoraLinear(module, mine, n_layers, scalings, options))
        n_layers += 1
    for name, param in model.named_parameters():
        if ".peft." in name and ".lora_" in name:
            param.requires_grad_(bool(options.use_trainable_adapters))
    model.transformer.add_forward_change(
        "expert_mixer", ExpertMixer(config.n_embd, len(experts), n_layers, options, scalings)
    )
