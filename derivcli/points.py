"""Point sources (`--at`, `--grid`, `--csv`, `--npz`) as streams of batches.

A source knows the input names it must fill and yields `PointBatch`es of at
most `batch_size` rows, so that memory does not grow with the number of
points. Sources use NumPy (and Arrow for CSV); nothing here imports TensorFlow.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import math
import operator
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from derivcli.errors import RunError, UsageError
from derivcli.specs import AtPoint, GridAxis

# Above this many points a grid is refused: it would run for days, and it is
# almost always a typo (an extra zero in NUM).
MAX_GRID_POINTS = 10**10
# Bytes per read of a CSV: Arrow parses blocks of this size in one call, without the GIL.
READ_BLOCK = 1 << 20
# The longest CSV line read: a row of coordinates and ids is short, and a file without line
# breaks (`--csv /dev/zero`, a binary file) must not be held in memory whole.
MAX_LINE_BYTES = 1 << 20


@dataclass
class PointBatch:
    """A batch of points: coordinates in input order and pass-through cells."""

    coordinates: np.ndarray  # (rows, inputs), float64
    passthrough: list[list[str]] = field(default_factory=list)  # one list per column


class PointSource:
    """A stream of points for the inputs `input_names`.

    Attributes:
        passthrough_names: columns carried through unchanged (CSV only).
        grid_shape: the grid's shape for `--grid`, else None.
        grid_axes: the inputs along the grid's axes, in order.
        total: the number of points when known in advance, else None.
    """

    passthrough_names: list[str]
    grid_shape: tuple[int, ...] | None = None
    grid_axes: list[str] | None = None
    total: int | None = None
    shard: tuple[int, int] | None = None

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        raise NotImplementedError


class ShardSource(PointSource):
    """The K-th of N contiguous slices of another source (`--shard K/N`).

    Slices are whole batches: shard K holds batches [K nb / N, (K+1) nb / N)
    of the nb batches of the whole run. Every batch is then the same batch
    as in the unsharded run, so the shards' rows, concatenated in K order,
    are the unsharded rows bit for bit (float32 results can move by an ulp
    with the composition of a batch).
    """

    def __init__(self, source: PointSource, shard: tuple[int, int], batch_size: int) -> None:
        if source.total is None:
            raise UsageError("--shard needs a source whose size is known: a file, not standard input")
        self.source = source
        self.shard = shard
        self.batch_size = batch_size
        index, count = shard
        batches = -(-source.total // batch_size)
        self.first_batch = index * batches // count
        # The last shard takes whatever follows, so that no row can fall off the end.
        self.end_batch = (index + 1) * batches // count if index < count - 1 else math.inf
        end_row = source.total if index == count - 1 else min(int(self.end_batch) * batch_size, source.total)
        self.total = max(0, end_row - self.first_batch * batch_size)
        self.passthrough_names = source.passthrough_names
        self.grid_shape = source.grid_shape
        self.grid_axes = source.grid_axes

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        if batch_size != self.batch_size:
            raise ValueError("a shard is cut for one batch size")
        for number, batch in enumerate(self.source.batches(batch_size)):
            if number >= self.end_batch:
                return
            if number >= self.first_batch:
                yield batch


class AtSource(PointSource):
    """Points given one by one with `--at`."""

    def __init__(self, points: Sequence[AtPoint], input_names: Sequence[str]) -> None:
        rows = []
        for point in points:
            spelled = ",".join(
                f"{n}={v:g}" for n, v in zip(point.names, point.values)
            ) if point.names else ",".join(f"{v:g}" for v in point.values)
            if point.names is None:
                if len(point.values) != len(input_names):
                    raise UsageError(
                        f"--at {spelled!r}: {len(point.values)} value(s) for "
                        f"{len(input_names)} input(s) ({', '.join(input_names)})"
                    )
                rows.append(point.values)
            else:
                unknown = [n for n in point.names if n not in input_names]
                missing = [n for n in input_names if n not in point.names]
                if unknown or missing:
                    problem = (
                        f"{', '.join(unknown)} is not an input" if unknown
                        else f"no value for {', '.join(missing)}"
                    )
                    raise UsageError(
                        f"--at {spelled!r}: {problem} (inputs: {', '.join(input_names)})"
                    )
                by_name = dict(zip(point.names, point.values))
                rows.append(tuple(by_name[n] for n in input_names))
        self.coordinates = np.array(rows, dtype=np.float64).reshape(len(rows), len(input_names))
        self.passthrough_names = []
        self.total = len(rows)

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        for start in range(0, self.total or 0, batch_size):
            yield PointBatch(self.coordinates[start : start + batch_size])


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
                    f"(inputs: {', '.join(input_names)})"
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
        for start in range(0, self.total or 0, batch_size):
            flat = np.arange(start, min(start + batch_size, self.total or 0))
            indices = np.unravel_index(flat, self.grid_shape)
            yield PointBatch(np.stack([linspace_at(a, i) for a, i in zip(self.axes, indices)], axis=1))


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


class CsvSource(PointSource):
    """Rows of a CSV file or of standard input (`-`), read in batches.

    Inputs are matched to columns by name, or taken from `columns` in order;
    the other columns pass through unchanged.

    Plain chunks of lines (no quote characters, no bare carriage returns) are
    parsed in bulk by Arrow's C++ reader. Any chunk it refuses is parsed again
    by Python's csv module, which names the bad row and cell; from the first
    quote character on, the csv module reads the rest of the input, since a
    quoted field may span lines.
    """

    def __init__(
        self, path: str, input_names: Sequence[str], columns: Sequence[str] | None = None
    ) -> None:
        self.label = "standard input" if path == "-" else path
        if path == "-":
            self.binary: io.BufferedIOBase = _stdin_binary()
        else:
            try:
                self.binary = open(path, "rb")  # noqa: SIM115
            except OSError as error:
                raise RunError(f"cannot read CSV {path}: {error.strerror}") from None
        self.lines_read = 0  # raw lines taken from `binary` by the fast path
        self.reader: Any = None  # the csv module's reader, once the careful path has taken over
        header = self._read_header()
        if header is None:
            raise RunError(
                f"{self.label} is empty: expected a header row naming the columns "
                f"({', '.join(input_names)})"
            )
        self.header = [cell.strip() for cell in header]
        wanted = list(columns) if columns else list(input_names)
        if columns and len(columns) != len(input_names):
            raise UsageError(
                f"--columns {','.join(columns)}: {len(columns)} column(s) for "
                f"{len(input_names)} input(s) ({', '.join(input_names)})"
            )
        missing = [name for name in wanted if name not in self.header]
        if missing:
            hint = "pass --columns to pick them" if not columns else "check --columns"
            raise RunError(
                f"{self.label}: no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(self.header)}); {hint}"
            )
        self.input_positions = [self.header.index(name) for name in wanted]
        self.input_columns = wanted
        self.passthrough_positions = [
            i for i, name in enumerate(self.header) if i not in self.input_positions
        ]
        self.passthrough_names = [self.header[i] for i in self.passthrough_positions]

    def _read_header(self) -> list[str] | None:
        """The first non-blank row, read by the fast path when it is a plain line."""
        while True:
            raw = self.binary.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return None
            self.lines_read += 1
            if len(raw) > MAX_LINE_BYTES:
                raise self._too_long(self.lines_read)
            if self.lines_read == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not _plain(raw):
                self._hand_over(raw, self.lines_read - 1)
                rows, lines = self._read_rows(1)
                while rows and not "".join(rows[0]).strip():
                    rows, lines = self._read_rows(1)
                if rows and not _encodes("".join(rows[0])):
                    raise RunError(f"{self.label}, row {lines[0]}: not UTF-8 text")
                return rows[0] if rows else None
            row = next(csv.reader([self._decode(raw, self.lines_read)]), [])
            if "".join(row).strip():
                return row

    def _too_long(self, line: int) -> RunError:
        return RunError(f"{self.label}, row {line}: a line longer than {MAX_LINE_BYTES >> 20} MiB; a CSV of points "
                        "has short lines (is it a CSV file?)")

    def _decode(self, raw: bytes, line: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RunError(f"{self.label}, row {line}: not UTF-8 text") from None

    def _hand_over(self, pending: bytes, lines_before: int) -> None:
        """From `pending` on, the rest of the input goes through the csv module."""
        stream = io.TextIOWrapper(
            io.BufferedReader(_Prefixed(pending, self.binary)),
            encoding="utf-8", errors="surrogateescape", newline="",
        )
        self.line_offset = lines_before
        self.reader = csv.reader(stream, strict=True)

    def _read_rows(self, count: int) -> tuple[list[list[str]], list[int]]:
        """Up to `count` rows from the csv module, and the line on which each ends.

        A csv error (a stray quote) is raised after the rows before it are
        parsed, so that errors are reported in line order.
        """
        reader = self.reader
        rows: list[list[str]] = []
        lines: list[int] = []
        try:
            for row in itertools.islice(reader, count):
                rows.append(row)
                lines.append(self.line_offset + reader.line_num)
        except csv.Error as error:
            reason = f"a cell longer than {csv.field_size_limit() >> 10} KiB" if "field limit" in str(error) else error
            message = f"{self.label}, row {self.line_offset + reader.line_num}: {reason}"
            self._parse(rows, lines)  # names an earlier bad row first
            raise RunError(message) from None
        return rows, lines

    def _parse_plain(self, chunk: bytes, first_line: int, count: int) -> PointBatch | None:
        """Parses `count` plain lines in bulk with Arrow; on any doubt, with the csv module."""
        import pyarrow as pa
        import pyarrow.csv as arrow_csv

        if not hasattr(self, "arrow_options"):  # built once per file, not per chunk
            names = [f"c{i}" for i in range(len(self.header))]
            self.arrow_options = {
                "read_options": arrow_csv.ReadOptions(column_names=names, use_threads=False),
                "convert_options": arrow_csv.ConvertOptions(
                    column_types={names[p]: pa.string() for p in self.passthrough_positions}
                    | {names[p]: pa.float64() for p in self.input_positions},
                    null_values=[], strings_can_be_null=False,
                ),
            }
        try:
            table = arrow_csv.read_csv(io.BytesIO(chunk), **self.arrow_options)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = None
        if table is not None and not any(table.column(p).null_count for p in self.input_positions):
            coordinates = np.empty((table.num_rows, len(self.input_positions)), dtype=np.float64)
            for j, p in enumerate(self.input_positions):
                coordinates[:, j] = table.column(p).to_numpy()
            # Arrow reads "nan(123)" as NaN; Python's float() does not.
            if not (b"(" in chunk and np.isnan(coordinates).any()):
                if not len(coordinates):
                    return None
                passthrough = [table.column(p).to_pylist() for p in self.passthrough_positions]
                return PointBatch(coordinates, passthrough)
        # Lines are split as bytes: str.splitlines would also break at U+0085, U+2028 and
        # other characters that the csv module keeps inside a cell. Not UTF-8 decodes to
        # lone surrogates, which `_parse` reports in line order.
        lines = chunk.splitlines(keepends=True)
        rows = list(csv.reader(line.decode("utf-8", "surrogateescape") for line in lines))
        return self._parse(rows, list(range(first_line, first_line + count)))

    def _parse(self, rows: list[list[str]], line_numbers: list[int]) -> PointBatch | None:
        """Bulk-parses a chunk of rows; on any doubt, the careful per-row path."""
        width = len(self.header)
        if set(map(len, rows)) == {width} and _encodes("".join(itertools.chain.from_iterable(rows))):
            pick = operator.itemgetter(*self.input_positions)
            inputs = rows if self.input_positions == list(range(width)) else list(map(pick, rows))
            try:
                coordinates = np.array(inputs, dtype=np.float64).reshape(len(rows), len(self.input_positions))
            except ValueError:
                coordinates = None
            if coordinates is not None:
                passthrough = [list(map(operator.itemgetter(p), rows)) for p in self.passthrough_positions]
                return PointBatch(coordinates, passthrough)
        return self._parse_carefully(rows, line_numbers)

    def _parse_carefully(self, rows: list[list[str]], line_numbers: list[int]) -> PointBatch | None:
        """Drops blank rows, then names the first bad row or cell exactly, in line order."""
        width = len(self.header)
        coordinates: list[list[float]] = []
        kept: list[list[str]] = []
        for row, line in zip(rows, line_numbers):
            text = "".join(row)
            # Bytes that are not UTF-8 were decoded as lone surrogates, which cannot be encoded back.
            if not _encodes(text):
                raise RunError(f"{self.label}, row {line}: not UTF-8 text")
            if not text.strip():
                continue
            if len(row) != width:
                raise RunError(f"{self.label}, row {line}: {len(row)} field(s), the header has {width}")
            # NumPy's bulk parse refused a cell: Python's float() names the culprit
            # (and accepts a few spellings NumPy does not).
            coordinates.append([self._cell(row[position], line, j) for j, position in enumerate(self.input_positions)])
            kept.append(row)
        if not kept:
            return None
        passthrough = [[row[p] for row in kept] for p in self.passthrough_positions]
        return PointBatch(np.array(coordinates, dtype=np.float64).reshape(len(kept), len(self.input_positions)), passthrough)

    def _cell(self, cell: str, line: int, position: int) -> float:
        try:
            return float(cell)
        except ValueError:
            raise RunError(
                f"{self.label}, row {line}, column {self.input_columns[position]!r}: {cell!r} is not a number"
            ) from None

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        """Batches of exactly `batch_size` rows (the last one shorter), whatever the blank lines
        and however the input arrives, so that a run's batches depend on its rows alone."""
        try:
            yield from rebatch(self._blocks(batch_size), batch_size)
        finally:
            if self.binary is not getattr(sys.stdin, "buffer", None):
                self.binary.close()

    def _blocks(self, batch_size: int) -> Iterator[PointBatch]:
        """Parsed rows in blocks of any size: whole plain blocks by Arrow, then the csv module's batches."""
        pending = b""  # the start of a line not yet complete
        at_end = False
        while self.reader is None and not (at_end and not pending):
            # Read until the block holds a batch's worth of lines (a pipe gives what it has).
            reads, newlines = [pending], 0
            unbroken = len(pending)  # bytes since the last line break
            while not at_end and newlines < batch_size:
                data = self.binary.read1(READ_BLOCK)
                at_end = not data
                reads.append(data)
                newlines += data.count(b"\n")
                last_break = data.rfind(b"\n")
                unbroken = unbroken + len(data) if last_break < 0 else len(data) - last_break - 1
                if unbroken > MAX_LINE_BYTES:
                    raise self._too_long(self.lines_read + newlines + 1)
            pending = b"".join(reads)
            cut = len(pending) if at_end else pending.rfind(b"\n") + 1
            special = _first_special(pending, cut)  # a quote or a bare CR: the csv module's work
            if special is not None:
                cut = pending.rfind(b"\n", 0, special) + 1
                newlines = pending.count(b"\n", 0, cut)
            block, pending = pending[:cut], pending[cut:]
            first_line = self.lines_read + 1
            self.lines_read += newlines
            if block and not block.endswith(b"\n"):  # the last line, with no line break
                self.lines_read += 1
            batch = self._parse_plain(block, first_line, self.lines_read - first_line + 1) if block else None
            if batch is not None:
                yield batch
            if special is not None:
                self._hand_over(pending, self.lines_read)
        while self.reader is not None:
            rows, row_lines = self._read_rows(batch_size)
            batch = self._parse(rows, row_lines) if rows else None
            if batch is not None:
                yield batch
            if len(rows) < batch_size:
                return


