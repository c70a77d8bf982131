"""`--grid`: the Cartesian product of `numpy.linspace` axes, made batch by batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from derivcli.errors import UsageError
from derivcli.naming import summarized
from derivcli.points.base import PointBatch, PointSource
from derivcli.specs import GridAxis

# Above this many points a grid is refused: it would run for days, and it is
# almost always a typo (an extra zero in NUM).
MAX_GRID_POINTS = 10**10




class GridSource(PointSource):
    """The Cartesian product of `--grid` axes, first input varying slowest."""

    def __init__(self, axes: Sequence[GridAxis], input_names: Sequence[str]) -> None:
        by_name: dict[str, GridAxis] = {}
        default: GridAxis | None = None
        for axis in axes:
            if axis.name is None:
                if default is not None:
                    raise UsageError("--grid: only one grid may leave out the input name")
                default = axis
            elif axis.name not in input_names:
                raise UsageError(
                    f"--grid {axis.name}=...: {axis.name!r} is not an input "
                    f"(inputs: {summarized(input_names)})"
                )
            elif axis.name in by_name:
                raise UsageError(f"--grid: input {axis.name!r} has two grids")
            else:
                by_name[axis.name] = axis
        missing = [n for n in input_names if n not in by_name]
        if missing and default is None:
            raise UsageError(
                f"--grid: no grid for {', '.join(missing)}; add --grid NAME=START:STOP:NUM "
                "or one --grid START:STOP:NUM for every input not named"
            )
        # Counted before any value is made: a typo's 1e11 points is a usage error, not an out-of-memory one.
        self.axes: list[GridAxis] = [by_name.get(name, default) for name in input_names]  # type: ignore[misc]
        self.grid_shape = tuple(a.num for a in self.axes)
        self.grid_axes = list(input_names)
        self.total = math.prod(self.grid_shape)
        if self.total > MAX_GRID_POINTS:
            raise UsageError(
                f"--grid: {self.total:,} points is more than {MAX_GRID_POINTS:,}; "
                "use fewer points per axis, or run the axes' ranges as several runs with narrower --grid"
            )
        self.passthrough_names = []

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        return self.rows(0, self.total or 0, batch_size)

    def rows(self, start: int, stop: int, batch_size: int) -> Iterator[PointBatch]:
        """Points by index arithmetic: a shard at the end of a grid starts there at once."""
        from derivcli.shards import aligned_cuts

        assert self.grid_shape is not None
        for low, high in aligned_cuts(start, stop, batch_size):
            indices = np.unravel_index(np.arange(low, high), self.grid_shape)
            yield PointBatch(np.stack([linspace_at(a, i) for a, i in zip(self.axes, indices)], axis=1))

    def identity(self) -> list[object]:
        return ["grid", [(a.start, a.stop, a.num) for a in self.axes]]


def linspace_at(axis: GridAxis, indices: np.ndarray) -> np.ndarray:
    """`np.linspace(axis.start, axis.stop, axis.num)[indices]`, bit for bit, without the whole axis.

    A batch needs a few values of each axis; an axis of 1e9 points would take 8 GB.
    The arithmetic is NumPy's own (start + i * step, the last point exactly `stop`);
    a test compares the two.
    """
    i = indices.astype(np.float64)
    div = axis.num - 1
    delta = np.float64(axis.stop) - np.float64(axis.start)
    if div == 0:
        values = i * delta
    else:
        step = delta / div
        values = (i / div) * delta if step == 0 else i * step  # NumPy's special case for denormal steps
    values = values + np.float64(axis.start)
    if div:
        values[indices == div] = axis.stop
    return values
