"""Parsing of the command line's small languages, and column names.

Grid specs (`x=-3:3:61`), `--at` points (`1,2`, `x=1,y=2`), partial-derivative
specs (`x,y^2`) and name lists are parsed here, before TensorFlow is imported,
so that a bad spec is a usage error that costs nothing. Every parser raises
`UsageError` with the option, the value received and the fix.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from derivcli.errors import UsageError
from derivcli.naming import (  # noqa: F401 (column names, re-exported where specs are read)
    NAME_PATTERN,
    MultiIndex,
    derivative_column,
    direction_column,
    laplacian_column,
    split_names,
    summarized,
)

# A derivative is a multi-index (`naming.MultiIndex`): how many times each input (in model
# order) is differentiated. (0, 2) is d2y/dx1^2 on a two-input model.


@dataclass(frozen=True)
class GridAxis:
    """One `--grid` option: `name` is None for a grid over every unnamed input."""

    name: str | None
    start: float
    stop: float
    num: int


@dataclass(frozen=True)
class AtPoint:
    """One `--at` option: positional values, or values by input name."""

    values: tuple[float, ...]
    names: tuple[str, ...] | None


def _parse_number(text: str, option: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(
            f"{option} {whole!r}: {text.strip()!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise UsageError(f"{option} {whole!r}: {text.strip()!r} is not a finite number")
    return value


def _check_name(name: str, option: str, whole: str) -> str:
    if not NAME_PATTERN.match(name):
        raise UsageError(
            f"{option} {whole!r}: {name!r} is not a valid name "
            "(letters, digits, '_' and '.', not starting with a digit; x[3,2,0] for an element of a tensor input)"
        )
    return name


def parse_grid(text: str) -> GridAxis:
    """Parses a `--grid` spec, `[NAME=]START:STOP:NUM`.

    Args:
        text: the option's value, for example `x=-3:3:61` or `0:1:11`.

    Returns:
        The parsed axis; `num` points from `start` to `stop`, both included.

    Raises:
        UsageError: the spec is malformed, `num` is not a positive integer, or
            `num` is 1 while `start != stop`.

    Example:
        >>> parse_grid("x=-1:1:3")
        GridAxis(name='x', start=-1.0, stop=1.0, num=3)
    """
    name: str | None = None
    body = text.strip()
    if "=" in body:
        name, body = (part.strip() for part in body.split("=", 1))
        _check_name(name, "--grid", text)
    fields = body.split(":")
    if len(fields) == 1 and re.fullmatch(r"\s*[-+]?[\d.]+(?:[eE][-+]?\d+)?\s*", body):
        value = body.strip()
        raise UsageError(f"--grid {text!r}: a grid axis is START:STOP:NUM; to hold {name or 'an input'} at {value}, "
                         f"write --grid {name + '=' if name else ''}{value}:{value}:1")
    if len(fields) != 3:
        raise UsageError(
            f"--grid {text!r}: expected START:STOP:NUM, for example x=-3:3:61 "
            "(61 points from -3 to 3, both included)"
        )
    start = _parse_number(fields[0], "--grid", text)
    stop = _parse_number(fields[1], "--grid", text)
    try:
        num = int(fields[2])
    except ValueError:
        raise UsageError(
            f"--grid {text!r}: NUM {fields[2].strip()!r} must be a whole number of points"
        ) from None
    if num < 1:
        raise UsageError(f"--grid {text!r}: NUM must be at least 1, got {num}")
    if num == 1 and start != stop:
        raise UsageError(
            f"--grid {text!r}: one point cannot span {start:g} to {stop:g}; "
            f"pin the input with {start:g}:{start:g}:1"
        )
    return GridAxis(name, start, stop, num)


def parse_at(text: str, option: str = "--at") -> AtPoint:
    """Parses an `--at` point: `0.5`, `1,2` or `x=1,y=2`.

    Raises:
        UsageError: a value is not a number, or names are mixed with
            positional values.
    """
    fields = [field.strip() for field in split_names(text)]
    named = ["=" in field for field in fields]
    if any(named) and not all(named):
        raise UsageError(
            f"{option} {text!r}: give every value by name (x=1,y=2) or none (1,2), not a mix"
        )
    if all(named):
        pairs = [field.split("=", 1) for field in fields]
        names = tuple(_check_name(name.strip(), option, text) for name, _ in pairs)
        if len(set(names)) != len(names):
            raise UsageError(f"{option} {text!r}: an input is named twice")
        values = tuple(_parse_number(value, option, text) for _, value in pairs)
        return AtPoint(values, names)
    return AtPoint(tuple(_parse_number(field, option, text) for field in fields), None)


@dataclass(frozen=True)
class Direction:
    """One `--direction`: a vector, positional or by input name, and the derivative's order."""

    vector: AtPoint
    order: int
    text: str


# The highest derivative order derivcli computes. Taylor series reach it in seconds (order 16 is
# tested against closed forms); beyond it float64 round-off swamps a derivative of a network, and
# a typo such as x^1000000000 must not run out of memory.
MAX_ORDER = 32
# The most columns one run may ask for (`--order 10` over 10 inputs alone would be 92,378).
MAX_COLUMNS = 10_000


def check_order(order: int, option: str, text: str) -> None:
    """Raises UsageError when a derivative's order is above MAX_ORDER."""
    if order > MAX_ORDER:
        raise UsageError(f"{option} {text!r}: order {order:,} is above the highest derivcli computes, {MAX_ORDER}")


