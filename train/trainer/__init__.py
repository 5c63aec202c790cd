"""Training itself: the `Trainer` (loop.py: the eager step, evaluation, checkpoints, the verdict), the
captured step (graphs.py), how a run stops early (lifecycle.py), where the maths runs (runtime.py) and on
how many ranks (distributed.py). It reads a `RunSpec` and knows no command line.
"""
