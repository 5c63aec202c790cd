"""Issue-10 contracts: flags validated at the loaded checkpoint's size, run identities that never
collide, a variant added from one file, modules/ as a leaf layer, no silently ignored knob."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from model import GPT2Config, GPT2LMHeadModel
from modules.registry import VARIANTS
from tests.conftest import DATA_DIR, REPO, make_hf_checkpoint, run_paths
from train import sentiment
from train.cli import entry
from train.cli.parse import config_fields, field_hint

QUICK = [
    "--train_limit",
    "8",
    "--dev_limit",
    "4",
    "--test_limit",
    "2",
    "--batch_size",
    "4",
    "--max_steps",
    "1",
    "--wandb",
    "disabled",
]


@pytest.fixture(scope="module")
def gpt2_shaped(tmp_path_factory):
    """gpt2's head count (12) and 4 blocks at a small width divisible by 12."""
    path = tmp_path_factory.mktemp("gpt2_shaped")
    make_hf_checkpoint(path, seed=2, n_layer=4, n_head=12, n_embd=48, n_positions=128, vocab_size=50257)
    return path


@pytest.mark.slow
def test_flags_are_validated_against_the_loaded_checkpoint(gpt2_shaped, tokenizer_dir, tmp_path):
    args = [
        "--dataset",
        "sst",
        *run_paths(gpt2_shaped, tokenizer_dir, tmp_path),
        *QUICK,
    ]
    # Valid on this 12-head, 4-block checkpoint (the tiny preset has 2 heads of width 32 and 2 blocks).
    assert sentiment.main([*args, "--use_graph", "--graph_heads", "12", "--use_lora", "--lora_layers", "3"]) == 0
    record = json.loads(next(tmp_path.glob("*/config.json")).read_text())
    assert record["config"]["graph_heads"] == 12 and record["config"]["lora_layers"] == [3]
    assert record["parameters"]["trainable"] < record["parameters"]["total"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--use_lora", "--lora_layers", "4"], "must be block indices in [0, 4)"),
        (["--use_graph", "--graph_heads", "5"], "must divide n_embd=48"),
        (["--lora_r", "16"], "--lora_r given but no enabled variant uses it"),
        (["--use_kan", "--lora_dropout", "0"], "--lora_dropout given but no enabled variant"),
        (["--use_lora", "--peft_method", "ia3"], "both would adapt the same linears"),
        (["--use_lora", "--kora_r", "4"], "--kora_r given"),
        # both switches are on: no "did you mean to add --use_kan" hint for a switch already given
        (["--use_kan", "--use_lora", "--kan_init", "random"], "uses it (enabled: kan_lora)\n"),
    ],
)
def test_invalid_values_exit_2_before_weights_load(gpt2_shaped, tmp_path, monkeypatch, capsys, flags, message):
    import model.loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the flags were validated")

    monkeypatch.setattr(model.loading, "read_weights", no_weights)
    with pytest.raises(SystemExit) as exit_info:
        sentiment.main(["--dataset", "sst", "--model", str(gpt2_shaped), "--out_dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 2  # one message (+ the --help hint), no usage block


# ---- run identity ----------------------------------------------------------------------------


def _changed_value(name: str, default, hint):
    """A valid value different from the default for a GPT2Config flag, as CLI words."""
    if name.startswith("use_") or isinstance(default, bool):
        return ["--no-" + name] if default else ["--" + name]
    choices = getattr(hint, "__args__", ())
    literal = [c for c in choices if c.__class__ is not type and c != default]
    if name.endswith("_targets"):  # lora_targets, lora_xs_targets, antipasto_targets
        return [f"--{name}", "qkv"]
    if name in ("antipasto_r", "antipasto_block"):  # r must stay a multiple of the block size
        return [f"--{name}", "4" if name == "antipasto_r" else "2"]
    if name == "lora_layers":
        return ["--lora_layers", "0"]
    if name == "kan_grid_range":
        return ["--kan_grid_range", "-3", "3"]
    if name == "fine_tune_mode":
        return ["--fine_tune_mode", "full-model"]
    if name == "graph_heads":
        return ["--graph_heads", "8"]  # must divide the tiny checkpoint's width 32
    if name == "peft_method":
        return ["--peft_method", "ia3"]
    if name == "quantize":
        return ["--quantize", "nf4"]
    if name == "peft_config":  # a peft adapter_config.json
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
            json.dump({"peft_type": "VERA", "r": 8}, file)
        return ["--peft_config", file.name]
    if literal and isinstance(literal[0], str | int) and not isinstance(default, float):
        return [f"--{name}", str(literal[0])]
    if isinstance(default, float):
        return [f"--{name}", str(default / 2 if default < 1 and default > 0 else default + 1)]
    if isinstance(default, int):
        return [f"--{name}", str(default + 1)]
    return [f"--{name}", "2"]  # int | None knobs (kan_hidden, graph_window)


TRAINING_CHANGES = {
    "--lr": "1e-3",
    "--seed": "7",
    "--epochs": "3",
    "--max_steps": "5",
    "--batch_size": "16",
    "--eval_batch_size": "8",
    "--grad_accum": "2",
    "--weight_decay": "0.1",
    "--warmup": "0.1",
    "--schedule": "cosine",
    "--max_grad_norm": "0.5",
    "--eval_every": "5",
    "--patience": "2",
    "--train_limit": "10",
    "--dev_limit": "10",
    "--test_limit": "10",
    "--max_length": "64",
}


def _enablers(name: str) -> list[str]:
    """Switches needed for a knob to be used (the CLI refuses a knob no enabled variant reads)."""
    if name.startswith(("lora_kan",)):
        return ["--use_lora", "--use_kan"]
    if name == "quantize":  # a quantised base trains adapters only
        return ["--use_lora"]
    for prefix, flags in (
        ("lora_xs_", ["--use_lora_xs"]),
        ("antipasto_", ["--use_antipasto"]),
        ("lora_", ["--use_lora"]),
        ("kan_", ["--use_kan", "--kan_init", "random"]),
        ("kora_", ["--use_kora"]),
        ("graph_", ["--use_graph"]),
        ("peft_", ["--peft_method", "vera"]),
    ):
        if name.startswith(prefix):
            return flags
    return []


def test_every_result_changing_flag_changes_the_run_folder_and_wandb_id(tiny_ckpt, tmp_path):
    from train.run.folder import new_wandb_id

    def identity(argv):
        spec, _ = entry.parse(
            entry.GENERIC, ["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path), *argv]
        )
        return (spec.run_name(), new_wandb_id(spec).rsplit("-", 1)[0], spec.identity_hash())

    checked = 0
    for f in config_fields():
        if f.name in ("kan_init",):
            base = ["--use_kan"]
            changed = ["--use_kan", "--kan_init", "random"]
        else:
            base = [a for a in _enablers(f.name) if not (f.name == "use_kan" and a != "--use_kan")]
            if f.name.startswith("use_"):
                base = []
            changed = [*base, *_changed_value(f.name, f.default, field_hint(f.name))]
            if f.name == "lora_dora" or f.name == "lora_init":
                base, changed = ["--use_lora"], ["--use_lora", *_changed_value(f.name, f.default, field_hint(f.name))]
        a, b = identity(base), identity(changed)
        assert a[0] != b[0] and a[1] != b[1], f"--{f.name}: {a} vs {b}"
        checked += 1
    for flag, value in TRAINING_CHANGES.items():
        a, b = identity([]), identity([flag, value])
        assert a[0] != b[0] and a[1] != b[1], flag
        checked += 1
    assert checked >= len(config_fields()) + len(TRAINING_CHANGES)
    # Where outputs go and how the maths is executed are not part of a run's identity.
    assert identity(["--wandb", "online"])[2] == identity([])[2]
    assert identity(["--precision", "bf16"])[0] == identity([])[0]


@pytest.mark.slow
def test_preset_with_lora_variants_that_differ_in_one_knob_runs(tmp_path, tokenizer_dir):
    from experiments import ablate

    preset = tmp_path / "grid.toml"
    preset.write_text(f"""
name = "lora-knobs"
tasks = ["sst"]
seeds = [1]
[model]
random_init = "tiny"
[common]
data_dir = "{DATA_DIR}"
tokenizer = "{tokenizer_dir}"
train_limit = 8
dev_limit = 4
test_limit = 2
batch_size = 4
max_steps = 1
wandb = "disabled"
[variants]
lora = ["--use_lora"]
lora_qkv = ["--use_lora", "--lora_targets", "qkv"]
lora_bs16 = ["--use_lora", "--batch_size", "16"]
""")
    grid = tmp_path / "grid"
    assert ablate.main([str(preset), "--out_dir", str(grid), "--threads", "1", "--launcher", "inprocess"]) == 0
    folders = [p for p in grid.iterdir() if (p / "metrics.json").is_file()]
    assert len(folders) == 3
    names = json.loads((grid / "variants.json").read_text())
    assert sorted(names.values()) == ["lora", "lora_bs16", "lora_qkv"]
    from experiments import report

    assert report.main([str(grid)]) == 0
    table = (grid / "report" / "report.md").read_text()
    assert all(f"| {name} |" in table for name in ("lora", "lora_qkv", "lora_bs16"))


# ---- a variant from one file -----------------------------------------------------------------

TOY_VARIANT = '''
"""Toy variant: scale each block's MLP output by a learned scalar, 1 at init (identity)."""
from dataclasses import dataclass

import torch
from torch import nn

from modules.variant import LrPrior, Settings, Variant, knob, register


@dataclass(frozen=True)
class ScaleSettings(Settings):
    use_scale: bool = knob(False, "scale every MLP output by a learned scalar", switch=True)
    scale_init: float = knob(1.0, "the scalar's start value", low=0)


class Scaled(nn.Module):
    def __init__(self, inner, init):
        super().__init__()
        self.inner = inner
        self.scale_gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return self.scale_gain * self.inner(x)


def attach(model, config):
    for block in model.transformer.h:
        block.mlp = Scaled(block.mlp, config.scale_init)


register(Variant(name="scale", settings=ScaleSettings, enabled=lambda c: c.use_scale, attach=attach,
                 tag=lambda c: f"scale{c.scale_init:g}", namespace="scale",
                 not_mergeable="toy variant", lr_prior=LrPrior(1e-4, 1e-3, "toy variant")))
'''


def variant_from_file(tmp_path, monkeypatch, module: str, source: str, name: str):
    """Import a variant written to `<tmp_path>/<module>.py` (it registers itself), then unregister it."""
    import importlib

    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module(module)
    VARIANTS.pop(name, None)
    sys.modules.pop(module, None)


@pytest.fixture
def toy_variant(tmp_path, monkeypatch):
    yield from variant_from_file(tmp_path, monkeypatch, "toy_scale_variant", TOY_VARIANT, "scale")


@pytest.mark.slow
def test_a_variant_in_one_file_gets_everything(toy_variant, tiny_ckpt, tokenizer_dir, tmp_path):
    from tests.test_variants import ids_batch
    from train.cli.parse import build_parser

    assert "scale" in VARIANTS
    parser = build_parser("")
    assert {"--use_scale", "--scale_init"} <= set(parser._option_string_actions)
    base = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0], embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0).eval()
    model = GPT2LMHeadModel.from_pretrained(
        tiny_ckpt[0], embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, use_scale=True
    ).eval()
    assert set(model.adapter_params.values()) == {"scale"} and all("scale" in n for n in model.adapter_params)
    ids = ids_batch()
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() <= 1e-6  # identity at init
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(1.5)
        a = model(ids).logits
        changed = ids.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 50257
        assert torch.equal(a[:, :8], model(changed).logits[:, :8])  # causal
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        assert (model(ids, attention_mask=mask).logits[0, 4:] - model(ids[:1, 4:]).logits[0]).abs().max() <= 1e-5
    model.save_adapters(tmp_path / "adapters")
    fresh = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0], embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0).eval()
    fresh.load_adapters(tmp_path / "adapters")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, a)
    # CLI flags, run tag and adapters-mode training through the real entry point.
    out = tmp_path / "runs"
    assert (
        sentiment.main(
            [
                "--dataset",
                "sst",
                *run_paths(tiny_ckpt[0], tokenizer_dir, out),
                *QUICK,
                "--use_scale",
                "--scale_init",
                "1.0",
            ]
        )
        == 0
    )
    run = next(out.glob("sst-scale1-*"))
    record = json.loads((run / "config.json").read_text())
    assert record["variants"] == ["scale"] and record["config"]["fine_tune_mode"] == "adapters"
    head = 32 * 5 + 5
    assert record["parameters"]["trainable"] == 2 + head  # the two block scalars + the sentiment head