def parse_direction(text: str) -> Direction:
    """Parses a `--direction` spec: a vector written as `--at` writes a point, then `^N` for order N.

    `1,1` is the derivative along v = (1, 1); `x=1,t=2^3` the third derivative
    along x + 2t (inputs not named are 0).

    Raises:
        UsageError: a bad vector or order.
    """
    vector, caret, power = text.rpartition("^")
    if not caret:
        vector, power = text, "1"
    if not (power.strip().isascii() and power.strip().isdigit()) or int(power) < 1:
        raise UsageError(f"--direction {text!r}: the order {power.strip()!r} after ^ must be a positive whole number")
    check_order(int(power), "--direction", text)
    return Direction(parse_at(vector, "--direction"), int(power), text)


def resolve_direction(direction: Direction, input_names: Sequence[str]) -> tuple[float, ...]:
    """The direction as a vector over the model's inputs.

    Raises:
        UsageError: the wrong number of values, an unknown name, or a zero or non-finite vector.
    """
    point = direction.vector
    if point.names is None:
        if len(point.values) != len(input_names):
            raise UsageError(
                f"--direction {direction.text!r}: {len(point.values)} value(s) for "
                f"{len(input_names)} input(s) ({summarized(input_names)})"
            )
        vector = tuple(point.values)
    else:
        unknown = [n for n in point.names if n not in input_names]
        if unknown:
            raise UsageError(
                f"--direction {direction.text!r}: {', '.join(unknown)} is not an input (inputs: {summarized(input_names)})"
            )
        by_name = dict(zip(point.names, point.values))
        vector = tuple(by_name.get(n, 0.0) for n in input_names)
    if not all(math.isfinite(v) for v in vector) or not any(vector):
        raise UsageError(f"--direction {direction.text!r}: the vector must be finite and not zero")
    return vector



def parse_partial(text: str) -> dict[str, int]:
    """Parses a `--partial` spec into powers by input name.

    Args:
        text: `x` (d/dx), `x^8`, or `x,y^2` (d3/dx dy^2).

    Returns:
        The power of each named input, in the order written; a name written
        twice adds up (`x,x` is `x^2`).

    Raises:
        UsageError: an empty part, a bad name, or a power that is not a
            positive integer.
    """
    column = re.fullmatch(r"\s*d(\d*)\w*/((?:d[^d].*)+)", text)
    if column:  # a column name pasted back: d2y/dx0^2, d3y/dx0dx1^2
        spec = ",".join(part for part in re.split(r"(?:^|(?<=[\w\]]))d(?=[A-Za-z_\[])", column[2]) if part)
        raise UsageError(f"--partial {text!r} is a column's name; --partial names the inputs to differentiate by: "
                         f"--partial {spec} (x0^2 for d2y/dx0^2, x0,x1 for d2y/dx0dx1)")
    powers: dict[str, int] = {}
    for part in split_names(text):
        name, caret, power_text = part.strip().partition("^")
        name = name.strip()
        if caret and not power_text.strip():
            raise UsageError(f"--partial {text!r}: no power after ^ of {name or '?'}; write for example {name or 'x'}^2")
        if not name:
            raise UsageError(
                f"--partial {text!r}: empty input name; write for example x, x^2 or x,y^2"
            )
        _check_name(name, "--partial", text)
        power = 1
        if power_text:
            if not (power_text.strip().isascii() and power_text.strip().isdigit()) or int(power_text) < 1:
                raise UsageError(
                    f"--partial {text!r}: the power {power_text.strip()!r} of {name} "
                    "must be a positive whole number"
                )
            power = int(power_text)
        powers[name] = powers.get(name, 0) + power
        check_order(sum(powers.values()), "--partial", text)
    return powers


def parse_names(text: str, option: str) -> list[str]:
    """Parses a comma-separated list of distinct names (`--names a,b`)."""
    names = [name.strip() for name in split_names(text)]
    for name in names:
        _check_name(name, option, text)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"{option} {text!r}: {', '.join(duplicates)} named twice")
    return names


def parse_shard(text: str) -> tuple[int, int]:
    """Parses `--shard K/N`, K from 0 to N-1."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise UsageError(f"--shard {text!r}: expected K/N with 0 <= K < N, for example 0/4")
    return int(match[1]), int(match[2])


def resolve_partial(
    powers: dict[str, int], input_names: Sequence[str], option: str = "--partial"
) -> MultiIndex:
    """Turns powers by name into a multi-index over the model's inputs.

    Raises:
        UsageError: a name that is not an input, with the inputs listed.
    """
    index = [0] * len(input_names)
    for name, power in powers.items():
        if name not in input_names:
            joined = _as_inputs(name, set(input_names))
            hint = f"; did you mean {','.join(joined)} (inputs separated by commas)?" if joined else \
                "; rename inputs with --names"
            raise UsageError(f"{option}: {name!r} is not an input of the model (inputs: {summarized(input_names)}){hint}")
        index[input_names.index(name)] += power
    return tuple(index)


def _as_inputs(text: str, inputs: set[str]) -> list[str] | None:
    """`text` as input names written together (`x0x1` is x0 then x1), the fewest; None when it is not."""
    best: list[list[str] | None] = [[]] + [None] * len(text)
    for end in range(1, len(text) + 1):
        for start in range(end):
            if best[start] is not None and text[start:end] in inputs:
                candidate = best[start] + [text[start:end]]  # type: ignore[operator]
                if best[end] is None or len(candidate) < len(best[end]):  # type: ignore[arg-type]
                    best[end] = candidate
    found = best[len(text)]
    return found if found is not None and len(found) > 1 else None


def all_partials(order: int, positions: Sequence[int], dimension: int) -> list[MultiIndex]:
    """Every mixed partial of total `order` over the inputs at `positions`.

    The order is that of an upper triangle read row by row: for order 2 over
    (x, y) it is x^2, x y, y^2.
    """
    partials = []
    for combination in itertools.combinations_with_replacement(positions, order):
        index = [0] * dimension
        for position in combination:
            index[position] += 1
        partials.append(tuple(index))
    return partials

