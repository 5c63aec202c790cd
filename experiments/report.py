"""Report on a grid: a markdown table (mean ± sd over seeds) and PNG plots, from runs.tsv + run folders.

    python -m experiments.report ablations/smoke [--out ablations/smoke/report] [--baseline base]

Table: one row per variant, one column per task (dev metric mean ± sample sd over seeds, n), then
trainable parameters. A variant's cell is marked ▲/▼ when the 95% Welch t-interval of (variant -
baseline) over seeds excludes 0 on that task, i.e. the gap is larger than run-to-run noise; with
fewer than 2 seeds on either side nothing is marked. The report says how many of the grid's planned
runs have finished and marks a cell whose seeds are not all done (†). Costs are per task, never
averaged across tasks (the tasks' step counts and lengths differ, and sonnet generation dominates a
whole run's time): the median seconds per training step, the peak memory, and the sonnet generation
time on its own. Plots: metric vs trainable parameters per task, training-loss curves per variant,
cost per task.

A grid with a learning-rate tuning stage (a preset's [tune] table, experiments/tuning.py) adds a
section: the protocol, per method and task the candidates' dev scores and the chosen rate (◀/▶ when
it is at an end of the range tried: widen it), the tuning's steps and seconds beside the final
runs', and `lr_sensitivity.png` (dev score against learning rate). Tuning runs are not in the main
table.

A transfer grid (a preset with [transfer], see experiments/presets/transfer.toml) adds a section per
direction (e.g. sst -> cfimdb): per variant, the source run's dev metric, the zero-shot transfer (the
source head through the label map, before any target training), the few-shot transfer (after
training on the target fraction), the same run from scratch on that fraction, the gap transfer -
scratch (does the source help?) and the source model's cross-block CKA (mean linear CKA between
distinct listed blocks, last-token states; KoRA's representation claim). Marks as above against the
baseline variant; the gap's mark compares transfer with scratch of the same variant. The
majority-class accuracy of the target's dev set is printed beside each table.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.inputs import InputError, reported
from experiments.tuning import TUNING_FILE
from train.base import console
from train.cli.exits import exit_status
from train.run.index import read_index
from train.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]

TASK_ORDER = list(TASKS)


def read_runs(grid: Path) -> list[dict]:
    """The grid's rows, from runs.tsv synced with its run folders (train/run/index.py adds a finished run's
    missing row and rebuilds a damaged file), their numbers parsed."""
    path = grid / "runs.tsv"
    if not grid.is_dir():
        raise InputError(f"error: {grid} is not a grid folder (run experiments/ablate.py first)")
    if path.exists() and not path.is_file():
        raise InputError(f"error: {path} is a folder, not the grid's index; move it aside (it is rebuilt from runs)")
    try:
        rows = read_index(grid)
    except OSError as error:  # a read-only grid is read without writing; a full disk, a folder in the way
        raise InputError(f"error: cannot update {path} ({error.strerror}); free space or fix the file") from None
    if not rows:
        raise InputError(f"error: {path} has no runs" if path.exists() else f"error: {grid} has no finished runs")
    for line, row in enumerate(rows, start=2):
        try:
            row["best_value"] = float(row["best_value"])
            row["trainable_params"] = int(row["trainable_params"])
            row["train_seconds"] = float(row["train_seconds"])
            row["peak_memory_mb"] = float(row["peak_memory_mb"])
            steps = int(row.get("steps") or 0)
            # rows of older versions have no per-step column: it follows from their time and steps
            row["seconds_per_step"] = float(row.get("seconds_per_step") or row["train_seconds"] / max(1, steps))
            generation = row.get("generation_seconds")
            row["generation_seconds"] = float(generation) if generation not in (None, "") else None
        except (TypeError, ValueError) as error:
            raise InputError(f"error: {path}:{line}: unreadable row ({error})") from None
    return rows


def label_variants(rows: list[dict], grid: Path) -> None:
    """Give each row the name its seeds are grouped under: the preset's variant name when the grid
    recorded it (keyed by config hash), else the `--label` the run recorded, else the variant tag, with
    the hash added when one tag covers several configurations (e.g. two LoRA runs that differ only in
    their targets)."""
    manifest = grid / "variants.json"
    names = json.loads(manifest.read_text()) if manifest.is_file() else {}
    hashes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        hashes[(row["task"], row["variant"])].add(row.get("config_hash") or "")
    for row in rows:
        key = row.get("config_hash") or ""
        if key not in names:  # a folder migrated from before RunSpec: the grid recorded its old hash
            key = _migrated_from(Path(row.get("run_dir") or "")) or key
        if key in names:
            row["variant"] = names[key]
        elif row.get("label") and row["label"] != row["variant"]:  # the grid's name, kept in the run's record
            row["variant"] = row["label"]
        elif len(hashes[(row["task"], row["variant"])]) > 1:
            row["variant"] = f"{row['variant']}#{key}"


def _migrated_from(run_dir: Path) -> str | None:
    try:
        record = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (record.get("migrated_from") or {}).get("config_hash") if isinstance(record, dict) else None


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


def baseline_first(rows: list[dict], baseline: str) -> list[str]:
    """The rows' variants in first-seen order, the baseline first."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if baseline in variants:
        variants.remove(baseline)
        variants.insert(0, baseline)
    return variants


