"""Training: one run is one call.

    import train
    spec = train.spec_from_argv(["--task", "sst", "--use_lora", "--model", "ckpt/tiny", "--max_steps", "20"])
    metrics = train.fit(spec)  # the run's metrics.json; BadInput / TrainingDiverged / Interrupted on failure

`python -m train ...` (and its aliases) is a thin wrapper over these two. They are loaded on first use,
so importing a light part of the package (train.run.state, in a SLURM job process) imports no torch.
"""

_PUBLIC = {
    "fit": "train.cli.entry",
    "spec_from_argv": "train.cli.entry",
    "RunSpec": "train.run.spec",
    "RunStopped": "train.trainer.lifecycle",
    "BadInput": "train.trainer.lifecycle",
    "TrainingDiverged": "train.trainer.lifecycle",
    "Interrupted": "train.trainer.lifecycle",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)
