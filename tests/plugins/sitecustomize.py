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

The tests run commands in their own process wherever the process itself is not what is tested
(tests.conftest.run_command, `--launcher inprocess`); this plugin serves the real processes that
remain (signals, SIGKILL, torchrun, SLURM's job processes), and run_command installs the same hooks.
"""

import os
import sys

_KEYS = ("GPT2_TEST_STEP_SLEEP", "GPT2_TEST_STEP_GATE", "GPT2_TEST_DUMP_GRADS", "GPT2_TEST_RNG_LOG")
_KEYS += ("GPT2_TEST_SIGTERM_AT",)
# the packages whose `python -m` commands get the hooks, and the folder whose scripts do (`python
# scripts/X.py`); submitit's job processes do not (they only wait for the run's process, which has them)
_ROUTED = ("train", "experiments")
_ROUTED_MODULES = ("torch.distributed.run",)  # torchrun's launcher (its ranks are `python -m train...`)
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


def _project_command() -> bool:
    """Whether this process runs one of the project's commands (`python [-u] [-B] -m train...|experiments...`,
    torchrun's launcher, or `python scripts/X.py`); not any other Python process (submitit's job and
    controller processes, multiprocessing's children, ...), which gets no hooks."""
    rest = sys.orig_argv[1:]
    while rest and rest[0] in ("-u", "-B"):
        rest.pop(0)
    if rest[:1] == ["-m"] and len(rest) >= 2:
        return rest[1].split(".")[0] in _ROUTED or rest[1] in _ROUTED_MODULES
    return bool(rest) and rest[0].endswith(".py") and os.path.dirname(os.path.realpath(rest[0])) == _SCRIPTS


if _project_command():
    install_test_hooks()  # only commands train; a hook imports torch, which other processes would pay for