# ---- a variant that changes the forward pass, from one file -------------------------------------

TOY_PREFIX_VARIANT = '''
"""Toy forward change: `memory_tokens` learned embeddings ahead of the input (an embedding prefix)."""
from dataclasses import dataclass

import torch
from torch import nn

from modules.variant import ForwardChange, LrPrior, Settings, Variant, knob, register


@dataclass(frozen=True)
class MemorySettings(Settings):
    use_memory: bool = knob(False, "learned memory embeddings ahead of the input", switch=True)
    memory_tokens: int = knob(3, "how many", low=1)


class Memory(ForwardChange):  # names no blocker: a prefix blocks static decoding and capture anyway
    def __init__(self, n, width):
        super().__init__()
        self.prefix_length = n
        self.memory_slots = nn.Parameter(torch.randn(n, width) * 0.02)

    def prefix_embeddings(self, batch):
        return self.memory_slots.expand(batch, -1, -1)


def attach(model, config):
    model.transformer.add_forward_change("memory", Memory(config.memory_tokens, config.n_embd))


register(Variant(name="memory", settings=MemorySettings, enabled=lambda c: c.use_memory, attach=attach,
                 tag=lambda c: f"memory{c.memory_tokens}", namespace="memory_slots",
                 prefix_positions=lambda c: c.memory_tokens if c.use_memory else 0,
                 not_mergeable="extra inputs, not a weight", lr_prior=LrPrior(1e-3, 1e-2, "toy variant")))
'''


