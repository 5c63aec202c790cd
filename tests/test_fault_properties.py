"""Property-based faults (hypothesis): a finished run, made interrupted, then one of its files damaged at
random: deleted, truncated, replaced by a folder, or still parseable with a value of a wrong type or
range at a random place in it. For every example `--resume` either finishes the run cleanly or stops
with exactly one `error:` line and exit 2, with no traceback, and a refused resume changes no file.

`make check` runs a bounded number of examples; more by hand:

    GPT2_FAULT_EXAMPLES=50 python -m pytest tests/test_fault_properties.py    # 50 per file and damage
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_faults import QUICK, RUN_FILES, run_paths
from train import sentiment

EXAMPLES = int(os.environ.get("GPT2_FAULT_EXAMPLES", "3"))  # per file and damage: 64 in make check
# the run files a resume reads (test_faults.RUN_FILES, less the finished run's own) and the best state.json
FILES = [f for f in RUN_FILES if f not in ("metrics.json", "diverged.json")] + ["checkpoints/best-*/state.json"]
DAMAGES = ["delete", "truncate", "folder", "wrong value"]
# JSON values of every kind, small enough to read in a failure report
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


def _paths(value, prefix=()):
    """Every place in a JSON value (a key path), the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, (*prefix, index))


def _replace(value, path, new):
    if not path:
        return new
    value[path[0]] = _replace(value[path[0]], path[1:], new)
    return value


def _snapshot(run: Path) -> dict[str, bytes]:
    files = [p for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def finished_run(tiny_ckpt, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("property_grid")
    argv = ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, out), *QUICK, "--max_steps", "3"]
    assert sentiment.main(argv) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run, argv


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("file", FILES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run of the suite
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_damaged_run_file_resumes_cleanly_or_is_one_error_line(finished_run, capsys, file, damage, data):
    source, argv = finished_run
    with tempfile.TemporaryDirectory() as folder:
        grid = Path(folder) / "grid"
        shutil.copytree(source.parent, grid)
        run = grid / source.name
        (run / "metrics.json").unlink()  # interrupted at its last checkpoint
        (target,) = list(run.glob(file)) or [run / file]
        if damage == "delete":
            target.unlink(missing_ok=True)
        elif damage == "truncate":
            content = target.read_bytes() if target.exists() else b""
            target.write_bytes(content[: data.draw(st.integers(0, max(0, len(content) - 1)), label="keep bytes")])
        elif damage == "folder":
            target.unlink(missing_ok=True)
            target.mkdir()
        elif target.suffix == ".json":
            value = json.loads(target.read_text())
            where = data.draw(st.sampled_from(list(_paths(value))), label="where")
            target.write_text(json.dumps(_replace(value, where, data.draw(JSON_VALUES, label="new value"))))
        elif target.suffix == ".jsonl":
            lines = target.read_text().splitlines()
            index = data.draw(st.integers(0, len(lines) - 1), label="line")
            lines[index] = json.dumps(data.draw(JSON_VALUES, label="new line"))
            target.write_text("\n".join(lines) + "\n")
        else:  # safetensors: a valid file whose tensors have other names or shapes
            from safetensors.torch import load_file, save_file

            tensors = load_file(str(target))
            name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
            tensors[name] = tensors[name].flatten()[: data.draw(st.integers(0, 3), label="length")].clone()
            save_file(tensors, str(target))
        argv_here = [a.replace(str(source.parent), str(grid)) for a in argv]
        before = _snapshot(run)
        capsys.readouterr()
        status = sentiment.main([*argv_here, "--resume"])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        if status == 0:
            assert json.loads((run / "metrics.json").read_text())["steps"] == 3, err
        else:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert status == 2 and len(errors) == 1, err
            after = _snapshot(run)
            assert {k: v for k, v in after.items() if k != "log.jsonl"} == {
                k: v for k, v in before.items() if k != "log.jsonl"
            }, "a refused resume changed the run folder"


# ---------------------------------------------------------------- hostile flag values

NUMBER_TEXT = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e309", "0", "-0", "0x10", "1_000", "", " ", "four", "1e-400"]),
)
FLAGS = ["--lr", "--lora_r", "--lora_alpha", "--lora_dropout", "--batch_size", "--epochs", "--max_length"]
FLAGS += ["--weight_decay", "--warmup", "--kan_grid_size", "--graph_heads", "--resid_pdrop", "--seed"]


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    flag=st.sampled_from(FLAGS),
    value=NUMBER_TEXT,
    peft=st.none()
    | st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules"]), JSON_VALUES),  # noqa: E501
)
def test_hostile_flag_values_are_accepted_or_one_error_line(finished_run, capsys, flag, value, peft):
    """Any value of a numeric flag, and a peft_config of any shape: the command line is either a valid
    run (parsed and sized, not trained) or exit 2 with one `error:` line, never a traceback."""
    from train.cli import entry

    _, argv = finished_run
    extra = [flag, value]
    if flag in ("--lora_r", "--lora_alpha", "--lora_dropout"):
        extra.append("--use_lora")
    if flag == "--kan_grid_size":
        extra.append("--use_kan")
    if flag == "--graph_heads":
        extra.append("--use_graph")
    if peft is not None:
        extra = ["--peft_method", "lora", "--peft_config", json.dumps(peft)]
    capsys.readouterr()
    try:
        entry.parse(entry.GENERIC, ["--task", *argv[1:], *extra], inputs=False)
    except SystemExit as stop:
        err = capsys.readouterr().err
        assert stop.code == 2 and sum(line.startswith("error:") for line in err.splitlines()) == 1, err
