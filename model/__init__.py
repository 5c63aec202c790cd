"""The forked GPT-2: config, stack, checkpoint loading, generation and tokenizer resolution.

The names below load on first use (PEP 562), so `import model.files` (atomic writes, JSON reading) does
not import torch: a launcher or report process that only reads run folders stays light.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {
    "SIZE_PRESETS": "model.config",
    "GPT2Config": "model.config",
    "GPT2Layer": "model.gpt2",
    "GPT2LMHeadModel": "model.gpt2",
    "GPT2Model": "model.gpt2",
    "GPT2Output": "model.gpt2",
    "CheckpointError": "model.loading",
    "LoadReport": "model.loading",
    "TokenizerNotFound": "model.tokenizer",
    "load_tokenizer": "model.tokenizer",
}
__all__ = [
    "SIZE_PRESETS",
    "GPT2Config",
    "GPT2Layer",
    "GPT2LMHeadModel",
    "GPT2Model",
    "GPT2Output",
    "CheckpointError",
    "LoadReport",
    "TokenizerNotFound",
    "load_tokenizer",
]

if TYPE_CHECKING:
    from model.config import SIZE_PRESETS, GPT2Config
    from model.gpt2 import GPT2Layer, GPT2LMHeadModel, GPT2Model, GPT2Output
    from model.loading import CheckpointError, LoadReport
    from model.tokenizer import TokenizerNotFound, load_tokenizer


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
