"""The longest silence of a command whose output goes to a file (as under a scheduler or `nohup`).

    python scripts/silence.py [--log FILE] -- python -m train.sonnet --use_graph --model ckpt/tiny

Runs the command with stdout and stderr on a pipe (not a terminal), stamps every line as it arrives,
and prints the wall time, the time to the first line, the longest gap between two lines (with the
lines around it) and the time from the last line to the exit. `--log` keeps the stamped output.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from train.cli.exits import exit_status


def stamped_lines(command: list[str]) -> tuple[list[tuple[float, str]], float, int]:
    """[(seconds since start, line)], the wall time and the exit status of `command`."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines = []
    for raw in process.stdout:
        lines.append((time.perf_counter() - start, raw.decode(errors="replace").rstrip("\n")))
    code = process.wait()
    return lines, time.perf_counter() - start, code


def longest_gap(lines: list[tuple[float, str]], wall: float) -> tuple[float, str, str]:
    """(seconds, line before, line after) of the longest silence, counting the start and the exit."""
    marks = [(0.0, "<start>"), *lines, (wall, "<exit>")]
    gaps = [(b[0] - a[0], a[1], b[1]) for a, b in zip(marks, marks[1:], strict=False)]
    return max(gaps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", help="write the output here, each line stamped with its time")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    lines, wall, code = stamped_lines(command)
    if args.log:
        with open(args.log, "w") as handle:
            handle.writelines(f"{t:8.1f}s  {line}\n" for t, line in lines)
    gap, before, after = longest_gap(lines, wall)
    first = lines[0][0] if lines else wall
    tail = wall - lines[-1][0] if lines else wall
    print(
        f"exit {code}; wall {wall:.1f} s; {len(lines)} lines; first line at {first:.1f} s; "
        f"last line to exit {tail:.1f} s"
    )
    print(f"longest silence {gap:.1f} s, between\n  {before[:150]}\n  {after[:150]}")
    return code


if __name__ == "__main__":
    sys.exit(exit_status(main))