def mark(interval: tuple[float, float] | None) -> str:
    """▲ / ▼ when a difference's interval excludes 0 (above / below), else nothing."""
    return "" if interval is None or interval[0] <= 0 <= interval[1] else (" ▲" if interval[0] > 0 else " ▼")


def cell(values: list[float], marked: str = "") -> str:
    """`mean ± sample sd (n)` and a mark; – without values."""
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f} (n={len(values)}){marked}"


def summarise(rows: list[dict], baseline: str) -> tuple[list[str], list[str], dict, dict]:
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    info: dict[str, dict] = defaultdict(lambda: {"params": []})
    cost: dict[tuple[str, str], dict] = defaultdict(lambda: {"step": [], "memory": [], "generation": []})
    for row in rows:
        key = (row["variant"], row["task"])
        values[key].append(row["best_value"])
        info[row["variant"]]["params"].append(row["trainable_params"])
        cost[key]["step"].append(row["seconds_per_step"])
        cost[key]["memory"].append(row["peak_memory_mb"])
        if row["generation_seconds"] is not None:
            cost[key]["generation"].append(row["generation_seconds"])
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))
    variants = baseline_first(rows, baseline)
    marks = {}
    for variant in variants:
        for task in tasks:
            interval = None
            if variant != baseline and (baseline, task) in values:
                interval = welch_interval(values.get((variant, task), []), values[(baseline, task)])
            marks[(variant, task)] = mark(interval)
    return tasks, variants, values, {"info": info, "marks": marks, "cost": cost}


def with_planned_cells(tasks: list[str], variants: list[str], grid_info: dict, metrics: dict[str, str]):
    """The table's tasks and variants: those with finished runs plus every one the grid planned, so a
    column or row none of whose runs has finished yet shows its cells as `– †` instead of vanishing
    (the line above the table counts them). `metrics` gains the planned tasks' metric names."""
    planned = [tuple(cell) for cell in grid_info.get("cells", [])]
    for _, task in planned:
        if task in TASKS and task not in metrics:
            metrics[task] = TASKS[task].metric
    known = [t for t in dict.fromkeys([*tasks, *(t for _, t in planned)]) if t in metrics]
    tasks = sorted(known, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))
    variants = list(dict.fromkeys([*variants, *(v for v, _ in planned)]))
    return tasks, variants


