"""Keeping bitsandbytes out of processes that do not quantise.

peft imports bitsandbytes whenever it is installed: `peft.helpers` at import, and LoRA's layer
dispatch (`LoraModel._create_new_module`) at every attach. That import costs about 3 s on a 2-core CPU,
on top of peft's own, for every run that uses peft but not `--quantize`. While peft works inside
`peft_sees_bitsandbytes(False)`, bitsandbytes is invisible to it (`sys.modules["bitsandbytes"] = None`
makes `importlib.util.find_spec` and `import` report it missing), and peft's cached answers are reset
on the way in and out, so a later quantised model in the same process gets peft's bitsandbytes layers.
Once bitsandbytes has really been imported, nothing is hidden (there is nothing left to save).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

NAME = "bitsandbytes"


@contextlib.contextmanager
def peft_sees_bitsandbytes(visible: bool) -> Iterator[None]:
    hide = not visible and sys.modules.get(NAME, False) is False  # installed or not, never imported yet
    if visible and sys.modules.get(NAME, False) is None:
        del sys.modules[NAME]  # a placeholder left by an outer hiding block
    if hide:
        sys.modules[NAME] = None  # type: ignore[assignment]
    _forget_peft_answers()
    try:
        yield
    finally:
        if hide and sys.modules.get(NAME, False) is None:
            del sys.modules[NAME]
        _forget_peft_answers()


def _forget_peft_answers() -> None:
    utils = sys.modules.get("peft.import_utils")
    if utils is not None:
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            getattr(getattr(utils, name, None), "cache_clear", lambda: None)()
