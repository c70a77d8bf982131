"""Streaming, atomic writers for table, csv, tsv, json, jsonl, npz and hdf5.

A writer receives the rows batch by batch. Text formats stream to standard
output or to a temporary file beside the target; binary formats spool each
column to a raw file so that memory does not grow with the number of rows.
Nothing appears under the target's name until `close()` renames the finished
file into place; `abort()` removes every trace.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import functools
import itertools
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from derivcli.errors import RunError, UsageError, printable, styled
from derivcli.naming import ShapedArray
from derivcli.shards import ShardRecord, file_sha256, record_path

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "npz", "hdf5")
EXTENSIONS = {
    ".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
    ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5",
}
BINARY_FORMATS = ("npz", "hdf5")
# Metadata arrays of a shard's npz/hdf5 file, removed by `derivcli merge`.
SHARD_KEY = "shard"
GRID_SHAPE_KEY = "grid_shape"
SHARD_RECORD_KEY = "shard_record"  # `shards.ShardRecord` as JSON


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
    shard_record: ShardRecord | None = None  # written beside text shards, inside NPZ/HDF5 ones
    total_rows: int | None = None  # the rows to come, when known in advance
    shaped: list[ShapedArray] = dataclasses.field(default_factory=list)  # NPZ/HDF5 arrays in the model's shapes
    # Pass-through arrays (NPZ, HDF5 points): (name, dtype, shape of a row), their elements the columns in order.
    passthrough_shapes: list[tuple[str, np.dtype, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    # Float columns of whole numbers (integer inputs, --target's index), by position: NPZ and HDF5 write them so.
    integer_columns: dict[int, np.dtype] = dataclasses.field(default_factory=dict)
    table_digits: int | None = None  # significant digits the table format shows (check's errors: 3); None: all
    full_digits: set[str] = dataclasses.field(default_factory=set)  # columns the table shows in full all the same

    @property
    def float_names(self) -> list[str]:
        return self.coordinate_names + self.value_names

    def array_dtype(self, array: ShapedArray) -> np.dtype:
        """The dtype NPZ and HDF5 write `array` in: an integer input's own, else the compute dtype."""
        kinds = {self.integer_columns.get(position) for position in array.columns}
        return kinds.pop() if len(kinds) == 1 and None not in kinds else self.dtype

    def float_arrays(self) -> list[ShapedArray]:
        """What NPZ and HDF5 write of the float columns: the shaped arrays, and every other column alone,
        in the order of their first columns."""
        covered = {position for array in self.shaped for position in array.columns}
        alone = [ShapedArray(name, (j,), ()) for j, name in enumerate(self.float_names) if j not in covered]
        return sorted([*self.shaped, *alone], key=lambda array: min(array.columns))

    @property
    def header(self) -> list[str]:
        return self.coordinate_names + self.passthrough_names + self.value_names


def as_text(column: list[str] | np.ndarray) -> list[str]:
    """A pass-through column as text cells: CSV's as they are; an array's numbers as their shortest spelling
    (booleans true and false), its text as it is."""
    if not isinstance(column, np.ndarray):
        return column
    if column.dtype.kind in "US":
        return [cell.decode("utf-8", "replace") if isinstance(cell, bytes) else str(cell) for cell in column.tolist()]
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(pa.array(column), pa.string()).to_pylist()


