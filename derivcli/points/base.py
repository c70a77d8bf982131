"""Points as batches: `PointBatch`, the `PointSource` every source is, and `rebatch`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PointBatch:
    """A batch of points: coordinates in input order and pass-through cells."""

    coordinates: np.ndarray  # (rows, inputs), float64
    # One per column: CSV's cells as text, or an NPZ/HDF5 array's column in its dtype.
    passthrough: list[list[str] | np.ndarray] = field(default_factory=list)
    stalled: bool = False  # the input paused after these rows: compute them now, not when a batch is full


class PointSource:
    """A stream of points for the inputs `input_names`.

    Attributes:
        passthrough_names: columns carried through unchanged (CSV's other columns, NPZ's and HDF5's other arrays).
        passthrough_shapes: for arrays, (name, dtype, shape of one row) of each, whose elements are the columns in order.
        notes: what a user should know about the points (an array not passed through).
        grid_shape: the grid's shape for `--grid`, else None.
        grid_axes: the inputs along the grid's axes, in order.
        total: the number of points when known in advance, else None.
        run_total: the whole run's points (every shard's), when known.
    """

    passthrough_names: list[str]
    passthrough_shapes: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    notes: list[str] = []
    grid_shape: tuple[int, ...] | None = None
    grid_axes: list[str] | None = None
    total: int | None = None
    shard: tuple[int, int] | None = None
    start: int = 0  # the first point's place in the whole run (a shard's first point)

    @property
    def run_total(self) -> int | None:
        return self.total

    @property
    def size_in_advance(self) -> int | None:
        """The whole run's points when an unsharded run knows them before reading any:
        a grid's, an NPZ's, `--at`'s; None for CSV, which is counted only to be sharded."""
        return self.run_total

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        raise NotImplementedError

    def rows(self, start: int, stop: int, batch_size: int) -> Iterator[PointBatch]:
        """Points [start, stop), cut where `batches(batch_size)` cuts them.

        This one reads every batch before `start`; sources that can, start at `start` directly.
        """
        position = 0
        for batch in self.batches(batch_size):
            size = len(batch.coordinates)
            low, high = max(start - position, 0), min(stop - position, size)
            if low < high:
                yield PointBatch(batch.coordinates[low:high], [column[low:high] for column in batch.passthrough])
            position += size
            if position >= stop:
                return

    def identity(self) -> list[object]:
        """What tells these points from others, for a shard's record (see `shards.run_identity`)."""
        return [type(self).__name__, self.total]




def rebatch(blocks: Iterator[PointBatch], batch_size: int, first_row: int = 0) -> Iterator[PointBatch]:
    """The rows of `blocks`, of any sizes, cut at every multiple of `batch_size` counted from row 0.

    `first_row` is the row the blocks start at (a shard's first): the first batch
    then ends where the unsharded run's batch ends. The last batch may be shorter.
    """
    parts: list[PointBatch] = []
    rows = 0
    size = batch_size - first_row % batch_size
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            parts.append(block)
            rows += len(block.coordinates)
            if rows < size and not block.stalled:
                continue
        if not rows:
            if block is None:
                return
            continue
        coordinates = np.concatenate([part.coordinates for part in parts])
        passthrough = [joined(column) for column in zip(*(part.passthrough for part in parts))]
        start = 0
        flush = block is None or block.stalled  # the end, or a pause of the input: the rest goes now
        while rows - start >= size or (flush and start < rows):
            end = min(start + size, rows)
            yield PointBatch(coordinates[start:end], [c[start:end] for c in passthrough])
            start, size = end, batch_size
        parts = [PointBatch(coordinates[start:], [c[start:] for c in passthrough])]
        rows -= start


def joined(pieces: tuple[list[str] | np.ndarray, ...]) -> list[str] | np.ndarray:
    """One pass-through column's pieces as one: a list of text cells, or an array."""
    if pieces and isinstance(pieces[0], np.ndarray):
        return np.concatenate(pieces)
    return list(itertools.chain.from_iterable(pieces))
