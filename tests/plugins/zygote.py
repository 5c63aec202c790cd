"""Test-only fork server ("zygote"): command-line runs that the suite starts as processes skip the
~10 s of imports each (torch, torch._dynamo, transformers, peft, wandb, the tokenizer) that dominate a
tiny run.

    python tests/plugins/zygote.py SOCKET        (started once per pytest session by tests/conftest.py)

It imports everything a run imports, then listens on the Unix socket SOCKET. A client is an ordinary
`python -m train ...` / `python -m experiments.<...> ...` process started by a test, by ablate or by
torchrun: tests/plugins/sitecustomize.py, loaded at its start-up, connects and sends its command
line, working directory, environment and its stdin/stdout/stderr file descriptors. The server forks
a worker that takes those descriptors, that directory and that environment and runs the module as
`python -m` would; the client forwards the signals it receives to the worker and exits as the worker
exits (with its code, or killed by its signal). A client that dies (SIGKILL) takes its worker with
it: the server kills the worker as soon as the client's end of the socket closes, which is a moment
after the client is gone, not at once. While a client's worker runs, the file `running/<client pid>`
exists beside the socket (written before the fork, removed once the worker is reaped): a test that
SIGKILLs a process waits for it to go (tests.conftest.kill_and_wait) before relying on the run being
over.

A command whose import-time environment (HF_*, TRANSFORMERS_*, PYTHON*, OMP_*, ...) differs from the
server's runs as a normal process (the server answers "fallback"), and so does everything when
GPT2_TEST_ZYGOTE is unset. Nothing here is used outside the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys

# Environment read while modules are imported (the server's imports stand for the client's): a client
# whose values differ runs as a normal process.
IMPORT_TIME = ("HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA", "OMP_", "MKL_", "PYTHON", "TOKENIZERS_", "XDG_")
IMPORT_TIME += ("HOME",)  # huggingface_hub's cache paths come from HOME / XDG_CACHE_HOME at import
# read when CUDA or torch.distributed start (which the server never does): torchrun sets them for its ranks
READ_LATER = ("CUDA_VISIBLE_DEVICES", "TORCHELASTIC_", "TORCH_NCCL_")


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and not k.startswith(READ_LATER)}


PRELOAD = (
    "torch",
    "torch._dynamo",  # imported by the first optimizer's construction: ~3 s
    "transformers",
    "peft",
    "wandb",
    "wandb.sdk.launch.inputs.internal",  # imported by every run's wandb.init (offline too): ~1.6 s
    "sacrebleu",
    "torch_geometric",
    "train.entry",
    "train.loop",
    "train.transfer",
    "train.evaluate",
    "experiments.ablate",
    "experiments.cka",
    "experiments.report",
    "experiments.launchers",
)


def send(conn: socket.socket, kind: bytes, value: int = 0) -> None:
    try:
        conn.sendall(kind + struct.pack("!i", value))
    except OSError:
        pass  # the client is gone


def receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, 4, 3)
    try:
        (length,) = struct.unpack("!I", header)
        payload = b""
        while len(payload) < length:
            chunk = conn.recv(length - len(payload))
            if not chunk:
                raise OSError("client closed during its request")
            payload += chunk
        request = json.loads(payload)
        for key in ("executable", "args", "cwd", "env", "umask", "orig_argv", "unbuffered"):
            request[key]  # noqa: B018 - a malformed request fails here, before a worker starts
        return request, fds
    except BaseException:
        for fd in fds:  # never keep a test's stdout/stderr pipe open: its reader would wait forever
            os.close(fd)
        raise


def run_worker(request: dict, fds: list[int]) -> None:
    """In the forked child: become the client's command, then exit as Python would."""
    import atexit
    import io
    import random
    import runpy
    import threading

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin, as at start-up
    buffering = {"write_through": True} if request["unbuffered"] else {}  # python -u
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=False, **buffering)
    sys.stderr = io.TextIOWrapper(
        open(2, "wb", closefd=False), line_buffering=True, errors="backslashreplace", **buffering
    )
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.umask(request["umask"])
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    random.seed()  # a fresh process's stream, not a copy of the server's
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    # `python -m` puts the working directory first on sys.path, `python script.py` the script's folder
    sys.path[0] = os.path.dirname(request["script"]) if "script" in request else request["cwd"]
    sys.orig_argv = request["orig_argv"]
    sys.argv = [request.get("script", request.get("module")), *request["args"]]
    sys.modules["sitecustomize"].install_test_hooks()  # they read the client's environment (GPT2_TEST_*)
    code, killed_by = 0, None
    try:
        if "script" in request:
            runpy.run_path(request["script"], run_name="__main__")
        else:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()  # as the interpreter: the traceback, then killed by SIGINT's default action
        killed_by = signal.SIGINT
    except BaseException:  # noqa: BLE001 - an uncaught error: traceback and exit 1, as python does
        import traceback

        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # the interpreter's own exit: wait for non-daemon threads, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if killed_by is not None:
            signal.signal(killed_by, signal.SIG_DFL)
            os.kill(os.getpid(), killed_by)
        os._exit(code & 0xFF)  # sys.exit(-1) is 255, as for python