def format_floats(block: np.ndarray) -> list[list[str]]:
    """Each column of `block` as the shortest strings that read back to the same values in its dtype.

    Arrow's formatter (double-conversion) spells them as JavaScript does: 3, 0.1, 1e-7, -0, nan, inf.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    return [pc.cast(pa.array(block[:, j]), pa.string()).to_pylist() for j in range(block.shape[1])]


# Magnitudes where orjson (Ryu) and Arrow (double-conversion) may choose differently between
# positional and exponent notation for the same shortest digits: always at 1e10 and above,
# and in float64 also between 1e-6 and 1e-5. Outside them both write the same text.
_RYU_AGREES_BELOW = 1e10
_RYU_DIFFERS_BETWEEN = {np.dtype(np.float64): (1e-6, 1e-5)}


def ryu_rows(block: np.ndarray, delimiter: str) -> bytes | None:
    """The rows of a float32 or float64 `block` as delimited text, formatted by orjson in bulk.

    The text is byte for byte what Arrow's formatter writes (the tests compare them), about
    twice as fast. Returns None where the spellings could differ (NaN, Inf, the magnitudes
    above, other dtypes), so that the caller formats the batch with Arrow.
    """
    band = _RYU_DIFFERS_BETWEEN.get(block.dtype)
    if block.dtype not in (np.float32, np.float64) or not len(block) or not _ryu_spells_as_arrow(block.dtype):
        return None
    magnitudes = np.abs(block)
    if not (magnitudes < _RYU_AGREES_BELOW).all():  # also False for NaN
        return None
    if band is not None and ((magnitudes >= band[0]) & (magnitudes < band[1])).any():
        return None
    return _ryu_text(block, delimiter)


def _ryu_text(block: np.ndarray, delimiter: str) -> bytes:
    """orjson's "[[a,b],[c,d]]" of `block` turned into "a,b\\nc,d\\n", in numpy.

    Drops every "[", the "," after each "]", and each ".0" before a "," or "]" (orjson
    spells 3 as 3.0, Arrow as 3), then turns each "]" into a line break.
    """
    import orjson

    text = np.frombuffer(orjson.dumps(block, option=orjson.OPT_SERIALIZE_NUMPY), np.uint8)[1:-1]
    opening, closing, point, zero, comma = np.frombuffer(b"[].0,", np.uint8)
    closes = text == closing
    dropped = text == opening
    dropped[1:] |= closes[:-1]
    after = text[2:]
    point_zero = (text[:-2] == point) & (text[1:-1] == zero) & ((after == comma) | (after == closing))
    dropped[:-2] |= point_zero
    dropped[1:-1] |= point_zero
    rows = text[~dropped]
    rows[rows == closing] = ord("\n")
    if delimiter != ",":
        rows[rows == comma] = ord(delimiter)
    return rows.tobytes()


@functools.cache
def _ryu_spells_as_arrow(dtype: np.dtype) -> bool:
    """Whether this orjson writes a probe of awkward values as Arrow does (checked once per dtype).

    A guard against a future orjson that changes its spelling: the fast path then turns
    itself off rather than change derivcli's output.
    """
    probe = [0.0, -0.0, 3.0, 0.1, 1 / 3, 0.5, 100.0, 1e-5, 1.5e-5, 9.5e-7, 1e-7, 1.25e-30, 5e-324,
             1.2e-38, 1e-45, 123456789.0, 9999999999.0, 2.0**-20]
    values = np.array(probe + [-v for v in probe], dtype=dtype)
    values = values[np.abs(values) < _RYU_AGREES_BELOW][:, None]
    arrow = "".join(cell + "\n" for cell in format_floats(values)[0])
    return _ryu_text(values, ",").decode() == arrow


def refuse_overwriting_inputs(output: str | None, inputs: Sequence[tuple[str, str | None]]) -> None:
    """Refuses an `-o` that is one of the run's input files, or lies inside an input folder (a SavedModel).

    Args:
        output: the `-o` path, or None/`-` for standard output.
        inputs: (option, path) for every file or folder the run reads.

    Raises:
        UsageError: the output would replace or write into an input.
    """
    if output in (None, "-"):
        return
    target = Path(output)
    inside = target.resolve().parent
    for option, path in inputs:
        if path in (None, "-") or not Path(path).exists():
            continue
        source = Path(path)
        same_file = target.exists() and os.path.samefile(target, source)
        within = source.is_dir() and (inside == source.resolve() or source.resolve() in inside.parents)
        if same_file or within:
            where = "is" if same_file else "is inside"
            raise UsageError(f"-o {output}: {where} the {option} {path}, which this run reads; "
                             "write the output to another file")


class AtomicFile:
    """A temporary file beside `path`, renamed onto it by `commit()`.

    It is created at once, so that an unwritable path fails before any work. A
    target that exists and is not a regular file (a device such as /dev/null, a
    FIFO, a link to /proc/self/fd/1) is never replaced: the complete output is
    copied into it at the end. A link
    to a regular file is followed: the file it points to is replaced, the link
    kept. A replaced file keeps its permission bits.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise RunError(f"-o {path}: is a directory; name a file")
        # A device or FIFO cannot be renamed onto: the output is made in the system's temporary
        # folder and copied into it at the end (zip and HDF5 files need to seek as they are written).
        self.direct = self.path.exists() and not self.path.is_file()
        self.path = self.path.resolve() if self.path.is_symlink() and not self.direct else self.path
        try:
            handle, temporary = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".part", dir=None if self.direct else self.path.parent or "."
            )
        except FileNotFoundError:
            if self.path.parent.is_dir():  # a folder that takes no new files, such as /proc
                raise RunError(f"-o {path}: cannot create a file in {str(self.path.parent)!r}") from None
            raise RunError(f"-o {path}: folder {str(self.path.parent)!r} does not exist") from None
        except OSError as error:
            raise RunError(f"-o {path}: cannot write there ({error.strerror})") from None
        os.close(handle)
        self.temporary = Path(temporary)

    def commit(self) -> None:
        if self.direct:
            try:
                with open(self.temporary, "rb") as source, open(self.path, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
            except OSError as error:
                raise RunError(f"-o {self.path}: cannot write: {error.strerror or error}") from None
            finally:
                self.temporary.unlink(missing_ok=True)
            return
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)  # an existing file keeps its permissions
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(self.temporary, mode)
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

    @contextlib.contextmanager
    def naming_write_errors(self) -> Iterator[None]:
        """Turns a failed write (a full disk, a file-size limit) into a RunError that names the output.

        A closed pipe (BrokenPipeError) passes through: it ends the run quietly.
        """
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as error:
            code = errno.errorcode.get(error.errno or 0, "")
            target = f"-o {self.file.path}" if self.file is not None else "standard output"
            raise RunError(f"{target}: cannot write: {error.strerror or error}{f' ({code})' if code else ''}") from None

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
            if sys.stdout is None:
                raise RunError("standard output is closed; write the output to a file with -o FILE")
            self.stream = sys.stdout
        self.started = False
        self.row_count = 0

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
        record = self.layout.shard_record
        if self.file is None or record is None:
            super().close()
            return
        # The record that lets merge check this shard: written after the shard, so that a
        # record never vouches for a file that is not there.
        sealed = dataclasses.replace(record, rows=self.row_count, sha256=file_sha256(self.file.temporary))
        super().close()
        beside = AtomicFile(str(record_path(self.file.path)))
        try:
            beside.temporary.write_text(sealed.to_json() + "\n", encoding="utf-8")
            beside.commit()
        except BaseException:
            beside.discard()
            raise

    def abort(self) -> None:
        if self.file is not None:
            self.stream.close()
        super().abort()

    def float_block(self, coordinates: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The coordinates and values of a batch side by side, in the layout's dtype."""
        dtype = self.layout.dtype
        return np.concatenate([coordinates.astype(dtype, copy=False), values.astype(dtype, copy=False)], axis=1)

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        self._start_once()
        self.row_count += len(coordinates)
        self.write_formatted(coordinates, [as_text(column) for column in passthrough], values)

    def write_formatted(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        """Formats and writes one batch."""
        columns = format_floats(self.float_block(coordinates, values))
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

    def write_formatted(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        """Formats the batch in bulk: by orjson where it can, else by Arrow's C++ CSV writer,
        else (a text cell that needs quotes) by the csv module."""
        import pyarrow as pa
        import pyarrow.csv as arrow_csv

        dtype = self.layout.dtype
        if not passthrough:
            rows = ryu_rows(self.float_block(coordinates, values), self.delimiter)
            if rows is not None:
                self.write_bytes(rows)
                return
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
            super().write_formatted(coordinates, passthrough, values)
            return
        self.write_bytes(text.getvalue())

    def write_bytes(self, text: bytes | memoryview) -> None:
        """Writes UTF-8 text past the text layer, sparing a decode and an encode."""
        self.stream.flush()
        binary = getattr(self.stream, "buffer", None)
        if binary is None:  # a stream with no bytes underneath (io.StringIO)
            self.stream.write(bytes(text).decode("utf-8"))
        else:
            binary.write(text)
            binary.flush()

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
        numeric = [dtype.kind in "biuf" for _, dtype, shape in self.layout.passthrough_shapes
                   for _ in range(math.prod(shape))]  # an array's numbers and booleans are JSON's
        float_positions |= {len(self.layout.coordinate_names) + j for j, number in enumerate(numeric) if number}
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
    """An aligned table for a person, streamed: each batch's rows are printed as soon as they are computed.

    Each number column keeps one notation and one width from the first batch on
    (`ColumnFormat`), so every line of a long stream has the same length. A table
    wider than the terminal is printed as one block of name/value pairs per point,
    laid across the terminal's width, and a note on standard error says so: no
    column is pushed thousands of lines down. A run of a single point is a
    vertical name/value list.
    """

    GAP = "  "

    def start(self) -> None:
        self.widths: list[int] = []
        self.formats: list[ColumnFormat | None] = []
        self.vertical = self.layout.total_rows == 1
        self.blocks = False
        self.points = 0

    def write_formatted(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        block = self.float_block(coordinates, values)
        if self.vertical:  # one point: every digit, as the machine formats write it
            columns = format_floats(block)
        else:
            if not self.formats:
                names = self.layout.float_names
                self.formats = [ColumnFormat.of(block[:4096, j], self.layout.dtype,
                                                None if names[j] in self.layout.full_digits else self.layout.table_digits)
                                for j in range(block.shape[1])]
            columns = [form.cells(block[:, j]) for j, form in enumerate(self.formats)]  # type: ignore[union-attr]
        d = len(self.layout.coordinate_names)
        self.write_columns(columns[:d] + passthrough + columns[d:])

    def _plan(self, columns: list[list[str]]) -> None:
        header = [printable(name) for name in self.layout.header]
        key = len(self.layout.coordinate_names)
        passthrough = range(key, key + len(self.layout.passthrough_names))
        self.numeric = [j not in passthrough for j in range(len(header))]
        float_positions = [j for j in range(len(header)) if self.numeric[j]]
        reserved = {j: form.width for j, form in zip(float_positions, self.formats) if form is not None}
        self.widths = [max([len(name), reserved.get(j, 0), *(len(cell) for cell in column[:4096])])
                       for j, (name, column) in enumerate(zip(header, columns))]
        self.header = header
        width = self._terminal_width()
        needed = 1 + sum(self.widths) + len(self.GAP) * (len(self.widths) - 1)
        if needed > width:
            self.blocks = True
            self.pair_width = max(map(len, header)) + len(self.GAP) + max(self.widths)
            self.per_line = max(1, (width - 1 + len(self.GAP)) // (self.pair_width + len(self.GAP)))
            sys.stderr.write(f"derivcli: note: the table's {len(header):,} columns need {needed:,} characters and the "
                             f"terminal has {width:,}: each point is a block of name/value pairs (--format csv keeps "
                             "one row per point)\n")
            sys.stderr.flush()
            return
        self.stream.write(self._line(header, bold=True))

    def _terminal_width(self) -> int:
        """The terminal's width; else COLUMNS; else 80 on a terminal that reports 0 (`script`, some CI runners);
        else no limit (a file or a pipe takes any width)."""
        return terminal_columns(self.stream) or (1 << 30)

    def _line(self, cells: Sequence[str], bold: bool = False) -> str:
        parts = [(cell.rjust(width) if numeric else cell.ljust(width))
                 for cell, width, numeric in zip(cells, self.widths, self.numeric)]
        text = " " + self.GAP.join(parts).rstrip() + "\n"
        return styled(text[:-1], "bold", self.stream) + "\n" if bold else text

    def _block(self, cells: Sequence[str]) -> str:
        """One point as name/value pairs across the terminal: its coordinates (and pass-through cells), then values."""
        self.points += 1
        key = len(self.layout.coordinate_names) + len(self.layout.passthrough_names)
        names_width = self.pair_width - len(self.GAP) - max(self.widths)
        lines = [styled(f" point {self.points:,}", "bold", self.stream) + "\n"]
        for part in (range(key), range(key, len(cells))):
            pairs = [f"{self.header[j].ljust(names_width)}{self.GAP}"
                     f"{cells[j].rjust(max(self.widths)) if self.numeric[j] else cells[j].ljust(max(self.widths))}"
                     for j in part]
            for start in range(0, len(pairs), self.per_line):
                lines.append(" " + self.GAP.join(pairs[start:start + self.per_line]).rstrip() + "\n")
        return "".join(lines)

    def write_columns(self, columns: list[list[str]]) -> None:
        if self.vertical:
            names = [printable(name) for name in self.layout.header]
            width = max(map(len, names))
            for name, column in zip(names, columns):
                for cell in column:
                    self.stream.write(f"{name.ljust(width)}  {printable(cell)}\n")
            return
        key = len(self.layout.coordinate_names)
        columns = columns[:key] + [[printable(cell) for cell in column]
                                   for column in columns[key:key + len(self.layout.passthrough_names)]] + \
            columns[key + len(self.layout.passthrough_names):]
        if not self.widths:
            self._plan(columns)
        rows = list(zip(*columns))
        if self.blocks:
            self.stream.write("".join(self._block(row) for row in rows))
        else:
            self.stream.write("".join(self._line(row) for row in rows))
        self.stream.flush()

    def finish(self) -> None:
        if not self.widths and not self.vertical:  # no rows: the header alone
            self.formats = [None] * len(self.layout.float_names)
            self._plan([[] for _ in self.layout.header])


def terminal_columns(stream: Any) -> int | None:
    """The width of the terminal behind `stream`; COLUMNS where it reports 0 or is not one; 80 for a terminal
    that reports 0 and no COLUMNS; None for a file or a pipe without COLUMNS."""
    columns = os.environ.get("COLUMNS", "")
    given = int(columns) if columns.isdigit() and int(columns) > 0 else None
    try:
        if stream.isatty():
            size = os.get_terminal_size(stream.fileno()).columns
            return size if size > 0 else given or 80
    except (AttributeError, OSError, ValueError):
        pass
    return given


# Characters a table column keeps beyond its first batch's widest number: two more digits (an integer grown
# a hundredfold), or room to round a longer number into.
EXPONENT_ROOM = 2


@dataclass
class ColumnFormat:
    """How a table writes one number column: positional or scientific notation, in a fixed width.

    Chosen from the first batch: scientific where the magnitudes reach below 1e-4 or from 1e9 up,
    positional elsewhere; the width is the first batch's widest cell, with room for a sign and two
    more characters (`EXPONENT_ROOM`). A later
    number that does not fit is rounded to the digits that fit, in the column's notation: the table
    may round such a cell; csv, tsv, json and npz keep every digit.
    """

    scientific: bool
    width: int
    dtype: np.dtype
    digits: int | None = None  # significant digits; None: the shortest that read back to the same number

    @classmethod
    def of(cls, values: np.ndarray, dtype: np.dtype, digits: int | None = None) -> ColumnFormat:
        finite = np.abs(values[np.isfinite(values)])
        nonzero = finite[finite > 0]
        scientific = bool(nonzero.size) and (nonzero.min() < 1e-4 or nonzero.max() >= 1e9)
        form = cls(scientific, 0, np.dtype(dtype), digits)
        cells = form.cells(values, fit=False)
        sign = 0 if (values < 0).any() else 1
        form.width = max([len(cell) for cell in cells] + [3]) + sign + EXPONENT_ROOM
        return form

    def cells(self, values: np.ndarray, fit: bool = True) -> list[str]:
        values = values.astype(self.dtype, copy=False)
        if self.digits is not None:
            cells = [_rounded(v, self.digits, self.scientific) for v in values]
        elif self.scientific:
            cells = [_scientific(v) for v in values]
        else:
            cells = format_floats(values[:, None])[0]
        if fit and self.width:
            for i, cell in enumerate(cells):
                if len(cell) > self.width:
                    cells[i] = _scientific(values[i], self.width) if self.scientific else _positional(values[i], self.width)
        return cells


def _positional(value: np.floating, width: int) -> str:
    """`value` in positional notation rounded to fit `width` characters; in scientific notation where its whole
    part alone is wider."""
    text = np.format_float_positional(value, unique=True, trim="-")
    decimals = len(text.partition(".")[2])
    while len(text) > width and decimals > 0:
        decimals -= 1
        text = np.format_float_positional(value, precision=decimals, unique=False, trim="-")
    return text if len(text) <= width else _scientific(value, width)


def _rounded(value: np.floating, digits: int, scientific: bool) -> str:
    """`value` to `digits` significant digits, in scientific or positional notation."""
    if not np.isfinite(value):
        return _scientific(value)
    if scientific:  # NumPy trims 1.00e-06 to "1.e-06": the point goes too
        text = np.format_float_scientific(value, precision=digits - 1, unique=False, trim="-", exp_digits=2)
        return text.replace(".e", "e")
    return np.format_float_positional(value, precision=digits, unique=False, fractional=False, trim="-").rstrip(".")


def _scientific(value: np.floating, width: int | None = None) -> str:
    """`value` in scientific notation: its shortest digits, or as many as fit in `width` characters."""
    if not np.isfinite(value):
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if width is None:
        return np.format_float_scientific(value, unique=True, trim="-", exp_digits=2)
    text = np.format_float_scientific(value, unique=True, trim="-", exp_digits=2)
    precision = len(text.split("e")[0].lstrip("-").replace(".", "")) - 1
    while len(text) > width and precision > 0:
        precision -= 1
        text = np.format_float_scientific(value, precision=precision, unique=False, trim="-", exp_digits=2)
    return text


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
        self.arrays = layout.float_arrays()
        self.spools = [
            open(Path(self.spool_dir.name) / f"{j}.raw", "wb")  # noqa: SIM115
            for j in range(len(self.arrays))
        ]
        self.passthrough: list[list[Any]] = [[] for _ in layout.passthrough_names]  # each column's pieces
        self.rows = 0

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        block = np.concatenate(
            [coordinates.astype(self.layout.dtype), values.astype(self.layout.dtype)], axis=1
        )
        for array, spool in zip(self.arrays, self.spools):  # each row's elements together: (rows, *shape)
            data = block[:, array.columns].astype(self.layout.array_dtype(array), copy=False)
            spool.write(np.ascontiguousarray(data).tobytes())
        for kept, new in zip(self.passthrough, passthrough):
            kept.append(new)
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
        for j, shaped in enumerate(self.arrays):
            path = Path(self.spool_dir.name) / f"{j}.raw"
            shape = (*self.shape, *shaped.shape)
            dtype = self.layout.array_dtype(shaped)
            if self.rows == 0:
                array = np.empty(shape, dtype=dtype)
            else:
                array = np.memmap(path, dtype=dtype, mode="r", shape=shape)
            arrays.append((shaped.name, array))
        arrays += self.passthrough_arrays()
        if self.layout.grid_axes:
            arrays.append(("grid_axes", np.array(self.layout.grid_axes, dtype=str)))
        if self.layout.shard is not None:
            arrays.append((SHARD_KEY, np.array(self.layout.shard, dtype=np.int64)))
            if self.layout.shard_record is not None:
                sealed = dataclasses.replace(self.layout.shard_record, rows=self.rows)
                arrays.append((SHARD_RECORD_KEY, np.array([sealed.to_json()], dtype=str)))
            if self.layout.grid_shape:
                arrays.append((GRID_SHAPE_KEY, np.array(self.layout.grid_shape, dtype=np.int64)))
        return arrays

    def passthrough_arrays(self) -> list[tuple[str, np.ndarray]]:
        """The pass-through columns as arrays: CSV's as text, NPZ's and HDF5's in their dtype and shape."""
        if not self.layout.passthrough_shapes:
            return [(name, np.array(list(itertools.chain.from_iterable(pieces)), dtype=str))
                    for name, pieces in zip(self.layout.passthrough_names, self.passthrough)]
        arrays, first = [], 0
        for name, dtype, shape in self.layout.passthrough_shapes:
            columns = [np.concatenate(pieces) if pieces else np.empty(0, dtype)
                       for pieces in self.passthrough[first:first + math.prod(shape)]]
            arrays.append((name, np.stack(columns, axis=1).reshape(-1, *shape)))
            first += math.prod(shape)
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


class PassingWriter(Writer):
    """A writer that passes a run's batches on to another (`main`): its file, its write errors and its nulls."""

    def __init__(self, main: Writer) -> None:
        self.main = main
        self.layout, self.file = main.layout, main.file

    @property
    def nonfinite_written_as_null(self) -> int:  # type: ignore[override]
        return self.main.nonfinite_written_as_null

    def naming_write_errors(self) -> Any:
        return self.main.naming_write_errors()

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        self.main.write(coordinates, passthrough, values)

    def close(self) -> None:
        self.main.close()

    def abort(self) -> None:
        self.main.abort()


class InputsLeftOut(PassingWriter):
    """A text writer given only some of the coordinates (`--no-inputs`, a tensor input's elements by default)."""

    def __init__(self, main: Writer, kept: Sequence[int]) -> None:
        super().__init__(main)
        self.kept = np.asarray(kept, dtype=np.int64)

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        self.main.write(coordinates[:, self.kept], passthrough, values)


def open_text_writer(format_name: str, layout: Layout, output: str | None, kept: Sequence[int] | None) -> Writer:
    """`open_writer`, writing only the coordinates at positions `kept` (None: all)."""
    if kept is None or len(kept) == len(layout.coordinate_names):
        return open_writer(format_name, layout, output)
    narrowed = dataclasses.replace(layout, coordinate_names=[layout.coordinate_names[j] for j in kept])
    return InputsLeftOut(open_writer(format_name, narrowed, output), kept)


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

