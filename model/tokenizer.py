"""Resolve the GPT-2 tokenizer: an explicit path, else $GPT2_TOKENIZER, else "gpt2" from the hub.

A folder (its tokenizer.json, or vocab.json + merges.txt) is read by the `tokenizers` library itself
(`GPT2BPE`: the byte-level BPE that transformers' GPT2TokenizerFast wraps, without importing
transformers: about 0.8 s less start-up for every command on this project's CPU); a test checks its ids
and texts equal transformers' on every line of the task data. A hub id is loaded with `AutoTokenizer.from_pretrained`.
Either is checked against known ids before it is returned (in transformers >= 5, building
`GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently yields an empty tokenizer). The pad token
is EOS (GPT-2 has none).
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


class GPT2BPE:
    """GPT-2's tokenizer read from a `tokenizer.json` by the `tokenizers` library, with the part of the
    transformers tokenizer API this code uses: `tok(texts, add_special_tokens=...)["input_ids"]`,
    `encode`, `decode`, `eos_token(_id)` and `pad_token(_id)` (EOS)."""

    eos_token = pad_token = "<|endoftext|>"

    def __init__(self, folder: Path) -> None:
        """From `folder`'s tokenizer.json, else from its vocab.json + merges.txt (GPT-2's byte-level BPE:
        no prefix space, its special token <|endoftext|>)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        if (folder / "tokenizer.json").is_file():
            try:
                self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as error:  # the library's message names a line and column, not the file
                raise ValueError(f"{folder / 'tokenizer.json'}: {error}") from error
            self.backend.no_truncation()  # a file may store them; transformers ignores them unless asked
            self.backend.no_padding()
        else:
            self.backend = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            self.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.backend.decoder = decoders.ByteLevel()
            self.backend.add_special_tokens([AddedToken(self.eos_token, special=True)])
        self.eos_token_id = self.pad_token_id = self.backend.token_to_id(self.eos_token)
        if self.eos_token_id is None:
            raise ValueError(f"{folder} has no {self.eos_token} token")

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        batch = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in batch]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        # transformers keeps special tokens unless told; the tokenizers library drops them unless told
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend.get_vocab_size()


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
        if looks_local:
            tokenizer = GPT2BPE(folder)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            tokenizer.pad_token = tokenizer.eos_token
    except Exception as error:
        reason = hub_unreachable() if not looks_local else None
        detail = (
            f"the hub is not used ({reason}) and it is not cached" if reason else f"{type(error).__name__}: {error}"
        )
        raise TokenizerNotFound(f"could not load the GPT-2 tokenizer {source!r} ({origin}): {detail}. {fix}") from error
    for text, ids in _KNOWN.items():
        got = tokenizer.encode(text)
        if got != ids:
            raise TokenizerNotFound(
                f"the tokenizer loaded from {source!r} is not GPT-2's BPE: {text!r} -> {got}, expected {ids} "
                f"(an empty or different vocabulary)"
            )
    return tokenizer
