"""LoRA-KAN equals kolmg-lora's KOLMGLoRALinear; the graph branch's two backends agree, its edges
are causal and skip padding; KAN FFN parameter matching."""

from __future__ import annotations

import pytest
import torch

import modules.graph as graph_module
from model import GPT2Config, GPT2LMHeadModel
from modules.graph import GraphBranch, causal_band, causal_edge_index
from modules.kan_ffn import matched_hidden_width, random_kan_ffn
from modules.kan_lora import KANLoRALinear
from tests.conftest import VOCAB


@pytest.mark.parametrize("dora", [False, True], ids=["kolmg-lora", "kolmg-dora"])
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_kan_equals_kolmg_lora(order, rslora, dora):
    """LoRA-KAN = KOLMGLoRALinear; with lora_dora (KOLMG-DoRA) = KOLMGDoRALinear (use_dora=True)."""
    from kolmg_lora import KOLMGDoRALinear, KOLMGLoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    ref = (KOLMGDoRALinear if dora else KOLMGLoRALinear)(
        base, rank=4, alpha=8.0, rs_lora=rslora, grid_size=4, spline_order=order, grid_range=(-1.0, 1.0)
    ).eval()
    kan = ref.kan
    with torch.no_grad():  # non-trivial φ_out and scalers, small enough to keep values inside the grid
        kan.in_base_weight.mul_(0.1)
        kan.in_spline_weight.normal_(0, 0.05)
        kan.in_spline_scaler.uniform_(0.5, 1.5)
        kan.out_base_weight.normal_(0, 0.2)
        kan.out_spline_weight.normal_(0, 0.2)
        kan.out_spline_scaler.uniform_(0.5, 1.5)
        if dora:
            assert torch.allclose(ref.magnitude.squeeze(1), base.weight.norm(dim=1))  # m = ‖W‖_row at init
            ref.magnitude.mul_(torch.empty_like(ref.magnitude).uniform_(0.5, 1.5))
    config = GPT2Config.from_preset(
        "tiny",
        lora_r=4,
        lora_alpha=8.0,
        lora_rslora=rslora,
        kan_grid_size=4,
        kan_spline_order=order,
        kan_grid_range=(-1.0, 1.0),
        lora_kan_squash=False,
        lora_dropout=0.0,
        lora_dora=dora,
    )
    ours = KANLoRALinear(base, config).eval()
    if dora:
        assert torch.allclose(ours.kan_magnitude, base.weight.norm(dim=1))
        with torch.no_grad():
            ours.kan_magnitude.copy_(ref.magnitude.squeeze(1))
    else:
        assert ours.kan_magnitude is None
    with torch.no_grad():  # the scaler is folded into our coefficients (c = w_spline · scaler)
        ours.kan_in.base_weight.copy_(kan.in_base_weight)
        ours.kan_in.spline_coeff.copy_(kan.in_spline_weight * kan.in_spline_scaler[..., None])
        ours.kan_out.base_weight.copy_(kan.out_base_weight)
        ours.kan_out.spline_coeff.copy_(kan.out_spline_weight * kan.out_spline_scaler[..., None])
    x = torch.rand(64, 12) * 1.6 - 0.8
    with torch.no_grad():
        hidden = ours.kan_in(x)
        assert hidden.abs().max() < 1.0  # inside the grid, where both definitions agree
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
        assert (ours(x) - base(x)).abs().max().item() > 1e-3  # the adapter is doing something


def test_kolmg_dora_magnitudes_train_in_adapters_mode_with_the_lora_plus_rate():
    from model.trainable import build_param_groups, set_trainable

    model = GPT2LMHeadModel(GPT2Config.from_preset("tiny", use_lora=True, use_kan=True, lora_dora=True))
    magnitudes = {n for n, _ in model.named_parameters() if n.endswith(".kan_magnitude")}
    assert len(magnitudes) == model.config.n_layer * len(model.config.lora_targets)
    set_trainable(model, "adapters")
    assert all(p.requires_grad for n, p in model.named_parameters() if n in magnitudes)
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.1, lora_plus_ratio=16.0)
    in_group = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if name in magnitudes:
            assert in_group[id(param)]["lr"] == 16e-3 and in_group[id(param)]["weight_decay"] == 0.0
    model(torch.randint(0, model.config.vocab_size, (2, 7))).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in magnitudes)


