"""Test-only plugin, loaded by Python at start-up when tests put this folder on PYTHONPATH.

It lets tests steer training processes they start as subprocesses (torchrun ranks, ablation jobs)
without test hooks in the production code, by wrapping the optimizer step:
* GPT2_TEST_STEP_SLEEP=S   sleep S seconds after every optimizer step (so a test can kill mid-epoch);
* GPT2_TEST_DUMP_GRADS=F   before the first optimizer step, write every parameter's gradient to the
                           safetensors file F (rank 0 only), keyed by param-group and position;
* GPT2_TEST_RNG_LOG=D      after every optimizer step, append a fingerprint of this process's torch RNG
                           state to D/rank<RANK>.txt (so tests can see each rank's stream);
* GPT2_TEST_SIGTERM_AT=N   after optimizer step N (counted in this process), rank 0 sends itself SIGTERM.
"""

import os

_KEYS = ("GPT2_TEST_STEP_SLEEP", "GPT2_TEST_DUMP_GRADS", "GPT2_TEST_RNG_LOG", "GPT2_TEST_SIGTERM_AT")
if any(os.environ.get(key) for key in _KEYS):
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
        return result

    torch.optim.AdamW.step = _step
