"""Shared fixtures: small randomly initialised Hugging Face GPT-2 checkpoints in temp folders.

No pretrained weights can be downloaded here, so parity and loading are tested on HF models we
build and save ourselves; the real `from_pretrained("gpt2")` path is the same code with a hub id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import transformers

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
TOKENIZER_DIR = SHARED / "tokenizer" / "gpt2"
DATA_DIR = SHARED / "data" / "cs224n"

PLUGINS = REPO / "tests" / "plugins"
# GPT2_TEST_DEVICE=cuda runs the parity tests and every CLI training/evaluation test on that device
# (default cpu, so a GPU box does not silently switch the suite to CUDA and bf16).
TEST_DEVICE = os.environ.get("GPT2_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    # Triton kernels (modules/kan_triton.py) run on the CPU through Triton's interpreter. It must be on
    # before anything imports triton (torch.compile's tests do): triton.language's own helpers
    # (tl.zeros, ...) are decorated once, at that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch and transformers are imported where used, not here: pytest-xdist's controller loads this file and
# runs no test


def pytest_configure(config: pytest.Config) -> None:
    if TEST_DEVICE.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"GPT2_TEST_DEVICE={TEST_DEVICE}, but CUDA is not available on this machine")
    # every process the tests start loads the test plugin (tests/plugins/sitecustomize.py: step hooks)
    os.environ["PYTHONPATH"] = plugin_env()["PYTHONPATH"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Runs where tests run (pytest-xdist's workers collect; its controller does not). The end-to-end
    tests go first, so the two workers share them and the quick tests fill the end of the run instead
    of a long test starting last while the other worker idles. The order within each kind is kept."""
    import transformers

    transformers.logging.set_verbosity_error()
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The modules imported so far (torch, transformers, peft, ours: about 500,000 objects) live until the
    session ends: frozen out of the cyclic garbage collector, they are not scanned again by each full
    collection (the in-process launcher runs one after every job, Python its own now and then), which
    then costs what the tests created since, not 0.2-0.3 s."""
    import gc

    gc.freeze()


def run_paths(model, tokenizer_dir, out_dir=None) -> list[str]:
    """The path flags of a training or evaluation command: model, tokenizer, the shared data, output."""
    flags = ["--model", str(model), "--tokenizer", str(tokenizer_dir), "--data_dir", str(DATA_DIR)]
    flags += ["--device", TEST_DEVICE]
    return flags + (["--out_dir", str(out_dir)] if out_dir is not None else [])


def perturb_adapters(model, scale: float = 0.05, seed: int = 1):
    """Move every adapter parameter away from its init (seeded), so parity checks are not at identity."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in model.adapter_params:
                param.add_(scale * torch.randn(param.shape, generator=gen))
    return model.eval()


def data_limits(train: int, dev: int = 4, test: int = 2, batch: int = 4) -> list[str]:
    """Flags for a quick run on the first examples of each split."""
    flags = {"train_limit": train, "dev_limit": dev, "test_limit": test, "batch_size": batch}
    return [word for key, value in flags.items() for word in (f"--{key}", str(value))]


def plugin_env(**variables: str) -> dict[str, str]:
    """Environment for a subprocess that loads the test plugin (tests/plugins/sitecustomize.py)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PLUGINS)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), *paths]), **variables}


def start_grid(cmd: list[str], **env: str) -> subprocess.Popen:
    """An ablate command in its own session, output discarded (a test kills it mid-grid); `env`: extra
    variables (e.g. GPT2_TEST_STEP_SLEEP to slow its steps)."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=plugin_env(**env),
    )


@dataclasses.dataclass
class Ran:
    """What a command run in this process left: as subprocess.CompletedProcess has it."""

    returncode: int
    stdout: str
    stderr: str