def rebatch(blocks: Iterator[PointBatch], batch_size: int) -> Iterator[PointBatch]:
    """The rows of `blocks`, of any sizes, in batches of exactly `batch_size` (the last one shorter)."""
    parts: list[PointBatch] = []
    rows = 0
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            parts.append(block)
            rows += len(block.coordinates)
            if rows < batch_size:
                continue
        if not rows:
            return
        coordinates = np.concatenate([part.coordinates for part in parts])
        passthrough = [list(itertools.chain.from_iterable(column)) for column in zip(*(part.passthrough for part in parts))]
        whole = rows - rows % batch_size if block is not None else rows
        for start in range(0, whole, batch_size):
            yield PointBatch(coordinates[start : start + batch_size], [c[start : start + batch_size] for c in passthrough])
        parts = [PointBatch(coordinates[whole:], [c[whole:] for c in passthrough])]
        rows -= whole


def _stdin_binary() -> io.BufferedIOBase:
    """Standard input as bytes, in a buffer of its own.

    Batches are read in a background thread; were it blocked in a read of
    `sys.stdin.buffer` when the command ends (SIGTERM), Python could not take
    that buffer's lock at exit and would abort. Closing this buffer leaves
    file descriptor 0 open.
    """
    if sys.stdin is None:
        raise RunError("--csv -: standard input is closed; give the points on a pipe or name a file")
    try:
        return open(sys.stdin.fileno(), "rb", closefd=False)  # noqa: SIM115
    except (AttributeError, OSError, ValueError):  # a replaced sys.stdin (tests)
        return sys.stdin.buffer


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plain(raw: bytes) -> bool:
    """True when `raw` lines hold no quote character and no bare carriage return."""
    return _first_special(raw, len(raw)) is None


