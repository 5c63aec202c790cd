"""The forked GPT-2: config, stack, checkpoint loading, generation and tokenizer resolution."""

from model.config import SIZE_PRESETS, GPT2Config
from model.gpt2 import GPT2Layer, GPT2LMHeadModel, GPT2Model, GPT2Output
from model.loading import CheckpointError, LoadReport
from model.tokenizer import TokenizerNotFound, load_tokenizer

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