@pytest.fixture
def toy_prefix_variant(tmp_path, monkeypatch):
    yield from variant_from_file(tmp_path, monkeypatch, "toy_memory_variant", TOY_PREFIX_VARIANT, "memory")


@pytest.mark.slow
def test_a_variant_that_changes_the_forward_pass_in_one_file_gets_everything(
    toy_prefix_variant, tiny_ckpt, tokenizer_dir, tmp_path
):
    """An embedding prefix through the ForwardChange hooks alone (nothing in model/ names it): only the
    input's positions come out, padding and causality hold, generation keeps the prefix in its cache,
    the length checks count it, and the command line trains it as an adapter."""
    from tests.test_variants import ids_batch

    no_dropout = {"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}
    model = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0], **no_dropout, use_memory=True, memory_tokens=3).eval()
    assert model.config.input_positions == model.config.n_positions - 3
    assert model.transformer.prefix is model.transformer.memory and set(model.adapter_params.values()) == {"memory"}
    assert "a forward change with a prefix" in model.transformer.static_decode_blocker()
    assert "a forward change with a prefix" in model.capture_blocker
    ids = ids_batch()
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape[:2] == ids.shape
        base = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0], **no_dropout).eval()
        assert (logits - base(ids).logits).abs().max() > 1e-4  # the prefix is attended
        changed = ids.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 1000
        assert torch.equal(logits[:, :8], model(changed).logits[:, :8])  # causal
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding: the row's real tokens see what they see unpadded
        assert (model(ids, attention_mask=mask).logits[0, 4:] - model(ids[:1, 4:]).logits[0]).abs().max() <= 1e-5
        out = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
        for step in range(4):  # each token decoded from the cache is the full forward's greedy choice
            assert torch.equal(model(out[:, : 5 + step]).logits[:, -1].argmax(-1), out[:, 5 + step])
    with pytest.raises(ValueError, match="3 virtual tokens"):
        model.generate(ids[:, :5], max_new_tokens=model.config.n_positions - 6)
    out_dir = tmp_path / "runs"
    flags = ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, out_dir), *QUICK, "--use_memory"]
    assert sentiment.main(flags) == 0
    record = json.loads((next(out_dir.glob("sst-memory3-*")) / "config.json").read_text())
    assert record["variants"] == ["memory"] and record["parameters"]["trainable"] == 3 * 32 + 32 * 5 + 5


