"""Test-only plugin, loaded by Python at start-up when tests put this folder on PYTHONPATH.

It lets tests steer training processes they start as subprocesses (torchrun ranks, ablation jobs)
without test hooks in the production code, by wrapping the optimizer step:
* GPT2_TEST_STEP_SLEEP=S   sleep S seconds after every optimizer step (so a test can kill mid-epoch);
* GPT2_TEST_DUMP_GRADS=F   before the first optimizer step, write every parameter's gradient to the
                           safetensors file F (rank 0 only), keyed by param-group and position.
"""

import os

if os.environ.get("GPT2_TEST_STEP_SLEEP") or os.environ.get("GPT2_TEST_DUMP_GRADS"):
    import time

    import torch
    from safetensors.torch import save_file

    _original_step = torch.optim.AdamW.step
    _state = {"dumped": False}

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
        time.sleep(float(os.environ.get("GPT2_TEST_STEP_SLEEP", "0") or 0))
        return result

    torch.optim.AdamW.step = _step
