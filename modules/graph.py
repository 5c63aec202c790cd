"""Causal graph-attention branch (torch_geometric GATConv) beside the block's self-attention.

Tokens are nodes; token i receives messages from tokens j with j ≤ i (and i - j < w when
`graph_window` = w), padding tokens have no edges. One GAT layer (Veličković et al., 2018):
    z = h W                                  (B, T, H, D)
    e_ij = LeakyReLU_0.2( a_dstᵀ z_i + a_srcᵀ z_j )   for edges j -> i
    α_ij = softmax_j e_ij,  g_i = ∥_heads Σ_j α_ij z_j + bias
and the block becomes  x + attn(ln_1 x) + γ · g(ln_1 x)  with the scalar gate γ initialised to 0,
so `use_graph=True` is exactly GPT-2 at step 0 (γ's gradient ⟨∂L/∂out, g⟩ is non-zero, so it opens).
Parameter namespace: `parallel_branches.graph.*`.

Backends (same parameters, same maths, agree to ≤ 1e-5):
* `gatconv`: torch_geometric's GATConv over ONE edge_index for the whole batch, built with tensor
  ops (a banded lower-triangular pattern offset per sequence, no Python loop over tokens or
  sequences). The per-length pattern is LRU-cached (64 shapes); the batch's edges, with those that
  touch padding dropped, are built once per forward and shared by every layer.
* `dense`: a masked dense softmax over (B, H, T, T) scores; also used by KV-cache decoding
  (it keeps z and a_srcᵀz of past tokens in the cache), whatever the backend.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.attention import KVCache
from modules.variant import LrPrior, Settings, Variant, knob, register


@dataclass(frozen=True)
class GraphSettings(Settings):
    use_graph: bool = knob(False, "graph-attention branch (torch_geometric GATConv) beside attention", switch=True)
    graph_heads: int = knob(4, "GAT heads (must divide n_embd)", low=1)
    graph_window: int | None = knob(None, "edges from the last w tokens only, self included (default: all)", low=1)
    graph_dropout: float = knob(0.1, "GAT attention dropout", low=0, high=1, high_open=True)
    graph_backend: Literal["gatconv", "dense"] = knob("gatconv", "gatconv (torch_geometric) | dense (same maths)")


def check_graph(config: Any) -> None:
    if config.n_embd % config.graph_heads:
        raise ValueError(f"GPT2Config.graph_heads must divide n_embd={config.n_embd}, got {config.graph_heads}")


_BANDS: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
# Distinct (length, window, device) patterns kept; each is O(T²/2) ints, not O(B·T²). A captured CUDA
# graph (train/trainer/graphs.py) reads its length's pattern at every replay, so a pattern used while capturing
# is pinned and never evicted (the fast step's static shapes give at most 8 lengths a task).
_BAND_CACHE_SIZE = 64
_LAST_EDGES: dict[str, Any] = {}  # the edges of the current forward (one entry), shared by every layer
_PINNED: set[tuple] = set()  # patterns read by captured CUDA graphs


def causal_band(seq: int, window: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) of one sequence's causal pattern, j ≤ i within the window; LRU-cached per length."""
    key = (seq, window, str(device))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _PINNED.add(key)  # a CUDA graph reads this pattern at every replay: never evicted
    if key in _BANDS:
        _BANDS.move_to_end(key)
        return _BANDS[key]
    # Built on the host with numpy, then copied: a `nonzero` on the device would make the host wait
    # for the GPU (and break CUDA graph capture) the first time each length is seen.
    pos = np.arange(seq)
    band = pos[None, :] <= pos[:, None]  # [i, j]: j <= i
    if window is not None:
        band &= (pos[:, None] - pos[None, :]) < window
    dst, src = (torch.from_numpy(index).to(device) for index in np.nonzero(band))
    _BANDS[key] = (src, dst)
    for old in [k for k in _BANDS if k not in _PINNED][: max(0, len(_BANDS) - _BAND_CACHE_SIZE)]:
        del _BANDS[old]  # least recently used first
    return src, dst


