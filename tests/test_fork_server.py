"""The test fork server (tests/plugins/zygote.py) that runs the suite's `python -m train...` processes:
they really run in a worker with the imports done, and a client behaves as the process it stands for
(output, working directory, environment, exit code, signals, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, kill_and_wait, plugin_env

PROBE = [sys.executable, "-m", "plugins.probe"]  # run from tests/
pytestmark = pytest.mark.slow  # the server serves the end-to-end tests; the fast tier does not start it


@pytest.fixture(scope="module")
def server_ready():
    path = os.environ.get("GPT2_TEST_ZYGOTE")
    assert path is not None, "tests/conftest.py did not start the fork server (pytest_configure)"
    if path == "off":
        pytest.skip("GPT2_TEST_ZYGOTE=off: every process runs on its own")
    deadline = time.monotonic() + 180
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the fork server did not start within 180 s"
        time.sleep(0.2)
    return path


def probe(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PROBE, *args], cwd=REPO / "tests", env=plugin_env(**env), capture_output=True, text=True, timeout=60
    )


def test_a_command_runs_in_a_worker_as_it_would_on_its_own(server_ready):
    routed, alone = probe("a", "b", PROBE_VALUE="x"), probe("a", "b", PROBE_VALUE="x", GPT2_TEST_ZYGOTE="off")
    assert routed.returncode == alone.returncode == 0
    assert "torch_preloaded=True" in routed.stdout and "torch_preloaded=False" in alone.stdout
    for result in (routed, alone):
        assert f"cwd={REPO / 'tests'} argv=['a', 'b']" in result.stdout and "env=x" in result.stdout
    assert probe("exit", "3").returncode == 3


def test_signals_reach_the_worker_and_sigkill_takes_it_down(server_ready):
    for signum, expected in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)):
        client = subprocess.Popen(
            [*PROBE, "sleep", "60"], cwd=REPO / "tests", env=plugin_env(), stdout=subprocess.PIPE, text=True
        )
        line = client.stdout.readline()
        assert "torch_preloaded=True" in line, line
        worker = int(line.split("pid=")[1].split()[0])
        assert worker != client.pid
        assert (Path(server_ready).parent / "running" / str(client.pid)).exists()  # what kill_and_wait waits on
        if signum == signal.SIGKILL:
            assert kill_and_wait(client) == expected
            assert not _alive(worker), "kill_and_wait returned while the worker still ran"
            continue
        client.send_signal(signum)
        assert client.wait(timeout=30) == expected
        deadline = time.monotonic() + 10
        while _alive(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its client ({signal.Signals(signum).name})"
            time.sleep(0.05)


def test_another_import_time_environment_runs_on_its_own(server_ready):
    result = probe(PYTHONHASHSEED="123")
    assert result.returncode == 0 and "torch_preloaded=False" in result.stdout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[1].split()[0] != "Z"  # a zombie has ended
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
        return False
