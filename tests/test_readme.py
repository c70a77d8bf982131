"""The README's outputs are generated, not pasted: every `$ derivcli ...` of a console block runs here.

Each console block is run command by command in a folder that sees `sample_models/`,
through bash with the installed `derivcli` first on PATH; standard error and output
are read from one pipe, in the order they were written. Text must match exactly
(runs of spaces aside, since table widths follow the numbers). Numbers match within
RTOL of themselves plus ATOL times the largest number on their line, or 1 if that is
smaller: the sample models are float32 nets of at most a few hundred weights with
intermediate values of order 1, whose results move with the summation order of the
machine's kernels (oneDNN or not, thread count) by a few hundred float32 ulps of that
scale, about 1e-5 (a value near 0 such as y(0) of the square fit is a cancellation of
order-1 terms, and moves by that much in absolute terms). A number below that floor
(the round-off errors `check` prints) only has to stay below it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RTOL = 2e-5
ATOL = 1e-5
NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def console_commands() -> list[tuple[int, str, list[str]]]:
    """(line number, command, expected output lines) for every command of the README's console blocks
    that runs on the shipped sample models; `$ echo $?` lines are kept as commands."""
    lines = (ROOT / "README.md").read_text().splitlines()
    commands: list[tuple[int, str, list[str]]] = []
    inside = False
    current: list | None = None
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            inside = line.strip() == "```console" and not inside
            current = None
            continue
        if not inside:
            continue
        if line.startswith("$ "):
            current = [number, line[2:], []]
            commands.append(current)
        elif current is not None and current[1].endswith("\\"):
            current[1] = current[1][:-1] + " " + line.strip()
        elif current is not None:
            current[2].append(line)
    runnable = []
    for index, (number, command, output) in enumerate(commands):
        is_status = command.strip() == "echo $?"
        previous = commands[index - 1][1] if index else ""
        about_itself = command.startswith("derivcli ") and ("--help" in command or command.startswith("derivcli version"))
        if "sample_models/" in command or (is_status and "sample_models/" in previous) or command.startswith("python -c") \
                or about_itself:
            runnable.append((number, command, output))
    return runnable


def braille_cells_differ(expected: str, actual: str) -> int | None:
    """How many Braille cells two lines of a terminal plot differ in; None unless both are such lines.

    A curve's dot is its value rounded to one of 4 x (rows) levels: a value that moves by
    round-off (above) next to a rounding boundary moves one dot. Two such cells a line are allowed.
    """
    def cells(line: str) -> str:
        return "".join(ch for ch in line if 0x2800 <= ord(ch) <= 0x28FF)

    if not cells(expected) or len(cells(expected)) != len(cells(actual)):
        return None
    return sum(a != b for a, b in zip(cells(expected), cells(actual)))


def same(expected: str, actual: str) -> bool:
    """Whether two output lines say the same, numbers within the tolerances above."""
    differ = braille_cells_differ(expected, actual)
    if differ is not None:
        keep = lambda line: "".join(ch for ch in line if not 0x2800 <= ord(ch) <= 0x28FF)  # noqa: E731
        return differ <= 2 and same(keep(expected), keep(actual))

    def split(line: str) -> tuple[str, list[float]]:
        return " ".join(NUMBER.sub("#", line).split()), [float(n) for n in NUMBER.findall(line)]

    expected_text, expected_numbers = split(expected)
    actual_text, actual_numbers = split(actual)
    if expected_text != actual_text or len(expected_numbers) != len(actual_numbers):
        return False
    floor = ATOL * max([1.0, *(abs(n) for n in expected_numbers)])
    return all(abs(a - e) <= RTOL * max(abs(a), abs(e)) + floor for a, e in zip(actual_numbers, expected_numbers))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "sample_models").symlink_to(ROOT / "sample_models")
    return folder


COMMANDS = console_commands()


def test_the_readme_has_commands_to_run():
    assert len(COMMANDS) >= 15


@pytest.mark.slow
def test_every_readme_command_prints_what_the_readme_shows(workdir):
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "COLUMNS": "200", "NO_COLOR": "1"}
    status = 0
    mismatches = []
    for number, command, expected in COMMANDS:
        if command.strip() == "echo $?":
            if expected != [str(status)]:
                mismatches.append(f"README line {number}: status {status}, README says {expected}")
            continue
        done = subprocess.run(["bash", "-c", command + " 2>&1"], cwd=workdir, env=environment,
                              capture_output=True, text=True, timeout=300)
        status = done.returncode
        actual = done.stdout.rstrip("\n").splitlines()
        if len(actual) != len(expected) or not all(same(e, a) for e, a in zip(expected, actual)):
            mismatches.append(f"README line {number}: $ {command}\n--- README\n" + "\n".join(expected)
                              + "\n--- actual\n" + "\n".join(actual))
    assert not mismatches, "\n\n".join(mismatches)