def completeness(rows: list[dict], grid_info: dict) -> tuple[str, set[tuple[str, str]]]:
    """A line saying how many of the grid's planned runs have finished, and the (variant, task) cells
    that miss seeds. A grid written before the plan was recorded: every cell with fewer seeds than the
    fullest one is marked."""
    planned = grid_info.get("seeds") or []
    done: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        done[(row["variant"], row["task"])] += 1
    cells = grid_info.get("cells")  # [[variant, task], ...]: every cell the preset planned
    expected = {tuple(c): len(planned) for c in cells} if cells else {k: max(done.values()) for k in done}
    if not expected:
        return "", set()
    incomplete = {key for key, n in expected.items() if done.get(key, 0) < n}
    total, finished = sum(expected.values()), sum(min(done.get(k, 0), n) for k, n in expected.items())
    line = f"> {finished} of {total} planned runs have finished"
    if grid_info.get("tuning_runs"):
        line += f" (and {grid_info['tuning_runs']} learning-rate tuning runs before them: see *Learning-rate tuning*)"
    if incomplete:
        line += f"; {len(incomplete)} cell(s) miss seeds (†): their means are of the seeds that finished"
    return line + ".\n\n", incomplete


def markdown(tasks, variants, values, extra, metrics: dict[str, str], baseline: str, incomplete=frozenset()) -> str:
    info, marks = extra["info"], extra["marks"]
    header = ["variant", *[f"{t} ({metrics[t]})" for t in tasks], "trainable params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        cells = [variant]
        for task in tasks:
            dagger = " †" if (variant, task) in incomplete else ""
            cells.append(cell(values.get((variant, task), []), marks.get((variant, task), "")) + dagger)
        params = info[variant]["params"] if variant in info else []
        if not params:  # planned, none finished yet
            cells.append("–")
        else:
            cells.append(f"{min(params):,}" if min(params) == max(params) else f"{min(params):,}–{max(params):,}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean ± sample standard deviation over seeds of the best dev metric. ▲/▼: the 95% Welch "
        f"t-interval of the difference to `{baseline}` over seeds excludes 0 (a gap beyond run-to-run "
        f"noise); unmarked cells are within noise. Trainable parameters include the task head."
        + (" †: not every planned seed of this cell has finished." if incomplete else "")
    )
    return "\n".join(lines) + "\n" + cost_table(tasks, variants, extra["cost"])


def cost_table(tasks, variants, cost) -> str:
    """Per task: the median seconds per training step and the peak memory over seeds; sonnet generation
    (the dev sonnets of the best evaluation) in a column of its own."""
    generating = [t for t in tasks if any(cost[(v, t)]["generation"] for v in variants)]
    header = ["variant"]
    for task in tasks:
        header += [f"{task} s/step", f"{task} peak MiB"]
        if task in generating:
            header.append(f"{task} generation s")
    lines = ["", "Cost per task (median over seeds):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        cells = [variant]
        for task in tasks:
            entry = cost.get((variant, task))
            if not entry or not entry["step"]:
                cells += ["–", "–"] + (["–"] if task in generating else [])
                continue
            cells += [f"{statistics.median(entry['step']):.4f}", f"{max(entry['memory']):.0f}"]
            if task in generating:
                cells.append(f"{statistics.median(entry['generation']):.1f}" if entry["generation"] else "–")
        lines.append("| " + " | ".join(cells) + " |")
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


def plot_cost(tasks, variants, extra, path: Path) -> None:
    """Per task (one row of panels each): seconds per training step and peak memory per variant."""
    cost = extra["cost"]
    height = max(2.4, 0.2 * len(variants))  # a readable bar per variant
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, height * len(tasks)), squeeze=False)
    for (left, right), task in zip(axes, tasks, strict=True):
        shown = [v for v in variants if cost.get((v, task), {}).get("step")]
        left.barh(shown, [statistics.median(cost[(v, task)]["step"]) for v in shown])
        left.set_xlabel(f"{task}: seconds per training step (median over seeds)")
        right.barh(shown, [max(cost[(v, task)]["memory"]) for v in shown])
        right.set_xlabel(f"{task}: peak memory (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def current_finals(rows: list[dict], record: dict | None) -> list[dict]:
    """Leave out runs of a tuned cell at another rate than its current choice (a [tune] table changed since
    they ran, or they ran before the cell was tuned): a cell's seeds are the runs at the rate its tuning
    chose."""
    if not record:
        return rows
    chosen = {(c["variant"], c["task"]): c["chosen_lr"] for c in record.get("cells", [])}
    kept = []
    for row in rows:
        rate = chosen.get((row["variant"], row["task"]))
        if rate is not None and not math.isclose(float(row["lr"]), rate):
            continue
        kept.append(row)
    return kept


def tuning_section(record: dict, rows: list[dict], plot_path: Path) -> str:
    """The [tune] stage's evidence: the protocol, per cell the candidates' dev scores, the chosen rate (marked
    when it is at an end of the range tried), and the tuning's cost beside the final runs' cost; and the
    sensitivity plot (dev score against learning rate, one line per variant and task)."""
    settings, cells = record["settings"], record["cells"]
    budget = f"{settings['epochs']} epoch(s)" if settings.get("epochs") else ""
    if settings.get("max_steps"):
        budget += (" or " if budget else "") + f"{settings['max_steps']} steps"
    steps = sorted({t["steps"] for c in cells for t in c["trials"] if t["outcome"] == "finished"})
    if steps:  # what the budget came to (a preset's own max_steps may cap it)
        budget += f" ({steps[0]}{'–' + str(steps[-1]) if steps[-1] != steps[0] else ''} optimizer steps a candidate)"
    grid = "each method's own prior range" if settings["lr"] == "prior" else f"the rates {settings['lr']}"
    points = f"{settings['points']} log-spaced rates over {grid}" if settings["lr"] == "prior" else grid
    final: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: {"steps": 0, "seconds": 0.0, "runs": 0})
    for row in rows:
        entry = final[(row["variant"], row["task"])]
        entry["steps"] += int(row.get("steps") or 0)
        entry["seconds"] += row["train_seconds"]
        entry["runs"] += 1
    lines = [
        "",
        "## Learning-rate tuning",
        "",
        f"Every method's learning rate was tuned on its own: per method and task, one run per candidate ({points}) "
        f"at a budget of {budget}, seed {settings['seed']}; the rate with the best **dev** score was then trained "
        "with every seed of the grid at the full budget. Tuning runs never read the test split. The reported dev "
        "scores are of those separate final runs, but their rate was chosen on the same dev split.",
        "",
        "| variant | task | candidates: dev score (chosen in bold) | chosen lr | range tried | tuning steps | tuning s "
        "| final steps | final s | tuning share of cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    marks = {"low": " ◀ widen: best at the lowest rate", "high": " ▶ widen: best at the highest rate"}
    edges = 0
    for cell in cells:
        trials = cell["trials"]
        scores = []
        for trial in trials:
            outcome = trial["outcome"]
            text = outcome if outcome in ("diverged", "pending", "unreadable") else f"{trial['dev']:.4f}"
            text = f"{trial['lr']:g}: {text}"
            scores.append(f"**{text}**" if cell["chosen_lr"] == trial["lr"] else text)
        chosen = f"{cell['chosen_lr']:g}" if cell["chosen_lr"] is not None else cell["status"]
        chosen += marks.get(cell["edge"], "") + (" (flat: every candidate scored the same)" if cell["flat"] else "")
        edges += cell["edge"] is not None
        prior = cell.get("prior") or {}
        tried = [t["lr"] for t in trials]
        span = f"{min(tried):g}–{max(tried):g}" + (" (prior)" if settings["lr"] == "prior" and prior else "")
        tune_steps, tune_seconds = sum(t["steps"] for t in trials), sum(t["seconds"] for t in trials)
        done = final.get((cell["variant"], cell["task"]), {"steps": 0, "seconds": 0.0, "runs": 0})
        whole = tune_seconds + done["seconds"]
        share = f"{tune_seconds / whole:.0%}" if whole > 0 and done["runs"] else "–"
        lines.append(
            f"| {cell['variant']} | {cell['task']} | {', '.join(scores)} | {chosen} | {span} | {tune_steps:,} | "
            f"{tune_seconds:.1f} | {done['steps']:,} | {done['seconds']:.1f} | {share} |"
        )
    total_tune = sum(t["seconds"] for c in cells for t in c["trials"])
    total_final = sum(e["seconds"] for e in final.values())
    lines += [
        "",
        f"Tuning took {sum(len(c['trials']) for c in cells)} runs and {total_tune:.1f} s of training against "
        f"{sum(int(e['runs']) for e in final.values())} final runs and {total_final:.1f} s"
        + (f" (tuning: {total_tune / (total_tune + total_final):.0%} of all training time)" if total_final else "")
        + ". Steps and seconds are training only (evaluation and start-up not counted); a method's cost is its "
        "tuning plus its final runs. ◀/▶: the best dev score was reached at an end of the rates tried, so the best "
        "rate may lie outside them: widen the range." + (f" {edges} cell(s) are so marked." if edges else ""),
        "",
        "![dev score against learning rate](lr_sensitivity.png)",
        "",
    ]
    plot_sensitivity(cells, plot_path)
    return "\n".join(lines)


def plot_sensitivity(cells: list[dict], path: Path) -> None:
    """Dev score against learning rate (log), one line per variant, a panel per task; the chosen rate is a
    star, a diverged candidate an x on the panel's floor."""
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        scores = [t["dev"] for c in cells if c["task"] == task for t in c["trials"] if t["outcome"] == "finished"]
        floor = min(scores, default=0.0)
        for cell in (c for c in cells if c["task"] == task):
            style = variant_style(variants.index(cell["variant"]))
            done = [t for t in cell["trials"] if t["outcome"] == "finished"]
            ax.plot(
                [t["lr"] for t in done],
                [t["dev"] for t in done],
                color=style["color"],
                marker=style["marker"],
                markersize=4,
                label=cell["variant"],
            )
            for trial in done:
                if trial["lr"] == cell["chosen_lr"]:
                    ax.plot([trial["lr"]], [trial["dev"]], marker="*", markersize=12, color=style["color"])
            diverged = [t["lr"] for t in cell["trials"] if t["outcome"] == "diverged"]
            if diverged:
                ax.plot(diverged, [floor] * len(diverged), linestyle="none", marker="x", color=style["color"])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"{task}: best dev score")
        ax.set_title(f"{task}: dev score vs learning rate (★ chosen, x diverged)")
    finish(fig, axes, path, len(variants))