def _first_special(raw: bytes, end: int) -> int | None:
    """The position of the first quote character or bare carriage return in `raw[:end]`, if any."""
    positions = [raw.find(b'"', 0, end)]
    # find() scans far faster than count(): count only where there is a carriage return at all.
    if raw.find(b"\r", 0, end) >= 0 and raw.count(b"\r", 0, end) != raw.count(b"\r\n", 0, end):
        position = raw.find(b"\r", 0, end)
        while raw.startswith(b"\r\n", position):
            position = raw.find(b"\r", position + 2, end)
        positions.append(position)
    found = [position for position in positions if position >= 0]
    return min(found) if found else None


class _Prefixed(io.RawIOBase):
    """A binary stream that gives `prefix` first, then the rest of `stream`."""

    def __init__(self, prefix: bytes, stream: IO[bytes]) -> None:
        self.prefix = memoryview(prefix)
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.prefix:
            size = min(len(buffer), len(self.prefix))
            buffer[:size] = self.prefix[:size]
            self.prefix = self.prefix[size:]
            return size
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class NpzSource(PointSource):
    """Arrays of an `.npz` file: one per input name, or one `x` of shape (N, d)."""

    def __init__(self, path: str, input_names: Sequence[str]) -> None:
        try:
            archive = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise RunError(f"cannot read NPZ {path}: no such file") from None
        except (OSError, ValueError) as error:
            raise RunError(f"cannot read NPZ {path}: {error}") from None
        if not hasattr(archive, "files"):
            raise RunError(f"{path} is a single .npy array, not an .npz archive of named arrays")
        with archive:
            if all(name in archive.files for name in input_names):
                columns = [self._column(archive, path, name) for name in input_names]
                lengths = {len(c) for c in columns}
                if len(lengths) > 1:
                    raise RunError(
                        f"{path}: the input arrays have different lengths "
                        f"({', '.join(f'{n}: {len(c)}' for n, c in zip(input_names, columns))})"
                    )
                self.coordinates = np.stack(columns, axis=1)
            elif "x" in archive.files:
                array = self._numbers(archive, path, "x")
                if array.ndim == 1 and len(input_names) == 1:
                    array = array[:, None]
                if array.ndim != 2 or array.shape[1] != len(input_names):
                    raise RunError(
                        f"{path}: array 'x' has shape {array.shape}, expected "
                        f"(N, {len(input_names)}) for inputs {', '.join(input_names)}"
                    )
                self.coordinates = array
            else:
                raise RunError(
                    f"{path}: no arrays named {', '.join(input_names)} and no array 'x' "
                    f"(arrays: {', '.join(archive.files) or 'none'})"
                )
        self.passthrough_names = []
        self.total = len(self.coordinates)

    @staticmethod
    def _numbers(archive: np.lib.npyio.NpzFile, path: str, name: str) -> np.ndarray:
        """Array `name` as float64; only integer and real float arrays are points.

        Raises:
            RunError: Python objects (never unpickled), text, records or complex numbers,
                whose imaginary part a cast would silently drop.
        """
        try:
            array = np.asarray(archive[name])
        except ValueError:  # object arrays: loading them would unpickle, which derivcli never does
            raise RunError(f"{path}: array {name!r} holds Python objects; save it as an array of numbers") from None
        except (OSError, zipfile.BadZipFile) as error:
            raise RunError(f"cannot read NPZ {path}: array {name!r}: {error}") from None
        kinds = {"c": "complex numbers", "U": "text", "S": "bytes", "V": "records", "M": "dates", "m": "durations",
                 "b": "booleans"}
        if array.dtype.kind not in "iuf":
            raise RunError(f"{path}: array {name!r} holds {kinds.get(array.dtype.kind, str(array.dtype))} "
                           f"(dtype {array.dtype}); points are real numbers (integer or float arrays)")
        return array.astype(np.float64)

    @classmethod
    def _column(cls, archive: np.lib.npyio.NpzFile, path: str, name: str) -> np.ndarray:
        array = cls._numbers(archive, path, name)
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise RunError(f"{path}: array {name!r} has shape {array.shape}, expected a 1-D array")
        return array

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        for start in range(0, self.total or 0, batch_size):
            yield PointBatch(self.coordinates[start : start + batch_size])


