"""Experiments built on the training entry points: ablation grids (`ablate`: the command; `planning`:
the typed preset and its runs; `jobs`: running them here; `launchers`: SLURM and wandb sweeps), their
report (`report`) and representation similarity (`cka`).

    python -m experiments.ablate experiments/presets/smoke.toml --out_dir ablations/smoke --jobs 2
    python -m experiments.report ablations/smoke
"""