# ---- layering ----------------------------------------------------------------------------------


LEAF_MODULES = [
    "modules.variant",
    "modules.registry",
    *[f"modules.{n}" for n in ("lora", "kan", "kan_ffn", "kan_lora", "kora", "graph", "attention", "mlp")],
]


def test_modules_is_a_leaf_layer():
    """No module of modules/ imports model/ (one fresh interpreter imports them all: if any pulled model
    in, it would be in sys.modules; the message names the first module after which it appeared)."""
    code = (
        "import importlib, sys\n"
        f"for name in {LEAF_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "    bad = [m for m in sys.modules if m == 'model' or m.startswith('model.')]\n"
        "    assert not bad, (name, bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]


def test_old_config_json_still_loads():
    old = {
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "resid_pdrop": 0.1,
        "use_kan": False,
        "use_lora": True,
        "use_graph": False,
        "lora_r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.05,
        "lora_targets": ["qkv", "attn_out", "mlp_in", "mlp_out"],
        "lora_layers": None,
        "lora_rslora": False,
        "lora_dora": False,
        "lora_init": "default",
        "lora_plus_ratio": 1.0,
        "use_kora": False,
        "kora_r": 8,
        "kora_d_comp": 64,
        "kora_target": "value",
        "kan_grid_size": 5,
        "kan_grid_range": [-2.0, 2.0],
        "kan_spline_order": 3,
        "kan_init": "mlp",
        "kan_hidden": None,
        "kan_base": "silu",
        "lora_kan_squash": True,
        "graph_heads": 4,
        "graph_window": None,
        "graph_dropout": 0.1,
        "graph_backend": "gatconv",
        "fine_tune_mode": None,
        "name": "gpt2",
    }
    config = GPT2Config.from_json(json.dumps(old))
    assert config.use_lora and config.lora_targets == ("qkv", "attn_out", "mlp_in", "mlp_out")
    assert config.kan_l1 == 0.0  # a knob added since gets its default