def run_command(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Ran:
    """A project command (`[sys.executable, "-m", module, *args]`, or `["-m", module, *args]`) run in
    this process, as the grid's in-process launcher runs one: its `main(args)`, its exit status and
    output. For its duration: `env`'s variables are set (a thread count in OMP_NUM_THREADS is applied),
    the working directory is `cwd`, sys.argv is the command's (its usage line), log records go to its
    stderr, and the GPT2_TEST_* step hooks of tests/plugins/sitecustomize.py are on. Only tests of what
    a process itself does (signals to it, SIGKILL, torchrun, a fresh interpreter) start real ones."""
    import importlib
    import io
    import logging
    import sys

    import torch

    words = list(argv)
    if words and words[0] == sys.executable:
        words = words[1:]
    assert words[:1] == ["-m"], f"not a `python -m` command: {argv}"
    module, args = words[1], words[2:]
    name = "train.cli.entry" if module == "train" else module
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved_env, saved_argv, saved_cwd, threads = dict(os.environ), sys.argv, os.getcwd(), torch.get_num_threads()
    os.environ.update(env or {})
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        if (os.environ.get("OMP_NUM_THREADS") or "").isdigit():
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        sys.argv = [str(REPO / (module.replace(".", "/") + (".py" if "." in module else "/__main__.py"))), *args]
        logging.getLogger().addHandler(handler)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _test_hooks():
            try:
                code = importlib.import_module(name).main(args) or 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
    finally:
        logging.getLogger().removeHandler(handler)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    return Ran(int(code), out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _test_hooks():
    """The plugin's optimizer-step hooks (GPT2_TEST_STEP_SLEEP, ...), on for a command run in this process."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpt2_test_hooks", PLUGINS / "sitecustomize.py")
    original = torch.optim.AdamW.step
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    hooks.install_test_hooks()
    try:
        yield
    finally:
        torch.optim.AdamW.step = original


def kill_and_wait(process: subprocess.Popen, *, group: bool = False) -> int:
    """SIGKILL a process the test started (its whole process group with `group`) and wait until it is
    gone. Returns its exit status."""
    if process.poll() is None:  # never signal a pid that was reaped already (it may be another process's)
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    return process.wait(timeout=60)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for torch.distributed's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_folder(folder: Path):
    """A local HTTP server for `folder` (127.0.0.1, a free port); yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def write_grid_preset(path: Path, tokenizer_dir: Path, name: str, **common) -> Path:
    """A one-task (sst), two-seed, base-only grid preset on a tiny random checkpoint; `common` adds flags."""
    flags = {"data_dir": str(DATA_DIR), "tokenizer": str(tokenizer_dir), **common, "wandb": "disabled"}
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in flags.items())
    path.write_text(
        f'name = "{name}"\ntasks = ["sst"]\nseeds = [1, 2]\nbaseline = "base"\n'
        f'[model]\nrandom_init = "tiny"\n[common]\n{lines}\n[variants]\nbase = []\n'
    )
    return path


def make_hf_checkpoint(directory: Path, seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**config)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    # Random init leaves biases and LayerNorm at 0/1; perturb them so the name map is really tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


# Model-level tests (parity, loading, variants, generation) need no tokenizer: their checkpoint has a
# small vocabulary, so the embedding and LM head (50,257 x width in the real one) stop dominating
# their cost. Token ids below VOCAB are valid for every test checkpoint; PAD is a valid padding id.
VOCAB = 1024
PAD = VOCAB - 1


@pytest.fixture(scope="session")
def model_ckpt(tmp_path_factory) -> tuple[Path, transformers.GPT2LMHeadModel]:
    """The tiny stack (2 blocks, 2 heads, width 32) with a VOCAB-token vocabulary."""
    path = tmp_path_factory.mktemp("model_gpt2")
    hf = make_hf_checkpoint(path, n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=VOCAB)
    return path, hf


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, transformers.GPT2LMHeadModel]:
    """The tiny stack with the real 50,257-token vocabulary, for tests that use the real tokenizer."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    hf = make_hf_checkpoint(path, n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    return path, hf


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> tuple[Path, transformers.GPT2LMHeadModel]:
    """gpt2-small shaped (width 768, 12 heads, full vocabulary) with 2 layers."""
    path = tmp_path_factory.mktemp("small_gpt2")
    hf = make_hf_checkpoint(path, seed=1, n_layer=2, n_head=12, n_embd=768, n_positions=256, vocab_size=50257)
    return path, hf


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"the shared GPT-2 tokenizer is missing at {TOKENIZER_DIR} (set SHARED_DIR)")
    return TOKENIZER_DIR
