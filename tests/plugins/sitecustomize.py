"""Test-only plugin, loaded by Python at start-up when tests put this folder on PYTHONPATH.

It lets tests steer training processes they start as subprocesses (torchrun ranks, ablation jobs)
without test hooks in the production code, by wrapping the optimizer step in the project's commands
(`python -m train...` / `python -m experiments...`, torchrun's launcher, `python scripts/X.py`; other
Python processes, such as submitit's, are left as they are):
* GPT2_TEST_STEP_SLEEP=S   sleep S seconds after every optimizer step (so a test can kill mid-epoch);
* GPT2_TEST_STEP_GATE=F    after every optimizer step, wait while the file F exists (a test holds the run
                           mid-epoch for as long as it needs, then deletes F);
* GPT2_TEST_DUMP_GRADS=F   before the first optimizer step, write every parameter's gradient to the
                           safetensors file F (rank 0 only), keyed by param-group and position;
* GPT2_TEST_RNG_LOG=D      after every optimizer step, append a fingerprint of this process's torch RNG
                           state to D/rank<RANK>.txt (so tests can see each rank's stream);
* GPT2_TEST_SIGTERM_AT=N   after optimizer step N (counted in this process), rank 0 sends itself SIGTERM.

It is also the client of the test fork server (tests/plugins/zygote.py): with GPT2_TEST_ZYGOTE set to
the server's socket, a `python -m train...` / `python -m experiments...` process hands its command to a
worker forked from the server (imports done) and mirrors it: signals forwarded, the same exit.
"""

import os
import sys

_KEYS = ("GPT2_TEST_STEP_SLEEP", "GPT2_TEST_STEP_GATE", "GPT2_TEST_DUMP_GRADS", "GPT2_TEST_RNG_LOG")
_KEYS += ("GPT2_TEST_SIGTERM_AT",)
# the packages whose `python -m` commands the fork server runs, and the folder whose scripts it runs
# (`python scripts/X.py`); submitit's job processes run on their own (its local executor watches them)
# and without the hooks (they only wait for the run's process, which has them)
_ROUTED = ("train", "experiments")
_ROUTED_MODULES = ("torch.distributed.run",)  # torchrun's launcher (its ranks are `python -m train...`)
_PROBE = "plugins.probe"  # tests/test_fork_server.py's own command (run from tests/)
_SCRIPTS = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))


def install_test_hooks() -> None:
    if not any(os.environ.get(key) for key in _KEYS):
        return
    import hashlib
    import signal
    import time

    import torch
    from safetensors.torch import save_file

    _original_step = torch.optim.AdamW.step
    _state = {"dumped": False, "steps": 0}

    def _step(self, *args, **kwargs):
        target = os.environ.get("GPT2_TEST_DUMP_GRADS")
        if target and not _state["dumped"] and os.environ.get("RANK", "0") == "0":
            grads = {
                f"{g}.{i}": p.grad.detach().clone()
                for g, group in enumerate(self.param_groups)
                for i, p in enumerate(group["params"])
                if p.grad is not None
            }
            save_file(grads, target)
            _state["dumped"] = True
        result = _original_step(self, *args, **kwargs)
        _state["steps"] += 1
        rank = os.environ.get("RANK", "0")
        if log := os.environ.get("GPT2_TEST_RNG_LOG"):
            digest = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
            with open(os.path.join(log, f"rank{rank}.txt"), "a") as handle:
                handle.write(digest + "\n")
        if os.environ.get("GPT2_TEST_SIGTERM_AT") == str(_state["steps"]) and rank == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(float(os.environ.get("GPT2_TEST_STEP_SLEEP", "0") or 0))
        gate = os.environ.get("GPT2_TEST_STEP_GATE")
        while gate and os.path.exists(gate):
            time.sleep(0.02)
        return result

    torch.optim.AdamW.step = _step


def _project_command() -> tuple[dict, list[str], list[str]] | None:
    """(target, arguments, interpreter options) when this process runs one of the project's commands
    (`python [-u] [-B] -m train...|experiments...`, torchrun's launcher, the fork server's probe, or
    `python scripts/X.py`); None for any other Python process (submitit's job and controller processes,
    multiprocessing's children, ...), which neither goes to the fork server nor gets the hooks."""
    options = []
    rest = sys.orig_argv[1:]
    while rest and rest[0] in ("-u", "-B"):  # interpreter options the worker can honour
        options.append(rest.pop(0))
    routed = len(rest) >= 2 and (rest[1].split(".")[0] in _ROUTED or rest[1] in (_PROBE, *_ROUTED_MODULES))
    if rest[:1] == ["-m"] and routed:
        return {"module": rest[1]}, rest[2:], options
    if rest and rest[0].endswith(".py") and os.path.dirname(os.path.realpath(rest[0])) == _SCRIPTS:
        return {"script": os.path.realpath(rest[0])}, rest[1:], options
    return None


def _run_through_zygote(target: dict, args: list[str], options: list[str]) -> None:
    """Hand this process's command to the fork server and exit as its worker exits; returns (the
    process then runs normally) when there is no server or it declines."""
    import json
    import signal
    import socket
    import struct

    path = os.environ.get("GPT2_TEST_ZYGOTE")
    if not path or not os.path.isdir(os.path.dirname(path)):
        return
    argv = sys.orig_argv
    request = {
        "executable": sys.executable,
        **target,
        "unbuffered": "-u" in options,
        "args": args,
        "orig_argv": argv,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "umask": os.umask(0o022),
    }
    os.umask(request["umask"])
    import time

    # the server is still importing (the session's first seconds): wait for it while it is alive
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        try:
            with open(os.path.join(os.path.dirname(path), "pid")) as handle:
                os.kill(int(handle.read()), 0)
        except (OSError, ValueError):
            return  # no server (it failed to start, or ended): run on our own
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)
    payload = json.dumps(request).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        socket.send_fds(conn, [struct.pack("!I", len(payload))], [0, 1, 2])
        conn.sendall(payload)
        kind, value = _message(conn)
    except OSError:
        conn.close()
        return
    if kind != b"P":
        conn.close()
        return
    worker = value

    def forward(received: int, _frame) -> None:
        try:
            os.kill(worker, received)
        except ProcessLookupError:  # it has just ended: its status is on the way
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    try:
        kind, status = _message(conn)
    except OSError:
        kind, status = b"", 0
    if kind != b"E":
        os.write(2, b"test fork server: the worker's exit status was lost\n")
        os._exit(1)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: die of the same one
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _message(conn) -> tuple[bytes, int]:
    import struct

    data = b""
    while len(data) < 5:
        chunk = conn.recv(5 - len(data))
        if not chunk:
            raise OSError("the fork server closed the connection")
        data += chunk
    return data[:1], struct.unpack("!i", data[1:])[0]


_COMMAND = _project_command()
if _COMMAND is not None:
    _run_through_zygote(*_COMMAND)
    install_test_hooks()  # only commands train; a hook imports torch, which other processes would pay for
