"""Report on a grid: a markdown table (mean ± sd over seeds) and PNG plots, from runs.tsv + run folders.

    python scripts/report.py ablations/smoke [--out ablations/smoke/report] [--baseline base]

Table: one row per variant, one column per task (dev metric mean ± sample sd over seeds, n),
then trainable parameters, mean training time and peak memory. A variant's cell is marked ▲/▼ when
the 95% Welch t-interval of (variant - baseline) over seeds excludes 0 on that task, i.e. the gap
is larger than run-to-run noise; with fewer than 2 seeds on either side nothing is marked.
Plots: metric vs trainable parameters per task, training-loss curves per variant, time and memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.tasks import TASKS  # noqa: E402

TASK_ORDER = list(TASKS)


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (run scripts/ablate.py first)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise SystemExit(f"error: {path} has no runs")
    for line, row in enumerate(rows, start=2):
        try:
            row["best_value"] = float(row["best_value"])
            row["trainable_params"] = int(row["trainable_params"])
            row["train_seconds"] = float(row["train_seconds"])
            row["peak_memory_mb"] = float(row["peak_memory_mb"])
        except (TypeError, ValueError) as error:
            raise SystemExit(f"error: {path}:{line}: unreadable row ({error})") from None
    return rows


def label_variants(rows: list[dict], grid: Path) -> None:
    """Give each row the name its seeds are grouped under: the preset's variant name when the grid
    recorded it (keyed by config hash), else the variant tag, with the hash added when one tag
    covers several configurations (e.g. two LoRA runs that differ only in their targets)."""
    manifest = grid / "variants.json"
    names = json.loads(manifest.read_text()) if manifest.is_file() else {}
    hashes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        hashes[(row["task"], row["variant"])].add(row.get("config_hash") or "")
    for row in rows:
        key = row.get("config_hash") or ""
        if key in names:
            row["variant"] = names[key]
        elif len(hashes[(row["task"], row["variant"])]) > 1:
            row["variant"] = f"{row['variant']}#{key}"


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """CI of mean(a) - mean(b) (Welch); None with fewer than 2 values on a side."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return (diff, diff)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(va + vb)
    return diff - half, diff + half


def summarise(rows: list[dict], baseline: str) -> tuple[list[str], list[str], dict, dict]:
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    info: dict[str, dict] = defaultdict(lambda: {"params": [], "time": [], "memory": []})
    for row in rows:
        values[(row["variant"], row["task"])].append(row["best_value"])
        info[row["variant"]]["params"].append(row["trainable_params"])
        info[row["variant"]]["time"].append(row["train_seconds"])
        info[row["variant"]]["memory"].append(row["peak_memory_mb"])
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if baseline in variants:
        variants.remove(baseline)
        variants.insert(0, baseline)
    marks = {}
    for variant in variants:
        for task in tasks:
            interval = None
            if variant != baseline and (baseline, task) in values:
                interval = welch_interval(values.get((variant, task), []), values[(baseline, task)])
            marks[(variant, task)] = (
                "" if interval is None or interval[0] <= 0 <= interval[1] else (" ▲" if interval[0] > 0 else " ▼")
            )
    return tasks, variants, values, {"info": info, "marks": marks}


def markdown(tasks, variants, values, extra, metrics: dict[str, str], baseline: str) -> str:
    info, marks = extra["info"], extra["marks"]
    header = [
        "variant",
        *[f"{t} ({metrics[t]})" for t in tasks],
        "trainable params",
        "train time (s)",
        "peak memory (MiB)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        cells = [variant]
        for task in tasks:
            vals = values.get((variant, task), [])
            if not vals:
                cells.append("–")
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f} (n={len(vals)}){marks[(variant, task)]}")
        params = info[variant]["params"]
        cells.append(f"{min(params):,}" if min(params) == max(params) else f"{min(params):,}–{max(params):,}")
        cells.append(f"{statistics.mean(info[variant]['time']):.1f}")
        cells.append(f"{max(info[variant]['memory']):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean ± sample standard deviation over seeds of the best dev metric. ▲/▼: the 95% Welch "
        f"t-interval of the difference to `{baseline}` over seeds excludes 0 (a gap beyond run-to-run "
        f"noise); unmarked cells are within noise. Trainable parameters include the task head."
    )
    return "\n".join(lines) + "\n"


