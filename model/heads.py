"""Task heads. All read the hidden state of the LAST REAL token (never a padded position).

* LastTokenClassifier: linear on that state (SST: 5 classes, CFIMDB: 2, Quora's linear head: 2),
  as the course does.
* ClozeParaphraseHead: the LM head's logits of the answer tokens only, [no, yes] -> classes [0, 1]:
  h · wte[[no, yes]]ᵀ, two dot products instead of a (C x 50,257) matmul; equal to the full LM
  logits at those ids.
"""

from __future__ import annotations

import torch
from torch import nn

YES_ID, NO_ID = 8505, 3919  # "yes", "no" in GPT-2's BPE


def lm_head_weight(lm_head: nn.Module) -> torch.Tensor:
    """The (V, C) matrix the LM head computes with: its weight, or, when an adapter replaces rows of it
    (peft's trainable tokens, tied to the embedding), the merged matrix."""
    merged = getattr(lm_head, "get_merged_weights", None)
    return merged(lm_head.active_adapters) if merged is not None else lm_head.weight


def last_token_index(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Index of the last real token of each row (left or right padding)."""
    if attention_mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long)
    positions = torch.arange(seq, device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def last_token_state(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    index = last_token_index(attention_mask, hidden.shape[0], hidden.shape[1]).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, C)


class LastTokenClassifier(nn.Module):
    def __init__(self, n_embd: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_embd, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.classifier(self.dropout(last_token_state(hidden, attention_mask)))


class ClozeParaphraseHead(nn.Module):
    """No parameters of its own: it reads the (tied) LM head's rows of the two answer tokens."""

    def __init__(self, lm_head: nn.Linear, no_id: int = NO_ID, yes_id: int = YES_ID) -> None:
        super().__init__()
        self.lm_head = [lm_head]  # a list, so the LM weights are not registered twice
        self.register_buffer("answer_ids", torch.tensor([no_id, yes_id]), persistent=False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        rows = lm_head_weight(self.lm_head[0])[self.answer_ids]  # (2, C)
        return last_token_state(hidden, attention_mask) @ rows.t()  # (B, 2): [no, yes]