def open_source(
    input_names: Sequence[str],
    at: Sequence[AtPoint] = (),
    grid: Sequence[GridAxis] = (),
    csv_path: str | None = None,
    npz_path: str | None = None,
    columns: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> PointSource:
    """Opens the one point source given on the command line, or its `shard` K/N.

    Raises:
        UsageError: no source, or more than one.
        RunError: the file cannot be read.
    """
    source = _open_one(input_names, at, grid, csv_path, npz_path, columns)
    if shard is None:
        return source
    if isinstance(source, CsvSource):
        if csv_path == "-":
            raise UsageError("--shard needs a file, not standard input: every shard reads all rows")
        source.total = count_csv_rows(str(csv_path))
    assert batch_size is not None
    return ShardSource(source, shard, batch_size)


def count_csv_rows(path: str) -> int:
    """The data rows of a CSV file (blank lines not counted), read once quickly."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = sum(1 for row in csv.reader(handle) if row and any(cell.strip() for cell in row))
    return max(0, rows - 1)


def _open_one(
    input_names: Sequence[str],
    at: Sequence[AtPoint],
    grid: Sequence[GridAxis],
    csv_path: str | None,
    npz_path: str | None,
    columns: Sequence[str] | None,
) -> PointSource:
    given = [
        name for name, present in
        (("--at", bool(at)), ("--grid", bool(grid)), ("--csv", csv_path is not None),
         ("--npz", npz_path is not None))
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
        return CsvSource(csv_path, input_names, columns)
    assert npz_path is not None
    if not Path(npz_path).exists():
        raise RunError(f"cannot read NPZ {npz_path}: no such file")
    return NpzSource(npz_path, input_names)


def check_one_source(given: Sequence[str]) -> None:
    """Raises UsageError unless exactly one point source was given."""
    if not given:
        raise UsageError("no points: give one of --at, --grid, --csv or --npz")
    if len(given) > 1:
        raise UsageError(
            f"{' and '.join(given)} given together: give exactly one point source"
        )
