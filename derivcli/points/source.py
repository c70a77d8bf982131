"""The one point source of a command line, opened (or its shard)."""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from derivcli.errors import RunError, UsageError
from derivcli.points.at import AtSource
from derivcli.points.base import PointSource
from derivcli.points.csvfile import MAX_LINE_BYTES, CsvSource
from derivcli.points.grid import GridSource
from derivcli.points.npz import NpzSource
from derivcli.points.shard import ShardSource
from derivcli.specs import AtPoint, GridAxis


def open_source(
    input_names: Sequence[str],
    at: Sequence[AtPoint] = (),
    grid: Sequence[GridAxis] = (),
    csv_path: str | None = None,
    npz_path: str | None = None,
    columns: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
    batch_size: int | None = None,
    delimiter: str = ",",
    tensors: Sequence[tuple[str, tuple[int, ...]]] = (),
    hdf5_path: str | None = None,
) -> PointSource:
    """Opens the one point source given on the command line, or its `shard` K/N.

    `tensors`: the model's inputs as (name, shape), for an NPZ of arrays in the inputs' own shapes.

    Raises:
        UsageError: no source, or more than one.
        RunError: the file cannot be read.
    """
    if shard is not None:
        refuse_unshardable("--csv", csv_path)
        refuse_unshardable("--npz", npz_path)
        refuse_unshardable("--hdf5", hdf5_path)
    if delimiter != "," and csv_path is None:
        raise UsageError("--delimiter applies to --csv only")
    source = _open_one(input_names, at, grid, csv_path, npz_path, columns, delimiter, tensors, hdf5_path)
    if shard is None:
        return source
    if isinstance(source, CsvSource):
        from derivcli.points.csv_scan import CsvRowIndex

        try:
            source.row_index = CsvRowIndex.scan(str(csv_path), MAX_LINE_BYTES, delimiter)
        except ValueError as error:
            raise source._too_long(error.args[0]) from None
        source.total = source.row_index.total if source.row_index else count_csv_rows(str(csv_path), delimiter)
    assert batch_size is not None
    return ShardSource(source, shard, batch_size)


def refuse_unshardable(option: str, path: str | None) -> None:
    """`--shard` reads its file twice (once to count, once for its rows): a pipe or a terminal cannot be."""
    if path is None:
        return
    if path == "-":
        raise UsageError(f"--shard needs a file, not standard input: every shard counts all rows ({option} -)")
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return  # the source's own error names the missing file
    if not regular:
        raise UsageError(f"--shard needs a regular file: {option} {path} is a pipe or device, which can be read "
                         "only once; save the points to a file first")


def count_csv_rows(path: str, delimiter: str = ",") -> int:
    """The data rows of a CSV file (blank lines not counted), read with the csv module (quoted files)."""
    with open(path, encoding="utf-8-sig", newline="", errors="surrogateescape") as handle:
        rows = sum(1 for row in csv.reader(handle, delimiter=delimiter) if row and any(cell.strip() for cell in row))
    return max(0, rows - 1)


def _open_one(
    input_names: Sequence[str],
    at: Sequence[AtPoint],
    grid: Sequence[GridAxis],
    csv_path: str | None,
    npz_path: str | None,
    columns: Sequence[str] | None,
    delimiter: str = ",",
    tensors: Sequence[tuple[str, tuple[int, ...]]] = (),
    hdf5_path: str | None = None,
) -> PointSource:
    given = [
        name for name, present in
        (("--at", bool(at)), ("--grid", bool(grid)), ("--csv", csv_path is not None),
         ("--npz", npz_path is not None), ("--hdf5", hdf5_path is not None))
        if present
    ]
    check_one_source(given)
    if columns and csv_path is None:
        raise UsageError("--columns applies to --csv only")
    if at:
        return AtSource(at, input_names)
    if grid:
        return GridSource(grid, input_names)
    if csv_path is not None:
        return CsvSource(csv_path, input_names, columns, delimiter)
    if hdf5_path is not None:
        from derivcli.points.hdf5 import Hdf5Source

        return Hdf5Source(hdf5_path, input_names, tensors)
    assert npz_path is not None
    if not Path(npz_path).exists():
        raise RunError(f"cannot read NPZ {npz_path}: no such file")
    return NpzSource(npz_path, input_names, tensors)


def check_one_source(given: Sequence[str]) -> None:
    """Raises UsageError unless exactly one point source was given."""
    if not given:
        raise UsageError("no points: give one of --at, --grid, --csv, --npz or --hdf5")
    if len(given) > 1:
        raise UsageError(
            f"{' and '.join(given)} given together: give exactly one point source"
        )