def serve(path: str) -> None:
    import importlib

    with open(os.path.join(os.path.dirname(path), "pid"), "w") as handle:  # clients wait while it starts
        handle.write(str(os.getpid()))

    import sitecustomize  # noqa: F401 - this folder's test hooks, which workers install for their clients

    initial = dict(os.environ)  # what the imports see; compared with each client's

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    tokenizer = os.environ.get("GPT2_TOKENIZER")
    if tokenizer:  # loaded once here: workers find it in the per-process cache
        from model.tokenizer import load_tokenizer

        load_tokenizer(tokenizer)
    mine = import_time_env(initial)
    # variables the imports themselves set (as they would in a fresh process): workers keep them
    added = {k: v for k, v in os.environ.items() if k not in initial}
    expected = {**mine, **import_time_env(added)}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    listener.bind(staging)
    listener.listen(64)
    os.rename(staging, path)  # clients see the socket only once the server is ready
    workers: dict[socket.socket, int] = {}  # client connection -> its worker's pid
    by_pid: dict[int, socket.socket] = {}
    parent = os.getppid()
    running = os.path.join(os.path.dirname(path), "running")
    os.makedirs(running, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # pytest's end: take the workers down (finally)
    try:
        loop(listener, workers, by_pid, parent, expected, added, running)
    finally:
        for pid in by_pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _release(conn: socket.socket, fds: list[int]) -> None:
    """Let go of a request that gets no worker: its connection and the client's stdin/stdout/stderr."""
    conn.close()
    for fd in fds:
        os.close(fd)


def _closed(conn: socket.socket) -> bool:
    """Whether the client's end of the connection is closed (it died), without consuming anything."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def loop(listener, workers: dict, by_pid: dict, parent: int, expected: dict, added: dict, running: str) -> None:
    markers: dict[int, str] = {}  # worker pid -> its client's file in `running`
    owners: dict[str, int] = {}  # that file -> the worker it stands for now
    while os.getppid() == parent:  # the pytest process that started us is alive
        readable, _, _ = select.select([listener, *workers], [], [], 0.05)
        for conn in [c for c in readable if c is not listener]:  # a client closed: it died
            try:
                data = conn.recv(1)
            except OSError:
                data = b""
            if not data:
                pid = workers.pop(conn)
                if pid in by_pid:
                    os.kill(pid, signal.SIGKILL)
                conn.close()
        while True:  # reap finished workers, tell their clients
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            marker = markers.pop(pid, None)
            if marker is not None and owners.get(marker) == pid:  # a reused client pid's marker is not ours
                del owners[marker]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)
            conn = by_pid.pop(pid, None)
            if conn is not None and conn in workers:
                send(conn, b"E", status)
                workers.pop(conn)
                conn.close()
        if listener in readable:
            conn, _ = listener.accept()
            try:
                request, fds = receive_request(conn)
            except (OSError, ValueError, KeyError, struct.error):
                conn.close()
                continue
            theirs = import_time_env(request["env"])
            # a variable the imports set (TORCHINDUCTOR_CACHE_DIR ...) may be absent or set to the same value
            differ = sorted(
                k
                for k in {*theirs, *expected}
                if theirs.get(k) != expected.get(k) and not (k in added and k not in theirs)
            )
            if differ or request["executable"] != sys.executable or len(fds) != 3:
                if os.environ.get("GPT2_TEST_ZYGOTE_DEBUG"):
                    command = request.get("module") or request.get("script")
                    print(f"zygote: {command} runs on its own (differs: {differ})", file=sys.stderr)
                send(conn, b"F")
                _release(conn, fds)
                continue
            client_pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            marker = os.path.join(running, str(client_pid))
            open(marker, "w").close()  # before the fork: a test that sees its client gone waits for this
            if _closed(conn):  # the client died before its marker existed: nobody waits for a worker
                os.unlink(marker)
                _release(conn, fds)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError:
                os.unlink(marker)
                raise
            if pid == 0:
                listener.close()
                for other in workers:
                    other.close()
                conn.close()
                run_worker({**request, "env": {**added, **request["env"]}}, fds)
            for fd in fds:
                os.close(fd)
            workers[conn] = pid
            by_pid[pid] = conn
            markers[pid] = marker
            owners[marker] = pid
            send(conn, b"P", pid)


if __name__ == "__main__":
    serve(sys.argv[1])