TRANSFER_COLUMNS = {
    "source": "source",
    "zero_shot": "zero-shot",
    "transfer": "few-shot transfer",
    "scratch": "from scratch",
    "gap": "transfer − scratch",
    "cka": "cross-block CKA",
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def transfer_results(manifest: dict) -> tuple[list[dict], int]:
    """One row per (source run, target) with the numbers the transfer table shows (None where a file
    is missing), and how many rows miss a finished run."""
    results, incomplete = [], 0
    for item in manifest["runs"]:
        source = _read_json(Path(item["source_run"]) / "metrics.json") or {}
        moved = _read_json(Path(item["transfer_run"]) / "metrics.json")
        scratch = _read_json(Path(item["scratch_run"]) / "metrics.json")
        cka = _read_json(Path(item["cka"]))
        if moved is None or scratch is None or not source:
            incomplete += 1
        metric = TASKS[item["target"]].metric
        zero = (moved or {}).get("zero_shot", {})
        row = {
            "direction": f"{item['source_task']} → {item['target']}",
            "variant": item["variant"],
            "seed": item["seed"],
            "source_metric": f"{item['source_task']} {TASKS[item['source_task']].metric}",
            "target_metric": metric,
            "source": source.get(TASKS[item["source_task"]].metric),
            "zero_shot": zero.get(metric) if zero.get("available") else None,
            "zero_shot_note": None if zero.get("available", True) else zero.get("reason"),
            "transfer": (moved or {}).get(metric),
            "scratch": (scratch or {}).get(metric),
            "majority": (moved or scratch or {}).get("dev_majority_acc"),
            "cka": (cka or {}).get("summary", {}).get("last_token", {}).get("a_cross_block_mean"),
        }
        both = row["transfer"] is not None and row["scratch"] is not None
        row["gap"] = row["transfer"] - row["scratch"] if both else None
        results.append(row)
    return results, incomplete


def transfer_tables(results: list[dict], baseline: str) -> str:
    lines = []
    for direction in dict.fromkeys(r["direction"] for r in results):
        rows = [r for r in results if r["direction"] == direction]
        variants = baseline_first(rows, baseline)
        values = {
            (v, c): [r[c] for r in rows if r["variant"] == v and r[c] is not None]
            for v in variants
            for c in TRANSFER_COLUMNS
        }
        header = [
            "variant",
            *[
                f"{name} ({rows[0]['source_metric'] if key == 'source' else rows[0]['target_metric']})"
                if key not in ("cka",)
                else name
                for key, name in TRANSFER_COLUMNS.items()
            ],
        ]
        lines += [f"### {direction}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for variant in variants:
            cells = [variant]
            for column in TRANSFER_COLUMNS:
                mine = values[(variant, column)]
                if column == "gap":
                    interval = welch_interval(values[(variant, "transfer")], values[(variant, "scratch")])
                elif variant != baseline:
                    interval = welch_interval(mine, values.get((baseline, column), []))
                else:
                    interval = None
                cells.append(cell(mine, mark(interval)))
            lines.append("| " + " | ".join(cells) + " |")
        majority = [r["majority"] for r in rows if r["majority"] is not None]
        notes = {r["zero_shot_note"] for r in rows if r["zero_shot_note"]}
        lines.append("")
        if majority:
            lines.append(
                f"Majority-class accuracy of the target's dev set (always answering its most frequent label): "
                f"{max(majority):.4f}."
            )
        for note in sorted(notes):
            lines.append(f"No zero-shot number: {note}.")
        lines.append("")
    lines.append(
        "Mean ± sample sd over seeds. ▲/▼ in a column: the 95% Welch t-interval of the difference to "
        f"`{baseline}` in that column excludes 0. In `transfer − scratch`: the interval of few-shot transfer "
        "minus from-scratch training of the same variant excludes 0, i.e. the source run helped (▲) or hurt (▼) "
        "beyond run-to-run noise. Cross-block CKA: mean linear CKA between distinct listed blocks of the source "
        "model, last-token states on its own task's dev texts (KoRA reports it for blocks 0, 6, 11)."
    )
    return "\n".join(lines) + "\n"


def plot_transfer(results: list[dict], path: Path) -> None:
    directions = list(dict.fromkeys(r["direction"] for r in results))
    fig, axes = plt.subplots(1, len(directions), figsize=(6.5 * len(directions), 4.2), squeeze=False)
    kinds = [("zero_shot", "zero-shot"), ("transfer", "few-shot transfer"), ("scratch", "from scratch")]
    for ax, direction in zip(axes[0], directions, strict=True):
        rows = [r for r in results if r["direction"] == direction]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / len(kinds)
        for k, (key, name) in enumerate(kinds):
            means, sds = [], []
            for variant in variants:
                vals = [r[key] for r in rows if r["variant"] == variant and r[key] is not None]
                means.append(statistics.mean(vals) if vals else math.nan)
                sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            positions = [i + (k - 1) * width for i in range(len(variants))]
            ax.bar(positions, means, width, yerr=sds, capsize=2, label=name)
        majority = [r["majority"] for r in rows if r["majority"] is not None]
        if majority:
            ax.axhline(max(majority), color="grey", linestyle="--", linewidth=1, label="majority class")
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_ylabel(rows[0]["target_metric"])
        ax.set_title(f"{direction} (mean ± sd over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@reported
@console.command("python -m experiments.report")
def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except OSError as error:  # a read-only or full disk while writing the report: one line, not a traceback
        if error.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR, errno.EACCES):
            raise
        raise InputError(f"error: cannot write {error.filename or 'the report'} ({error.strerror})") from None


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid folder holding runs.tsv")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: <grid>/report)")
    parser.add_argument("--baseline", default=None, help="variant to compare against (default: the base model)")
    args = parser.parse_args(argv)
    rows = read_runs(args.grid)
    manifest = _read_json(args.grid / "transfer.json")
    if manifest is None and (args.grid / "transfer.json").exists():
        raise InputError(f"error: {args.grid / 'transfer.json'} cannot be read; re-run ablate.py to rewrite it")
    if manifest is not None:  # the main table is the source runs; the transfer stage has its own section
        stage = {item[key] for item in manifest["runs"] for key in ("transfer_run", "scratch_run")}
        rows = [row for row in rows if row["run_dir"] not in stage]
    rows = [row for row in rows if row.get("stage") != "tune"]  # learning-rate trials: their own section
    if not rows:
        raise InputError(f"error: {args.grid} has no finished final runs yet (only learning-rate tuning runs)")
    label_variants(rows, args.grid)
    record = _read_json(args.grid / TUNING_FILE)
    rows = current_finals(rows, record)
    baseline = args.baseline or ("base" if any(r["variant"] == "base" for r in rows) else rows[0]["variant"])
    metrics = {r["task"]: r["metric"] for r in rows}
    grid_file = args.grid / "grid.json"
    grid_info = (_read_json(grid_file) or {}) if grid_file.is_file() else {}
    order = list(dict.fromkeys(variant for variant, _ in grid_info.get("cells", [])))
    rows.sort(key=lambda row: order.index(row["variant"]) if row["variant"] in order else len(order))  # the preset's
    tasks, variants, values, extra = summarise(rows, baseline)
    tasks, variants = with_planned_cells(tasks, variants, grid_info, metrics)
    out = args.out or args.grid / "report"
    out.mkdir(parents=True, exist_ok=True)
    counts, incomplete = completeness(rows, grid_info)
    table = markdown(tasks, variants, values, extra, metrics, baseline, incomplete)
    caveat = ""
    if grid_info.get("random_init"):
        caveat = (
            f"> Model: a randomly initialised `{grid_info['model']['random_init']}` GPT-2 (preset "
            f"`{grid_info['preset']}`). These numbers are a pipeline check, NOT GPT-2 results.\n\n"
        )
    elif grid_info:
        caveat = f"> Model: `{grid_info['model'].get('model', 'gpt2')}` (preset `{grid_info['preset']}`).\n\n"
    tuning_text = ""
    if record is not None and record.get("cells"):
        tuning_text = tuning_section(record, rows, out / "lr_sensitivity.png")
    transfer_text = ""
    if manifest is not None:
        results, incomplete = transfer_results(manifest)
        settings = manifest["settings"]
        transfer_text = (
            f"\n## Transfer\n\nEach source run continued on the other task's training set, a stratified "
            f"{settings.get('target_fraction', 0.01)} of it for {settings.get('epochs', 1)} epoch(s), scored on "
            f"its dev set; from scratch = the same run from the base checkpoint with fresh variants.\n\n"
            + (f"> {incomplete} source/target pair(s) miss a finished run and are left out.\n\n" if incomplete else "")
            + transfer_tables(results, baseline)
            + "\n![transfer](transfer.png)\n"
        )
        plot_transfer(results, out / "transfer.png")
        print(transfer_text)
    (out / "report.md").write_text(
        f"# Report: {args.grid.name}\n\n{caveat}{counts}{table}\n"
        "![metric vs trainable parameters](metric_vs_params.png)\n\n"
        "![training curves](training_curves.png)\n\n![cost per task](cost.png)\n" + tuning_text + transfer_text
    )
    plot_metric_vs_params(tasks, variants, values, extra, metrics, out / "metric_vs_params.png")
    plot_curves(rows, tasks, variants, out / "training_curves.png")
    plot_cost(tasks, variants, extra, out / "cost.png")
    if counts:
        print(counts.strip().lstrip("> "))
    print(table)
    if tuning_text:
        print(tuning_text)
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
