"""Docs that cannot go stale: every relative link in README.md, docs/ and BENCHMARKS.md resolves (its
heading too), every `--flag` they name exists (on the command it is written with, where it is written
with one), and every `python -m ...` command in a code block parses with that module's own parser."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
OURS = ("train", "experiments")  # the packages whose `python -m` commands the docs may name
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "2>", "2>&1", "<"}
# flags of other tools that the docs mention (pip, torchrun, pytest, the duplicates tool, git, wandb)
OTHER_TOOLS = {
    "--nproc_per_node", "--nnodes", "--standalone", "--extra-index-url", "--index-url", "--no-deps",
    "--dist", "--maxfail", "--change", "--durations", "--basetemp", "--no-index", "--find-links",
    "--gpus-per-node", "--ntasks-per-node", "--cpus-per-task", "--array", "--count", "--project",
    "--check", "--fix",
}  # fmt: skip
EXAMPLE_FLAGS = {"--use_scale", "--scale_init"}  # docs/variants.md's worked example of adding a variant


class Parsed(BaseException):
    """Raised by the patched parse_args once a command's parser has taken its arguments."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parse_with(module: str, argv: list[str], strict: bool = True) -> argparse.ArgumentParser:
    """Run `module.main(argv)` until its parser has parsed `argv`, and stop there (nothing runs); the
    parser. With `strict`, a parse error fails the test with argparse's own message."""
    original, seen = argparse.ArgumentParser.parse_args, []

    def parse_args(self, args=None, namespace=None):
        seen.append(self)
        original(self, args, namespace)
        raise Parsed(self)

    argparse.ArgumentParser.parse_args = parse_args
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(module).main(argv)
    except Parsed as done:
        return done.parser
    except SystemExit:
        if strict or not seen:
            problem = [line for line in err.getvalue().splitlines() if "error:" in line] or [err.getvalue()]
            pytest.fail(f"python -m {module} {shlex.join(argv)}: {problem[0].strip()}")
        return seen[-1]
    finally:
        argparse.ArgumentParser.parse_args = original
    pytest.fail(f"python -m {module} never parsed its arguments")


@cache
def module_flags(module: str) -> frozenset[str]:
    if module == "train":
        module = "train.cli.entry"
    return frozenset(parse_with(module, ["--help"], strict=False).__dict__["_option_string_actions"])


@cache
def script_flags(script: str) -> frozenset[str]:
    """The flags a script declares, read from its source (tests do not import scripts/), and from the
    project modules it imports its `main` from."""
    tree = ast.parse((REPO / script).read_text())
    flags = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"--[a-z][\w-]*", node.value)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
            if any(alias.name == "main" for alias in node.names):
                flags |= script_flags(node.module.replace(".", "/") + ".py")
    return frozenset(flags)


def commands() -> list[str]:
    names = []
    for package in OURS:
        for path in sorted((REPO / package).glob("*.py")):
            text = path.read_text()
            hands_over = re.search(r"^from [\w.]+ import main$", text, flags=re.M)  # a command named at the top
            if ("def main(" in text or hands_over) and 'if __name__ == "__main__"' in text:
                names.append(f"{package}.{path.stem}")
            elif path.name == "__main__.py":  # `python -m train`: the main it imports
                names += re.findall(r"^from ([\w.]+) import main$", text, flags=re.M)
    return names


@cache
def every_flag() -> frozenset[str]:
    flags = set(OTHER_TOOLS)
    for module in commands():
        flags |= module_flags(module)
    for script in (REPO / "scripts").glob("*.py"):
        flags |= script_flags(f"scripts/{script.name}")
    return frozenset(flags)


def code_blocks(text: str) -> list[str]:
    """Each code block's shell lines, continuation lines joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def split_command(line: str) -> list[tuple[str, list[str]]]:
    """[(target, argv)] for each of our commands on a shell line: target is a module (`train.sonnet`)
    or a script (`scripts/x.py`)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    found = []
    for index, word in enumerate(words):
        rest = words[index + 1 :]
        if word in ("python", "python3", "torchrun") or word.endswith("/python"):
            if "-m" in rest[:4]:
                at = rest.index("-m")
                target, argv = rest[at + 1] if at + 1 < len(rest) else "", rest[at + 2 :]
            elif rest and re.fullmatch(r"scripts/\w+\.py", rest[0]):
                target, argv = rest[0], rest[1:]
            else:
                continue
            cut = next((i for i, w in enumerate(argv) if w in SHELL_OPERATORS), len(argv))
            if target.split(".")[0] in OURS or target.startswith("scripts/"):
                found.append((target, argv[:cut]))
    return found


def prose_commands(text: str) -> list[str]:
    """Inline code spans that hold one of our commands."""
    return [span for span in re.findall(r"`([^`\n]+)`", text) if re.search(r"python3? (-m |scripts/)", span)]


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page_id(page)}: link to {target} resolves to nothing"
        if anchor and resolved.suffix == ".md":
            assert anchor in headings(resolved), f"{page_id(page)}: {target} names no heading of {resolved.name}"


def headings(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    slugs = set()
    for title in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_in_a_code_block_parses_and_every_flag_exists(page):
    text = page.read_text()
    checked = 0
    for line in code_blocks(text):
        for target, argv in split_command(line):
            if target.startswith("scripts/"):
                assert (REPO / target).is_file(), f"{page_id(page)}: {target} does not exist: {line.strip()}"
                unknown = {w.split("=")[0] for w in argv if w.startswith("--")} - script_flags(target)
                assert not unknown, f"{page_id(page)}: {target} has no {sorted(unknown)}: {line.strip()}"
            else:
                parse_with("train.cli.entry" if target == "train" else target, argv)
            checked += 1
    for span in prose_commands(text):
        for target, argv in split_command(span):
            known = script_flags(target) if target.startswith("scripts/") else module_flags(target)
            unknown = {w.split("=")[0] for w in argv if w.startswith("--")} - known
            assert not unknown, f"{page_id(page)}: `{span}` names {sorted(unknown)}, which {target} does not take"
            checked += 1
    if page.name in ("README.md", "training.md", "experiments.md"):
        assert checked, f"{page_id(page)}: no command found: the extraction is broken"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_flag_named_anywhere_exists_on_some_command(page):
    text = re.sub(r"https?://\S+", "", page.read_text())
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9](?![\w<-])", text))
    unknown = sorted(named - every_flag() - EXAMPLE_FLAGS)
    assert not unknown, f"{page_id(page)} names flags no command takes: {unknown}"


def test_the_extraction_finds_what_it_must():
    """The checks above are only as good as the parsing of shell lines: check that parsing itself."""
    line = "GPT2_X=1 python -m train.sonnet --use_graph --model ckpt/tiny && python scripts/x.py --a 1 # note"
    assert split_command(line) == [
        ("train.sonnet", ["--use_graph", "--model", "ckpt/tiny"]),
        ("scripts/x.py", ["--a", "1"]),
    ]
    assert split_command("torchrun --nproc_per_node 2 -m train --task sst | tail") == [("train", ["--task", "sst"])]
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --no_such_flag"):
        parse_with("train.cli.entry", ["--task", "sst", "--no_such_flag"])
    assert "--jobs" in module_flags("experiments.ablate") and "--use_lora" in module_flags("train")


@pytest.mark.parametrize("module", commands())
def test_every_flag_of_every_command_has_help(module):
    parser = parse_with(module, ["--help"], strict=False)
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not silent, f"python -m {module}: {silent} have no help text"
