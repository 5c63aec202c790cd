from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import TokenizerNotFound, load_tokenizer
from tests.conftest import DATA_DIR, REPO, data_limits


def test_explicit_path(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("yes") == [8505] and tok.encode("no") == [3919]
    assert tok.pad_token_id == tok.eos_token_id == 50256


def test_the_tokenizer_equals_transformers_on_every_line_of_every_task_file(tokenizer_dir, tmp_path):
    """A folder with tokenizer.json is read by the tokenizers library (model.tokenizer.GPT2BPE): its ids
    and texts are transformers' GPT-2 tokenizer's, on every line of the task data, decoded with and
    without special tokens, and on random ids (EOS among them); and built from vocab.json + merges.txt
    alone, it is the same tokenizer (on every fifth line and the written ones)."""
    import random

    from transformers import AutoTokenizer

    from model.tokenizer import GPT2BPE

    ours, theirs = load_tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert isinstance(ours, GPT2BPE) and len(ours) == len(theirs)
    written = ["", "  two  spaces ", "<|endoftext|> after EOS", "Ünïcödé ☃ 日本語 and tabs\t."]
    lines = [line for path in sorted(DATA_DIR.iterdir()) for line in path.read_text().splitlines()] + written
    assert len(lines) > 30_000
    encoded = ours(lines, add_special_tokens=False)["input_ids"]
    assert encoded == theirs(lines, add_special_tokens=False)["input_ids"]
    # what special tokens add is per sequence, not per text: every tenth line (and the written ones) shows it
    some = lines[::10] + written
    assert ours(some)["input_ids"] == theirs(some)["input_ids"]
    few = lines[::50] + written
    assert [ours.encode(line) for line in few] == [theirs.encode(line) for line in few]
    rng = random.Random(0)
    random_ids = [[rng.choice([50256, rng.randrange(50257)]) for _ in range(12)] for _ in range(500)]
    samples = encoded[::20] + encoded[-len(written) :] + random_ids
    for skip in (False, True):
        assert [ours.decode(ids, skip_special_tokens=skip) for ids in samples] == [
            theirs.decode(ids, skip_special_tokens=skip) for ids in samples
        ]
    assert ours.decode([15496, 50256]) == theirs.decode([15496, 50256]) == "Hello<|endoftext|>"
    bpe_files = tmp_path / "bpe-files"  # no tokenizer.json: the BPE is built from the vocab and merges
    bpe_files.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (bpe_files / name).write_bytes((tokenizer_dir / name).read_bytes())
    built = load_tokenizer(bpe_files)
    assert built(lines[::5] + written, add_special_tokens=False)["input_ids"] == encoded[::5] + encoded[-len(written) :]
    assert [built.decode(ids) for ids in samples] == [ours.decode(ids) for ids in samples]
    assert built.pad_token_id == built.eos_token_id == 50256


def test_environment_variable(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("GPT2_TOKENIZER", str(tokenizer_dir))
    assert load_tokenizer().encode(" yes") == [3763]


def test_explicit_path_wins_over_environment(tokenizer_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2_TOKENIZER", str(tmp_path / "nowhere"))
    assert load_tokenizer(tokenizer_dir).encode(" no") == [645]


def test_nothing_loadable_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT2_TOKENIZER", raising=False)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerNotFound, match="GPT2_TOKENIZER"):
        load_tokenizer(tmp_path / "empty")


def test_non_gpt2_vocabulary_is_rejected(tokenizer_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Hello"], vocab["world"] = vocab["world"], vocab["Hello"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerNotFound, match="not GPT-2's BPE"):
        load_tokenizer(folder)


def test_the_task_data_package_is_the_datasets_folder_imported_as_task_data():
    import task_data.common

    assert Path(task_data.common.__file__).resolve().parent == REPO / "datasets"
    assert not (REPO / "datasets" / "__init__.py").exists()  # so it never shadows Hugging Face's `datasets`


@pytest.mark.slow
def test_training_runs_beside_a_package_named_datasets(tiny_ckpt, tokenizer_dir, tmp_path):
    """Most researchers' environments have Hugging Face's `datasets`: a stand-in of it is installed
    (put on the path), and a training command started outside the repository runs, while `import
    datasets` is that package, from anywhere (the repository root included)."""
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text("IS_STAND_IN = True\n\ndef load_dataset(*a, **k):\n    return {}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    probe = "import datasets; print(datasets.IS_STAND_IN)"
    for where in (tmp_path, REPO):
        seen = subprocess.run([sys.executable, "-c", probe], cwd=where, env=env, capture_output=True, text=True)
        assert seen.stdout == "True\n", (where, seen.stderr[-500:])
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "train.sentiment", "--dataset", "sst", "--model", str(tiny_ckpt[0])]
    command += ["--tokenizer", str(tokenizer_dir), "--data_dir", str(DATA_DIR), "--out_dir", str(out)]
    command += ["--max_steps", "2", *data_limits(8), "--wandb", "disabled"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(out.glob("sst-*/metrics.json"))) == 1


def test_required_top_level_layout():
    for name in ("requirements.txt", "model", "modules", "train", "datasets", "scripts", "experiments", "README.md"):
        assert (REPO / name).exists(), name


def _imports(path: Path) -> set[str]:
    """The modules a file imports (absolute names), read from its syntax tree."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_layering_the_loop_knows_neither_the_command_line_nor_the_variants_and_nothing_imports_scripts():
    for path in (REPO / "train" / "fit").glob("*.py"):
        names = _imports(path)
        assert not any(name.startswith(("train.cli", "modules")) for name in names), (path, names)
    product = [
        p for folder in ("model", "modules", "train", "datasets", "experiments") for p in (REPO / folder).rglob("*.py")
    ]
    tests = list((REPO / "tests").rglob("*.py"))
    for path in [*product, *tests]:
        if "fixtures" in path.parts:
            continue
        assert not any(name == "scripts" or name.startswith("scripts.") for name in _imports(path)), path
    for path in [*product, *(REPO / "scripts").glob("*.py")]:
        assert "sys.path.insert" not in path.read_text(), path


PACKAGES = {
    "model": "model",
    "modules": "modules",
    "train": "train",
    "datasets": "task_data",
    "experiments": "experiments",
}


def project_modules() -> dict[str, Path]:
    """Every module of the product by its import name (the folder datasets/ is task_data)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth (imports inside functions count)."""
    modules = project_modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = {owner(imported) for imported in _imports(path)} - {None, name}
        graph[name] = {t for t in targets if not (name.startswith(t + ".") and modules[t].name == "__init__.py")}
    return graph


def test_no_import_circles_counting_imports_inside_functions():
    graph, circles = import_graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


# train/'s rooms from the ground up; a module may import its own room and the rooms beneath it. The modules
# at train/'s top (`python -m train`, train.sentiment, ..., train.evaluate, train.transfer) are the commands.
TRAIN_ROOMS = ("train.base", "train.tasks", "train.run", "train.trainer", "train.cli")


def train_room(module: str) -> int:
    for floor, room in enumerate(TRAIN_ROOMS):
        if module == room or module.startswith(room + "."):
            return floor
    return len(TRAIN_ROOMS)  # the commands at the top


def test_train_rooms_import_only_downwards_and_its_top_holds_only_thin_commands():
    graph = import_graph()
    upward = [
        (module, target)
        for module, targets in graph.items()
        if module.startswith("train.")
        for target in targets
        if target.startswith("train.") and train_room(target) > train_room(module)
    ]
    assert not upward, upward
    top = [p for p in (REPO / "train").glob("*.py") if p.name != "__init__.py"]
    assert {p.stem for p in top} == {
        "__main__",
        "sentiment",
        "paraphrase",
        "sonnet",
        "multitask",
        "evaluate",
        "transfer",
    }
    for path in top:  # a command names its entry point and hands over: no work of its own
        assert len(path.read_text().splitlines()) <= 40, path
        assert all(name.startswith(("train.cli", "sys", "dataclasses")) for name in _imports(path)), path
    beneath = {p.parent.name for p in (REPO / "train").glob("*/*.py")} - {"__pycache__"}
    assert beneath == {room.split(".")[1] for room in TRAIN_ROOMS}, beneath


def test_tasks_know_nothing_of_the_fast_step_and_model_names_no_method():
    """Graph capture is the training loop's business (it hands tasks train.trainer.graphs.EvaluationGraphs);
    method names stay in modules/, where each variant says what it needs (quantize_refusal,
    capture_blocker, peft_export)."""
    import ast

    import peft

    for path in (REPO / "train" / "tasks").glob("*.py"):
        assert not {
            n for n in _imports(path) if n == "train.trainer.graphs" or n.startswith("train.trainer.graphs.")
        }, path
    methods = {name.lower() for name in peft.PeftType.__members__}
    named = [
        (path.name, node.lineno, node.value)
        for path in sorted((REPO / "model").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in methods
    ]
    assert not named, named
    # nor the variants that change the forward pass: they reach it through ForwardChange's hooks, and model/
    # imports neither their modules nor their attributes
    own = ("prompt_learning", "xlora", "virtual_tokens", "expert_mixer", "VirtualTokens", "ExpertMixer")
    mentions = [
        (path.name, node.lineno, name)
        for path in sorted((REPO / "model").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        for name in own
        if (isinstance(node, ast.Attribute) and node.attr == name)
        or (isinstance(node, ast.Name) and node.id == name)
        or (isinstance(node, ast.ImportFrom) and name in (node.module or "").split("."))
    ]
    assert not mentions, mentions


def test_a_launchers_job_process_and_the_run_folder_readers_do_not_import_torch():
    """A submitit job (experiments.launchers.GridJob, unpickled in its own process) only starts the run's
    command and watches its folder: it must not pay torch's import (seconds, and memory on the node)."""
    import subprocess
    import sys

    code = (
        "import sys, experiments.launchers, train.run.state, train.run.log, train.trainer.lifecycle\n"
        "import model.files, model\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'model.gpt2') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_the_project_is_installed_and_its_commands_run_from_any_directory(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import train, experiments, scripts, model; print(train.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and Path(done.stdout.strip()).resolve().parent == REPO / "train", done.stderr
    for module in ("experiments.report",):  # one command is enough: they all import the same way
        help_run = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert help_run.returncode == 0 and help_run.stdout.startswith("usage:"), (module, help_run.stderr)


def test_every_package_folder_is_installed():
    """pyproject lists its packages by name (the folder datasets/ is installed as task_data): a new
    sub-package left off the list would be missing from an install."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"model", "modules", "train", "experiments", "scripts"}
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for folder in folders
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert set(setup["packages"]) == found | {"task_data"}
    assert setup["package-dir"] == {"task_data": "datasets"}


def test_a_damaged_tokenizer_json_is_one_error_naming_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"')
    with pytest.raises(TokenizerNotFound, match=r"tokenizer\.json: EOF while parsing"):
        load_tokenizer(tmp_path)