def causal_edge_index(batch: int, seq: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(2, E) edge_index, row 0 = source j, row 1 = target i, j ≤ i within the window, per sequence."""
    src, dst = causal_band(seq, window, device)
    offsets = (torch.arange(batch, device=device) * seq)[:, None]
    return torch.stack([(src[None] + offsets).reshape(-1), (dst[None] + offsets).reshape(-1)])


def batch_edges(batch: int, seq: int, window: int | None, padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """The batch's edges without any that touch padding, built once per forward: every layer gets
    the same padding_mask object, so later layers reuse the first layer's result."""
    key = (batch, seq, window, str(device))
    # While a CUDA graph is being captured, the edges are computed inside it (from the cached pattern),
    # never taken from or left in this cache: a graph must not read a tensor that may be freed later.
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    last = _LAST_EDGES.get("entry")
    if not capturing and last is not None and last[0] == key and last[1]() is padding_mask:
        return last[2]
    edges = causal_edge_index(batch, seq, window, device)
    if padding_mask is not None:
        valid = padding_mask.reshape(-1)
        edges = edges[:, valid[edges[0]] & valid[edges[1]]]
    if not capturing:
        _LAST_EDGES["entry"] = (key, (lambda: None) if padding_mask is None else weakref.ref(padding_mask), edges)
    return edges


class GraphBranch(nn.Module):
    def __init__(self, n_embd: int, heads: int, window: int | None, dropout: float, backend: str) -> None:
        super().__init__()
        # imported here, not at start-up (~2.5 s): command lines are validated before any model is built
        from torch_geometric.nn import GATConv

        self.heads, self.head_dim = heads, n_embd // heads
        self.window, self.dropout, self.backend = window, dropout, backend
        self.conv = GATConv(
            n_embd, self.head_dim, heads=heads, concat=True, dropout=dropout, add_self_loops=False
        )  # self edges are part of the causal pattern already
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        h: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """h: (B, T, C) normalised block input; padding_mask: (B, past + T) bool or None."""
        if kv_cache is None and self.backend == "gatconv":
            out = self._gatconv(h, padding_mask)
        else:
            out = self._dense(h, padding_mask, kv_cache, layer_idx)
        return self.gate * out

    def _gatconv(self, h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, width = h.shape
        edges = batch_edges(batch, seq, self.window, padding_mask, h.device)
        return self.conv(h.reshape(batch * seq, width), edges).view(batch, seq, width)

    def _dense(
        self, h: torch.Tensor, padding_mask: torch.Tensor | None, kv_cache: KVCache | None, layer_idx: int
    ) -> torch.Tensor:
        batch, seq, width = h.shape
        z = self.conv.lin(h).view(batch, seq, self.heads, self.head_dim)  # (B, T, H, D)
        a_src = (z * self.conv.att_src).sum(-1)  # (B, T, H)
        a_dst = (z * self.conv.att_dst).sum(-1)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            z, a_src = _cache_nodes(kv_cache, layer_idx, z, a_src)
        keys = torch.arange(past + seq, device=h.device)
        queries = torch.arange(past, past + seq, device=h.device)
        allowed = keys[None, :] <= queries[:, None]
        if self.window is not None:
            allowed &= (queries[:, None] - keys[None, :]) < self.window
        allowed = allowed[None, None]  # (1, 1, Tq, Tk)
        if padding_mask is not None:
            valid = padding_mask.bool()
            allowed = allowed & valid[:, None, None, :] & valid[:, None, past:, None]
        scores = F.leaky_relu(
            a_dst.transpose(1, 2)[..., :, None] + a_src.transpose(1, 2)[..., None, :], self.conv.negative_slope
        )  # (B, H, Tq, Tk)
        alpha = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # no edge -> 0
        alpha = F.dropout(alpha, self.dropout, self.training)
        out = alpha @ z.transpose(1, 2)  # (B, H, Tq, D)
        return out.transpose(1, 2).reshape(batch, seq, width) + self.conv.bias


def _cache_nodes(cache: KVCache, layer_idx: int, z: torch.Tensor, a_src: torch.Tensor):
    """Store this step's node features beside the KV cache; return those of every cached token."""
    key = ("graph", layer_idx)
    if key not in cache.extras:
        batch, _, heads, dim = z.shape
        cache.extras[key] = (z.new_empty(batch, cache.max_len, heads, dim), z.new_empty(batch, cache.max_len, heads))
    z_buf, a_buf = cache.extras[key]
    start, end = cache.length, cache.length + z.shape[1]
    z_buf[:, start:end], a_buf[:, start:end] = z, a_src
    return z_buf[:, :end], a_buf[:, :end]


def attach_graph(model: nn.Module, config: Any) -> None:
    for block in model.transformer.h:
        device = block.ln_1.weight.device
        block.parallel_branches["graph"] = GraphBranch(
            config.n_embd, config.graph_heads, config.graph_window, config.graph_dropout, config.graph_backend
        ).to(device)


def graph_tag(config: Any) -> str:
    window = "all" if config.graph_window is None else config.graph_window
    return f"graph-h{config.graph_heads}-w{window}-{config.graph_backend}"


register(
    Variant(
        name="graph",
        lr_prior=LrPrior(
            1e-4,
            5e-3,
            "GAT (Velickovic et al., 2018) trains from scratch at 5e-3 (Cora); a gated branch beside pretrained "
            "layers is searched down to LoRA's 1e-4",
        ),
        settings=GraphSettings,
        enabled=lambda c: c.use_graph,
        attach=attach_graph,
        tag=graph_tag,
        namespace="graph",
        check=check_graph,
        not_mergeable="the graph-attention branch is a separate attention path, not a weight update of GPT-2",
    )
)
