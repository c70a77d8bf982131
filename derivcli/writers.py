"""Streaming, atomic writers for table, csv, tsv, json, jsonl, npz and hdf5.

A writer receives the rows batch by batch. Text formats stream to standard
output or to a temporary file beside the target; binary formats spool each
column to a raw file so that memory does not grow with the number of rows.
Nothing appears under the target's name until `close()` renames the finished
file into place; `abort()` removes every trace.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from derivcli.errors import RunError, UsageError

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "npz", "hdf5")
EXTENSIONS = {
    ".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
    ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5",
}
BINARY_FORMATS = ("npz", "hdf5")
# Metadata arrays of a shard's npz/hdf5 file, removed by `derivcli merge`.
SHARD_KEY = "shard"
GRID_SHAPE_KEY = "grid_shape"


def choose_format(format_name: str | None, output: str | None, stdout_is_tty: bool) -> str:
    """Decides the output format in one place (httpie's `_process_pretty_options`).

    `--format` wins; else the `-o` file's extension; else `table` on a terminal
    and `csv` in a pipe.

    Raises:
        UsageError: an unknown format or extension, or a binary format for
            standard output.
    """
    if format_name is not None:
        chosen = format_name.lower()
        if chosen not in FORMATS:
            raise UsageError(f"--format {format_name!r}: choose one of {', '.join(FORMATS)}")
    elif output is not None and output != "-":
        suffix = Path(output).suffix.lower()
        if suffix not in EXTENSIONS:
            raise UsageError(
                f"-o {output!r}: cannot tell the format from {suffix or 'no extension'!r}; "
                f"use one of {' '.join(EXTENSIONS)} or pass --format"
            )
        chosen = EXTENSIONS[suffix]
    else:
        chosen = "table" if stdout_is_tty else "csv"
    if chosen in BINARY_FORMATS and (output is None or output == "-"):
        raise UsageError(f"--format {chosen} writes a file: add -o FILE.{'h5' if chosen == 'hdf5' else chosen}")
    return chosen


@dataclass
class Layout:
    """What the table holds: coordinates, pass-through columns, values."""

    coordinate_names: list[str]
    passthrough_names: list[str]
    value_names: list[str]
    dtype: np.dtype
    grid_shape: tuple[int, ...] | None = None
    grid_axes: list[str] | None = None
    shard: tuple[int, int] | None = None

    @property
    def float_names(self) -> list[str]:
        return self.coordinate_names + self.value_names

    @property
    def header(self) -> list[str]:
        return self.coordinate_names + self.passthrough_names + self.value_names


def format_floats(block: np.ndarray) -> list[list[str]]:
    """Each column of `block` as the shortest strings that read back to the same values in its dtype.

    Arrow's formatter (double-conversion) spells them as JavaScript does: 3, 0.1, 1e-7, -0, nan, inf.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    return [pc.cast(pa.array(block[:, j]), pa.string()).to_pylist() for j in range(block.shape[1])]


class AtomicFile:
    """A temporary file beside `path`, renamed onto it by `commit()`.

    It is created at once, so that an unwritable path fails before any work.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise RunError(f"-o {path}: is a directory; name a file")
        try:
            handle, temporary = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent or "."
            )
        except FileNotFoundError:
            raise RunError(f"-o {path}: folder {str(self.path.parent)!r} does not exist") from None
        except OSError as error:
            raise RunError(f"-o {path}: cannot write there ({error.strerror})") from None
        os.close(handle)
        self.temporary = Path(temporary)

    def commit(self) -> None:
        os.chmod(self.temporary, 0o666 & ~_umask())
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        self.temporary.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Writer:
    """Base class: `write()` each batch, then `close()` or `abort()`."""

    def __init__(self, layout: Layout, output: str | None) -> None:
        self.layout = layout
        self.file = AtomicFile(output) if output not in (None, "-") else None
        self.nonfinite_written_as_null = 0

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.file is not None:
            self.file.commit()

    def abort(self) -> None:
        if self.file is not None:
            self.file.discard()


class TextWriter(Writer):
    """A writer of text to standard output or to the atomic file."""

    def __init__(self, layout: Layout, output: str | None) -> None:
        super().__init__(layout, output)
        if self.file is not None:
            self.stream: IO[str] = open(self.file.temporary, "w", encoding="utf-8", newline="")  # noqa: SIM115
        else:
            self.stream = sys.stdout
        self.started = False

    def _start_once(self) -> None:
        # Deferred to the first batch, so that an error in reading the first
        # points leaves standard output empty rather than with a lone header.
        if not self.started:
            self.started = True
            self.start()

    def start(self) -> None:
        """Writes what comes before the first row."""

    def finish(self) -> None:
        """Writes what comes after the last row."""

    def close(self) -> None:
        self._start_once()
        self.finish()
        self.stream.flush()
        if self.file is not None:
            self.stream.close()
        super().close()

    def abort(self) -> None:
        if self.file is not None:
            self.stream.close()
        super().abort()

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        self._start_once()
        dtype = self.layout.dtype
        columns = format_floats(np.concatenate([coordinates.astype(dtype), values.astype(dtype)], axis=1))
        d = len(self.layout.coordinate_names)
        self.write_columns(columns[:d] + passthrough + columns[d:])

    def write_columns(self, columns: list[list[str]]) -> None:
        """Writes a batch given as columns of strings, in header order."""
        raise NotImplementedError


class DelimitedWriter(TextWriter):
    """CSV (or TSV with `delimiter='\\t'`): a header row, then one row per point."""

    def __init__(self, layout: Layout, output: str | None, delimiter: str = ",") -> None:
        self.delimiter = delimiter
        super().__init__(layout, output)

    def start(self) -> None:
        self.csv = csv.writer(self.stream, delimiter=self.delimiter, lineterminator="\n")
        self.csv.writerow(self.layout.header)

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        """Formats and joins the batch in Arrow's C++ CSV writer, unless a text cell needs quotes."""
        import pyarrow as pa
        import pyarrow.csv as arrow_csv

        self._start_once()
        dtype = self.layout.dtype
        floats = [coordinates[:, j].astype(dtype) for j in range(coordinates.shape[1])]
        floats += [values[:, j].astype(dtype) for j in range(values.shape[1])]
        d = coordinates.shape[1]
        arrays = [pa.array(c) for c in floats[:d]] + [pa.array(c, pa.string()) for c in passthrough]
        arrays += [pa.array(c) for c in floats[d:]]
        batch = pa.RecordBatch.from_arrays(arrays, names=[f"c{i}" for i in range(len(arrays))])
        text = pa.BufferOutputStream()
        options = arrow_csv.WriteOptions(include_header=False, delimiter=self.delimiter, quoting_style="none")
        try:
            arrow_csv.write_csv(batch, text, write_options=options)
        except pa.ArrowInvalid:  # a pass-through cell holds the delimiter, a quote or a line break
            super().write(coordinates, passthrough, values)
            return
        self.stream.write(text.getvalue().to_pybytes().decode("utf-8"))
        self.stream.flush()

    def write_columns(self, columns: list[list[str]]) -> None:
        self.csv.writerows(zip(*columns))
        self.stream.flush()


class JsonWriter(TextWriter):
    """JSON: one array of row objects, or with `lines=True` one object per line.

    NaN and Inf have no JSON spelling; they are written as null and counted.
    """

    def __init__(self, layout: Layout, output: str | None, lines: bool = False) -> None:
        self.lines = lines
        self.rows_written = 0
        super().__init__(layout, output)

    def start(self) -> None:
        self.keys = [json.dumps(name) + ": " for name in self.layout.header]
        float_positions = set(range(len(self.layout.coordinate_names)))
        first_value = len(self.layout.coordinate_names) + len(self.layout.passthrough_names)
        float_positions |= set(range(first_value, len(self.layout.header)))
        self.float_positions = float_positions
        if not self.lines:
            self.stream.write("[")

    def write_columns(self, columns: list[list[str]]) -> None:
        for j, column in enumerate(columns):
            if j in self.float_positions:
                if "nan" not in column and "inf" not in column and "-inf" not in column:
                    continue  # the common case: a C-level scan, no per-cell Python loop
                for i, cell in enumerate(column):
                    if cell in ("nan", "inf", "-inf"):
                        column[i] = "null"
                        self.nonfinite_written_as_null += 1
            else:
                columns[j] = [json.dumps(cell) for cell in column]
        rows = ["{" + ", ".join(k + v for k, v in zip(self.keys, row)) + "}" for row in zip(*columns)]
        if self.lines:
            self.stream.write("".join(row + "\n" for row in rows))
        else:
            separator = ",\n" if self.rows_written else "\n"
            self.stream.write(separator + ",\n".join(rows))
        self.rows_written += len(rows)
        self.stream.flush()

    def finish(self) -> None:
        if not self.lines:
            self.stream.write("\n]\n" if self.rows_written else "]\n")


class TableWriter(TextWriter):
    """A Rich table for a terminal, printed when the last row is in."""

    def start(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def write_columns(self, columns: list[list[str]]) -> None:
        self.rows.extend(zip(*columns))

    def finish(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for name in self.layout.header:
            numeric = name not in self.layout.passthrough_names
            table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
        for row in self.rows:
            table.add_row(*row)
        # On a terminal the table fits its width; elsewhere (a file, a pipe) nothing is cropped.
        width = None if self.stream.isatty() else 100_000
        Console(file=self.stream, soft_wrap=True, width=width).print(table)


class ColumnSpoolWriter(Writer):
    """Spools every float column to a raw file, then builds npz or hdf5 from them.

    Memory stays flat whatever the number of rows (pass-through text columns,
    CSV only, are the exception: they are held in memory).
    """

    def __init__(self, layout: Layout, output: str | None) -> None:
        super().__init__(layout, output)
        assert self.file is not None
        self.spool_dir = tempfile.TemporaryDirectory(
            prefix=f".{self.file.path.name}.", dir=self.file.temporary.parent
        )
        self.spools = [
            open(Path(self.spool_dir.name) / f"{j}.raw", "wb")  # noqa: SIM115
            for j in range(len(layout.float_names))
        ]
        self.passthrough: list[list[str]] = [[] for _ in layout.passthrough_names]
        self.rows = 0

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        block = np.concatenate(
            [coordinates.astype(self.layout.dtype), values.astype(self.layout.dtype)], axis=1
        )
        for j, spool in enumerate(self.spools):
            spool.write(np.ascontiguousarray(block[:, j]).tobytes())
        for kept, new in zip(self.passthrough, passthrough):
            kept.extend(new)
        self.rows += len(block)

    @property
    def shape(self) -> tuple[int, ...]:
        # A shard of a grid is a flat slice; `derivcli merge` restores the grid's shape.
        if self.layout.grid_shape and self.layout.shard is None:
            return self.layout.grid_shape
        return (self.rows,)

    def columns(self) -> list[tuple[str, np.ndarray]]:
        """Every column as (name, array of the final shape), floats memory-mapped."""
        for spool in self.spools:
            spool.close()
        arrays: list[tuple[str, np.ndarray]] = []
        for j, name in enumerate(self.layout.float_names):
            path = Path(self.spool_dir.name) / f"{j}.raw"
            if self.rows == 0:
                array = np.empty(self.shape, dtype=self.layout.dtype)
            else:
                array = np.memmap(path, dtype=self.layout.dtype, mode="r", shape=self.shape)
            arrays.append((name, array))
        for name, cells in zip(self.layout.passthrough_names, self.passthrough):
            arrays.append((name, np.array(cells, dtype=str)))
        if self.layout.grid_axes:
            arrays.append(("grid_axes", np.array(self.layout.grid_axes, dtype=str)))
        if self.layout.shard is not None:
            arrays.append((SHARD_KEY, np.array(self.layout.shard, dtype=np.int64)))
            if self.layout.grid_shape:
                arrays.append((GRID_SHAPE_KEY, np.array(self.layout.grid_shape, dtype=np.int64)))
        return arrays

    def close(self) -> None:
        try:
            self.build()
        finally:
            self.spool_dir.cleanup()
        super().close()

    def abort(self) -> None:
        for spool in self.spools:
            spool.close()
        self.spool_dir.cleanup()
        super().abort()

    def build(self) -> None:
        raise NotImplementedError


class NpzWriter(ColumnSpoolWriter):
    """An `.npz` archive, one array per column, as `numpy.savez` writes it."""

    def build(self) -> None:
        assert self.file is not None
        write_npz(self.file.temporary, self.columns())


class Hdf5Writer(ColumnSpoolWriter):
    """An HDF5 file, one dataset per column (`dy/dx` reads back by that key)."""

    def build(self) -> None:
        assert self.file is not None
        write_hdf5(self.file.temporary, self.columns())


def write_npz(path: Path, arrays: list[tuple[str, np.ndarray]]) -> None:
    """Writes named arrays as `numpy.savez` does, copying memory-mapped ones in chunks."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays:
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                header = {
                    "descr": np.lib.format.dtype_to_descr(array.dtype),
                    "fortran_order": False,
                    "shape": array.shape,
                }
                np.lib.format.write_array_header_2_0(member, header)
                if isinstance(array, np.memmap):
                    with open(array.filename, "rb") as raw:  # type: ignore[arg-type]
                        shutil.copyfileobj(raw, member, 1 << 22)
                else:
                    member.write(np.ascontiguousarray(array).tobytes())


def write_hdf5(path: Path, arrays: list[tuple[str, np.ndarray]]) -> None:
    """Writes named arrays as HDF5 datasets, in slabs along the first axis."""
    import h5py

    with h5py.File(path, "w") as handle:
        for name, array in arrays:
            if array.dtype.kind == "U":
                handle.create_dataset(name, data=array.astype(object), dtype=h5py.string_dtype())
                continue
            dataset = handle.create_dataset(name, shape=array.shape, dtype=array.dtype)
            slab = max(1, (1 << 22) // max(1, math.prod(array.shape[1:])))
            for start in range(0, len(array), slab):
                dataset[start : start + slab] = array[start : start + slab]


def open_writer(format_name: str, layout: Layout, output: str | None) -> Writer:
    """Opens the writer for `format_name` (already chosen by `choose_format`)."""
    if format_name == "csv":
        return DelimitedWriter(layout, output)
    if format_name == "tsv":
        return DelimitedWriter(layout, output, delimiter="\t")
    if format_name == "json":
        return JsonWriter(layout, output)
    if format_name == "jsonl":
        return JsonWriter(layout, output, lines=True)
    if format_name == "table":
        return TableWriter(layout, output)
    if format_name == "npz":
        return NpzWriter(layout, output)
    if format_name == "hdf5":
        return Hdf5Writer(layout, output)
    raise UsageError(f"--format {format_name!r}: choose one of {', '.join(FORMATS)}")


def read_columns(path: str) -> dict[str, np.ndarray]:
    """Reads an npz or hdf5 file written by derivcli back into arrays (for tests and merge)."""
    if Path(path).suffix.lower() == ".npz":
        with np.load(path) as archive:
            return {name: archive[name] for name in archive.files}
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        def visit(name: str, item: object) -> None:
            if isinstance(item, h5py.Dataset):
                data = item[()]
                if item.dtype.kind == "O":
                    data = np.array([cell.decode() for cell in np.ravel(data)], dtype=str)
                arrays[name] = data
        handle.visititems(visit)
    return arrays

