"""Resolve the GPT-2 tokenizer: an explicit path, else $GPT2_TOKENIZER, else "gpt2" from the hub.

Loaded with `AutoTokenizer.from_pretrained(dir)`: in transformers >= 5, building
`GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently yields an empty tokenizer, so the
result is checked against known ids before it is returned. The pad token is set to EOS (GPT-2 has
no pad token).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV_VAR = "GPT2_TOKENIZER"
# Known encodings of the real GPT-2 BPE, used as a sanity check.
_KNOWN = {"Hello world": [15496, 995], " yes": [3763], " no": [645]}


class TokenizerNotFound(RuntimeError):
    pass


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The GPT-2 tokenizer from a folder, $GPT2_TOKENIZER or the hub, checked on known texts. Loaded once
    per process and source (a run checks it before anything loads, then uses it: one load, not two)."""
    source = str(path) if path is not None else os.environ.get(ENV_VAR) or "gpt2"
    key = str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else source
    if key not in _LOADED:
        _LOADED[key] = _load(source, path)
    return _LOADED[key]


_LOADED: dict[str, Any] = {}


def _load(source: str, path: str | Path | None) -> Any:
    from transformers import AutoTokenizer

    origin = "argument" if path is not None else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "hub default")
    from model.hub import hub_unreachable

    fix = (
        f"Pass a folder holding tokenizer.json (or vocab.json + merges.txt) with --tokenizer, set {ENV_VAR} to "
        "one, or allow Hugging Face hub access so 'gpt2' can be downloaded."
    )
    folder = Path(source).expanduser()
    looks_local = folder.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local:  # a folder: say what is wrong with it, not what the hub client thinks of the name
        if not folder.exists():
            raise TokenizerNotFound(f"tokenizer folder {source} ({origin}) does not exist. {fix}")
        if not folder.is_dir():
            raise TokenizerNotFound(f"tokenizer {source} ({origin}) is a file, not a folder. {fix}")
        has = {p.name for p in folder.iterdir()}
        if "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
            listing = ", ".join(sorted(has)[:8]) or "nothing"
            raise TokenizerNotFound(
                f"tokenizer folder {source} ({origin}) holds no GPT-2 tokenizer: expected tokenizer.json or "
                f"vocab.json + merges.txt, found {listing}. {fix}"
            )
    local_only = not looks_local and hub_unreachable() is not None  # use the cache, do not retry
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except Exception as error:
        reason = hub_unreachable() if not looks_local else None
        detail = f"the hub is not used ({reason}) and it is not cached" if reason else type(error).__name__
        raise TokenizerNotFound(f"could not load the GPT-2 tokenizer {source!r} ({origin}): {detail}. {fix}") from error
    for text, ids in _KNOWN.items():
        got = tokenizer.encode(text)
        if got != ids:
            raise TokenizerNotFound(
                f"the tokenizer loaded from {source!r} is not GPT-2's BPE: {text!r} -> {got}, expected {ids} "
                f"(an empty or different vocabulary)"
            )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
