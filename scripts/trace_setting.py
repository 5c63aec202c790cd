"""How far one setting travels, and how often a run reads its config: a measurement for the training layer.

    python scripts/trace_setting.py --model ckpt/tiny --out_dir /tmp/trace
    PYTHONPATH=/path/to/older/checkout python scripts/trace_setting.py --root /path/to/older/checkout ...

Runs one tiny LoRA run in process (`--lora_r 13`, 1 step) and reports:
- the project files and functions a `--lora_r` value is passed to, from the command line to the
  model's first forward: every call whose arguments (not `self`) hold the value 13, directly or
  inside a dict, Namespace, config or spec;
- how many times GPT2Config is built, and the checkpoint's config.json read.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

SENTINEL = 13


def holds(value, depth: int = 0) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value == SENTINEL
    if depth > 2:
        return False
    if isinstance(value, list | tuple):
        return any(holds(v, depth + 1) for v in value[:64] if not isinstance(v, str))
    if isinstance(value, dict):
        return value.get("lora_r") == SENTINEL or any(
            holds(v, depth + 1) for k, v in list(value.items())[:200] if isinstance(v, dict | argparse.Namespace)
        )
    for attr in ("lora_r", "args", "config", "spec", "r"):
        try:
            inner = getattr(value, attr, None) if not isinstance(value, type) else None
        except Exception:  # noqa: BLE001 - a property that cannot be read holds nothing we follow
            continue
        if inner is not None and not callable(inner) and holds(inner, depth + 1):
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a small checkpoint folder")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the tree measured")
    args = parser.parse_args()
    root = str(Path(args.root).resolve())
    seen: dict[str, set[str]] = {}
    counts: collections.Counter = collections.Counter()
    done = False

    def profile(frame, event, arg):
        nonlocal done
        code = frame.f_code
        path = code.co_filename
        if done or event != "call" or not path.startswith(root + os.sep) or "site-packages" in path:
            return
        if path.startswith(tuple(os.path.join(root, d) + os.sep for d in ("tests", "scripts", ".venv", ".ci"))):
            return
        rel = os.path.relpath(path, root)
        name = getattr(code, "co_qualname", code.co_name)
        if rel == "model/gpt2.py" and code.co_name == "forward":
            done = True
            seen.setdefault(rel, set()).add(name)
            return
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        values = [frame.f_locals.get(n) for n in names if n not in ("self", "cls")]
        if code.co_flags & 0x08:  # **kwargs
            values.append(frame.f_locals.get(code.co_varnames[len(names) + (1 if code.co_flags & 0x04 else 0)]))
        if any(holds(v) for v in values):
            seen.setdefault(rel, set()).add(name)

    import model.config
    import model.loading  # noqa: F401 - imported before the run so the counters below see every call

    build = model.config.GPT2Config.__init__

    def counted_init(self, **values):
        counts["GPT2Config built"] += 1
        return build(self, **values)

    model.config.GPT2Config.__init__ = counted_init
    read_text = Path.read_text

    def counted_read(self, *a, **k):
        if self.name == "config.json" and (self.parent / "model.safetensors").exists():
            counts["checkpoint config.json read"] += 1
        return read_text(self, *a, **k)

    Path.read_text = counted_read
    try:
        from train.cli import entry
    except ImportError:  # a tree from before train/ had rooms (--root)
        from train import entry

    argv = ["--task", "sst", "--model", args.model, "--use_lora", "--lora_r", str(SENTINEL), "--train_limit", "8"]
    argv += ["--dev_limit", "4", "--test_limit", "2", "--batch_size", "4", "--max_steps", "1"]
    argv += ["--out_dir", args.out_dir, "--wandb", "disabled"]
    sys.setprofile(profile)
    try:
        status = entry.main(argv)
    finally:
        sys.setprofile(None)
        Path.read_text = read_text
    result = {
        "status": status,
        "files": len(seen),
        "functions": sum(len(v) for v in seen.values()),
        **counts,
        "by_file": {k: sorted(v) for k, v in sorted(seen.items())},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    try:
        from train.cli.exits import exit_status
    except ImportError:  # an older checkout measured through PYTHONPATH (before train/cli/exits.py existed)
        sys.exit(main())
    sys.exit(exit_status(main))