MARKERS = "os^Dv<>PX*"
MANY = 10  # more variants than this: one legend outside the axes, distinct colour x marker per variant


def variant_style(index: int) -> dict:
    """A colour and marker per variant (tab20 x 10 markers: 200 distinct styles, not 10 repeating)."""
    return {"color": plt.get_cmap("tab20")(index % 20), "marker": MARKERS[(index // 20 + index) % len(MARKERS)]}


def finish(fig, axes, path: Path, count: int) -> None:
    """One legend (inside the first axes for a few variants, outside to the right for many), then save."""
    if count > MANY:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, ncol=1 + count // 26)
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
    else:
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metric_vs_params(tasks, variants, values, extra, metrics, path: Path) -> None:
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for index, variant in enumerate(variants):
            vals = values.get((variant, task))
            if not vals:
                continue
            x = statistics.mean(extra["info"][variant]["params"])
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            style = variant_style(index)
            ax.errorbar(
                [x],
                [statistics.mean(vals)],
                yerr=[sd],
                fmt=style["marker"],
                color=style["color"],
                capsize=3,
                label=variant,
            )
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(metrics[task])
    finish(fig, axes, path, len(variants))


def plot_curves(rows: list[dict], tasks, variants, path: Path) -> None:
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for index, variant in enumerate(variants):
            curves = []
            for row in rows:
                if row["task"] != task or row["variant"] != variant:
                    continue
                log = Path(row["run_dir"]) / "log.jsonl"
                if log.is_file():
                    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
                    curves.append({e["step"]: e["train/loss"] for e in entries if "train/loss" in e})
            if curves:
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                means = [statistics.mean(c[s] for c in curves) for s in steps]
                ax.plot(
                    steps,
                    means,
                    label=variant,
                    color=variant_style(index)["color"],
                    markevery=max(1, len(steps) // 6),
                    marker=variant_style(index)["marker"] if len(variants) > MANY else None,
                    markersize=3,
                )
        ax.set_title(f"{task}: training loss (mean over seeds)")
        ax.set_xlabel("step")
    finish(fig, axes, path, len(variants))


def plot_cost(variants, extra, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(3.8, 0.2 * len(variants))))  # a readable row each
    times = [statistics.mean(extra["info"][v]["time"]) for v in variants]
    memory = [max(extra["info"][v]["memory"]) for v in variants]
    left.barh(variants, times)
    left.set_xlabel("mean training time per run (s)")
    right.barh(variants, memory)
    right.set_xlabel("peak memory (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid folder holding runs.tsv")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: <grid>/report)")
    parser.add_argument("--baseline", default=None, help="variant to compare against (default: the base model)")
    args = parser.parse_args(argv)
    rows = read_runs(args.grid / "runs.tsv")
    label_variants(rows, args.grid)
    baseline = args.baseline or ("base" if any(r["variant"] == "base" for r in rows) else rows[0]["variant"])
    metrics = {r["task"]: r["metric"] for r in rows}
    tasks, variants, values, extra = summarise(rows, baseline)
    out = args.out or args.grid / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(tasks, variants, values, extra, metrics, baseline)
    grid_file = args.grid / "grid.json"
    grid_info = json.loads(grid_file.read_text()) if grid_file.is_file() else {}
    caveat = ""
    if grid_info.get("random_init"):
        caveat = (
            f"> Model: a randomly initialised `{grid_info['model']['random_init']}` GPT-2 (preset "
            f"`{grid_info['preset']}`). These numbers are a pipeline check, NOT GPT-2 results.\n\n"
        )
    elif grid_info:
        caveat = f"> Model: `{grid_info['model'].get('model', 'gpt2')}` (preset `{grid_info['preset']}`).\n\n"
    (out / "report.md").write_text(
        f"# Report: {args.grid.name}\n\n{caveat}{table}\n"
        "![metric vs trainable parameters](metric_vs_params.png)\n\n"
        "![training curves](training_curves.png)\n\n![time and memory](cost.png)\n"
    )
    plot_metric_vs_params(tasks, variants, values, extra, metrics, out / "metric_vs_params.png")
    plot_curves(rows, tasks, variants, out / "training_curves.png")
    plot_cost(variants, extra, out / "cost.png")
    print(table)
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