def test_lora_kan_squash_keeps_inputs_inside_grid():
    config = GPT2Config.from_preset("tiny", use_lora=True, use_kan=True, kan_grid_range=(-2.0, 3.0))
    layer = KANLoRALinear(torch.nn.Linear(4, 4), config)
    squashed = layer._into_grid(torch.tensor([-100.0, 0.0, 100.0]))
    assert squashed.min() >= -2.0 and squashed.max() <= 3.0 and -2.0 < squashed[1] < 3.0


def test_edge_index_is_causal_windowed_cached():
    edges = causal_edge_index(3, 6, 2, torch.device("cpu"))
    src, dst = edges
    assert bool((src <= dst).all()) and bool(((dst - src) < 2).all())
    assert bool((src // 6 == dst // 6).all())  # never across sequences
    assert edges.shape[1] == 3 * (6 + 5)  # self edges + one predecessor each
    assert causal_band(6, 2, torch.device("cpu"))[0] is causal_band(6, 2, torch.device("cpu"))[0]  # cached


def test_edge_cache_stays_small_over_many_evaluation_shapes():
    """100 evaluation shapes at B=32 once held 101 (B, T)-keyed edge tensors (1.67 GiB at gpt2 lengths);
    now at most 64 per-length patterns stay, each independent of the batch size."""
    for seq in range(8, 108):
        causal_edge_index(32, seq, None, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for pair in graph_module._BANDS.values() for t in pair)
    assert len(graph_module._BANDS) <= 64
    assert held <= 64 * 2 * 8 * (107 * 108 // 2)  # 64 lengths x (src, dst) x int64 x one sequence's edges


def test_graph_edges_are_built_once_per_forward(monkeypatch):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=2, n_embd=16, n_positions=32, vocab_size=50, use_graph=True)
    model = GPT2LMHeadModel(config).eval()
    calls = []
    original = graph_module.causal_edge_index
    monkeypatch.setattr(graph_module, "causal_edge_index", lambda *a: calls.append(a) or original(*a))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding: edges from padding must be dropped, once, for all 3 layers
    model(torch.randint(0, 50, (2, 7)), attention_mask=mask)
    assert len(calls) == 1


@pytest.mark.parametrize("window", [None, 3])
def test_backends_agree_with_padding(window):
    torch.manual_seed(0)
    branch = GraphBranch(16, 4, window, 0.0, "gatconv").eval()
    with torch.no_grad():
        branch.gate.fill_(1.0)
        branch.conv.bias.normal_()
    h = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[2, 5:] = False  # right padding
    with torch.no_grad():
        sparse = branch(h, mask)
        branch.backend = "dense"
        dense = branch(h, mask)
    assert (sparse[mask] - dense[mask]).abs().max().item() <= 1e-5
    # padding tokens send nothing: changing them leaves real tokens' outputs unchanged
    h2 = h.clone()
    h2[~mask] = torch.randn(int((~mask).sum()), 16)
    branch.backend = "gatconv"
    with torch.no_grad():
        assert (branch(h2, mask)[mask] - sparse[mask]).abs().max().item() <= 1e-6


def test_graph_model_backends_agree(model_ckpt):
    torch.manual_seed(0)
    a = GPT2LMHeadModel.from_pretrained(model_ckpt[0], use_graph=True, graph_dropout=0.0).eval()
    b = GPT2LMHeadModel.from_pretrained(model_ckpt[0], use_graph=True, graph_dropout=0.0, graph_backend="dense").eval()
    with torch.no_grad():
        for block in a.transformer.h:
            block.parallel_branches["graph"].gate.fill_(0.5)
        b.load_state_dict(a.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() <= 1e-5


def test_kan_ffn_parameter_matching():
    config = GPT2Config.from_preset("gpt2", use_kan=True, kan_init="random")
    hidden = matched_hidden_width(768, 3072, config.kan_grid_size, config.kan_spline_order)
    ffn = random_kan_ffn(config)
    mlp_params = 2 * 768 * 3072 + 3072 + 768
    kan_params = sum(p.numel() for p in ffn.parameters())
    assert ffn.kan_fc.out_features == hidden
    assert abs(kan_params - mlp_params) / mlp_params < 0.01
