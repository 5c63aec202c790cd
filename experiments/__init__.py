"""Experiments built on the training entry points: ablation grids (`ablate`: preset, plan, local jobs;
`launchers`: SLURM and wandb sweeps), their report (`report`) and representation similarity (`cka`).

    python -m experiments.ablate experiments/presets/smoke.toml --out_dir ablations/smoke --jobs 2
    python -m experiments.report ablations/smoke
"""
