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
import os
import queue
import stat
import sys
import threading
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
# A pipe that gives nothing for this long, with whole rows waiting: those rows are computed at once.
STALL_SECONDS = 0.1


@dataclass
class PointBatch:
    """A batch of points: coordinates in input order and pass-through cells."""

    coordinates: np.ndarray  # (rows, inputs), float64
    passthrough: list[list[str]] = field(default_factory=list)  # one list per column
    stalled: bool = False  # the input paused after these rows: compute them now, not when a batch is full


class PointSource:
    """A stream of points for the inputs `input_names`.

    Attributes:
        passthrough_names: columns carried through unchanged (CSV only).
        grid_shape: the grid's shape for `--grid`, else None.
        grid_axes: the inputs along the grid's axes, in order.
        total: the number of points when known in advance, else None.
        run_total: the whole run's points (every shard's), when known.
    """

    passthrough_names: list[str]
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


class ShardSource(PointSource):
    """Shard K of N of another source (`--shard K/N`): its points [K M / N, (K+1) M / N).

    Batches are cut where the unsharded run cuts them (`shards.aligned_cuts`), so
    that only a shard's first and last batch are smaller than the unsharded run's.
    """

    def __init__(self, source: PointSource, shard: tuple[int, int], batch_size: int) -> None:
        from derivcli.shards import shard_range

        if source.total is None:
            raise UsageError("--shard needs a source whose size is known: a file, not standard input")
        self.source = source
        self.shard = shard
        self.batch_size = batch_size
        self.start, self.stop = shard_range(source.total, shard)
        self.whole_total = source.total
        self.total = self.stop - self.start
        self.passthrough_names = source.passthrough_names
        self.grid_shape = source.grid_shape
        self.grid_axes = source.grid_axes

    @property
    def run_total(self) -> int | None:
        return self.whole_total

    @property
    def size_in_advance(self) -> int | None:
        return self.source.size_in_advance

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        if batch_size != self.batch_size:
            raise ValueError("a shard is cut for one batch size")
        return self.source.rows(self.start, self.stop, batch_size)

    def identity(self) -> list[object]:
        return self.source.identity()


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
        return self.rows(0, self.total or 0, batch_size)

    def rows(self, start: int, stop: int, batch_size: int) -> Iterator[PointBatch]:
        from derivcli.shards import aligned_cuts

        for low, high in aligned_cuts(start, stop, batch_size):
            yield PointBatch(self.coordinates[low:high])

    def identity(self) -> list[object]:
        return ["at", self.coordinates.tolist()]


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
        self, path: str, input_names: Sequence[str], columns: Sequence[str] | None = None, delimiter: str = ","
    ) -> None:
        self.delimiter = delimiter
        self.label = "standard input" if path == "-" else path
        if path == "-":
            self.binary: io.BufferedIOBase = _stdin_binary()
        else:
            try:
                self.binary = open(path, "rb")  # noqa: SIM115
            except OSError as error:
                raise RunError(f"cannot read CSV {path}: {error.strerror}") from None
        self.lines_read = 0  # raw lines taken from `binary` by the fast path
        self.first_row = 0  # the data row `binary` starts at (a shard's first)
        status = os.fstat(self.binary.fileno()) if path != "-" else None
        self.regular = status is not None and stat.S_ISREG(status.st_mode)
        self.size = status.st_size if self.regular else None
        self.arrivals: queue.Queue | None = None  # what the pipe's reading thread has read
        self.row_index: Any = None  # a `csv_scan.CsvRowIndex`, for a shard of a plain file
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
            other = next((d for d in (";", "\t", "|", ",") if d != delimiter and len(self.header) == 1
                          and d in self.header[0]), None)
            if other is not None:
                shown = "\\t" if other == "\t" else other
                raise UsageError(
                    f"{self.label}: the header {self.header[0]!r} is one column with '{shown}' in it: a "
                    f"{'tab' if other == chr(9) else shown}-separated file? pass --delimiter '{shown}'")
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

    @property
    def size_in_advance(self) -> int | None:
        return None  # read as a stream; counted only when sharded
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
            row = next(csv.reader([self._decode(raw, self.lines_read)], delimiter=self.delimiter), [])
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
        self.reader = csv.reader(stream, strict=True, delimiter=self.delimiter)

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
                "parse_options": arrow_csv.ParseOptions(delimiter=self.delimiter),
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
        rows = list(csv.reader((line.decode("utf-8", "surrogateescape") for line in lines), delimiter=self.delimiter))
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
            yield from rebatch(self._blocks(batch_size), batch_size, self.first_row)
        finally:
            if self.binary is not getattr(sys.stdin, "buffer", None):
                self.binary.close()

    def _read(self, wait: float | None) -> bytes | None:
        """The next bytes of the input; None when a pipe gives nothing for `wait` seconds.

        A regular file is read directly. A pipe or terminal is read by a thread of its own,
        so that a pause in the input can be told from its end.
        """
        if self.regular:
            return self.binary.read1(READ_BLOCK)
        if self.arrivals is None:
            self.arrivals = queue.Queue(maxsize=4)
            binary, arrivals = self.binary, self.arrivals

            def pump() -> None:
                try:
                    while True:
                        data = binary.read1(READ_BLOCK)
                        arrivals.put((data, None))
                        if not data:
                            return
                except BaseException as error:  # noqa: BLE001 - handed to the reader, raised there
                    arrivals.put((b"", error))

            threading.Thread(target=pump, name="derivcli-stdin", daemon=True).start()
        try:
            data, error = self.arrivals.get(timeout=wait)
        except queue.Empty:
            return None
        if error is not None:
            raise error
        return data

    def rows(self, start: int, stop: int, batch_size: int) -> Iterator[PointBatch]:
        """Rows [start, stop): from the row index's byte offsets when the file has one, else read from the start."""
        if self.row_index is None or self.reader is not None:
            yield from super().rows(start, stop, batch_size)
            return
        begin, end = self.row_index.mark(start), self.row_index.mark(stop)
        self.binary.close()
        self.binary = io.BufferedReader(_Window(self.row_index.path, begin.offset, end.offset))
        self.lines_read, self.first_row = begin.lines, start
        yield from self.batches(batch_size)

    def identity(self) -> list[object]:
        return ["csv", self.header, self.input_columns, self.total, self.size]

    def _blocks(self, batch_size: int) -> Iterator[PointBatch]:
        """Parsed rows in blocks of any size: whole plain blocks by Arrow, then the csv module's batches."""
        pending = b""  # the start of a line not yet complete
        at_end = False
        while self.reader is None and not (at_end and not pending):
            # Read until the block holds a batch's worth of lines (a pipe gives what it has).
            reads, newlines = [pending], 0
            unbroken = len(pending)  # bytes since the last line break
            stalled = False
            while not at_end and newlines < batch_size:
                # A pipe that pauses with whole lines waiting: compute those rather than wait for a batch.
                data = self._read(wait=None if newlines == 0 and b"\n" not in pending else STALL_SECONDS)
                if data is None:
                    stalled = True
                    break
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
                batch.stalled = stalled
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
        passthrough = [list(itertools.chain.from_iterable(column)) for column in zip(*(part.passthrough for part in parts))]
        start = 0
        flush = block is None or block.stalled  # the end, or a pause of the input: the rest goes now
        while rows - start >= size or (flush and start < rows):
            end = min(start + size, rows)
            yield PointBatch(coordinates[start:end], [c[start:end] for c in passthrough])
            start, size = end, batch_size
        parts = [PointBatch(coordinates[start:], [c[start:] for c in passthrough])]
        rows -= start


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


class _Window(io.RawIOBase):
    """The bytes [begin, end) of a file: one shard's rows of a CSV."""

    def __init__(self, path: str, begin: int, end: int) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115
        self.handle.seek(begin)
        self.left = end - begin

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.handle.read(min(len(buffer), self.left))
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.handle.close()
        super().close()


class NpzSource(PointSource):
    """Arrays of an `.npz` file: one per input name, or one `x` of shape (N, d).

    Only the arrays' headers are read when the file is opened; each batch reads
    its own rows, so memory stays flat and a shard near the end starts there.
    """

    def __init__(self, path: str, input_names: Sequence[str]) -> None:
        self.path = path
        if Path(path).exists() and not Path(path).is_file():
            # A device (/dev/zero) would be read without end, a FIFO cannot seek: an .npz is read by offset.
            raise RunError(f"cannot read NPZ {path}: not a regular file; an .npz is read by the offsets of its "
                           "arrays, so save it to a file first")
        try:
            archive = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise RunError(f"cannot read NPZ {path}: no such file") from None
        except zipfile.BadZipFile:
            if Path(path).is_file() and Path(path).read_bytes()[:6] == b"\x93NUMPY":
                raise RunError(f"{path} is a single .npy array, not an .npz archive of named arrays") from None
            raise RunError(f"cannot read NPZ {path}: not a zip archive (.npz files are written by numpy.savez)") from None
        except OSError as error:
            raise RunError(f"cannot read NPZ {path}: {error.strerror or error}") from None
        self.archive = archive
        files = [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
        if all(name in files for name in input_names):
            self.arrays = [_NpyRows(archive, path, name, column=True) for name in input_names]
            lengths = {a.length for a in self.arrays}
            if len(lengths) > 1:
                raise RunError(
                    f"{path}: the input arrays have different lengths "
                    f"({', '.join(f'{n}: {a.length}' for n, a in zip(input_names, self.arrays))})"
                )
        elif "x" in files:
            whole = _NpyRows(archive, path, "x", column=False)
            width = whole.shape[1] if len(whole.shape) == 2 else None
            if not (width == len(input_names) or (len(whole.shape) == 1 and len(input_names) == 1)):
                raise RunError(
                    f"{path}: array 'x' has shape {whole.shape}, expected "
                    f"(N, {len(input_names)}) for inputs {', '.join(input_names)}"
                )
            self.arrays = [whole]
        else:
            raise RunError(
                f"{path}: no arrays named {', '.join(input_names)} and no array 'x' "
                f"(arrays: {', '.join(files) or 'none'})"
            )
        self.dimension = len(input_names)
        self.passthrough_names = []
        self.total = self.arrays[0].length

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        return self.rows(0, self.total or 0, batch_size)

    def rows(self, start: int, stop: int, batch_size: int) -> Iterator[PointBatch]:
        from derivcli.shards import aligned_cuts

        try:
            for low, high in aligned_cuts(start, stop, batch_size):
                parts = [array.read(low, high).reshape(high - low, -1) for array in self.arrays]
                yield PointBatch(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        finally:
            self.archive.close()

    def identity(self) -> list[object]:
        return ["npz", [(a.name, a.shape, str(a.dtype)) for a in self.arrays], Path(self.path).stat().st_size]


class _NpyRows:
    """Rows of one array in an `.npz`, read by offset; validated from its header alone.

    A stored (uncompressed, as `numpy.savez` writes) member is read at the rows'
    byte offset; a compressed one is decompressed up to them, a fast scan.
    """

    KINDS = {"c": "complex numbers", "U": "text", "S": "bytes", "V": "records", "M": "dates", "m": "durations",
             "b": "booleans", "O": "Python objects"}

    def __init__(self, archive: zipfile.ZipFile, path: str, name: str, column: bool) -> None:
        self.archive, self.path, self.name = archive, path, name
        self.info = archive.getinfo(name + ".npy")
        self.stored_at: int | None = None  # the array's first byte in the archive file (stored members)
        try:
            with archive.open(self.info) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, self.fortran, self.dtype = read_header(member)
                self.data_start = member.tell()
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            raise RunError(f"cannot read NPZ {path}: array {name!r}: {error}") from None
        if self.dtype.kind == "O":  # loading it would unpickle, which derivcli never does
            raise RunError(f"{path}: array {name!r} holds Python objects; save it as an array of numbers")
        if self.dtype.kind not in "iuf":
            raise RunError(f"{path}: array {name!r} holds {self.KINDS.get(self.dtype.kind, str(self.dtype))} "
                           f"(dtype {self.dtype}); points are real numbers (integer or float arrays)")
        if column and len(shape) == 2 and shape[1] == 1:
            shape = (shape[0],)
        if column and len(shape) != 1:
            raise RunError(f"{path}: array {name!r} has shape {shape}, expected a 1-D array")
        self.shape = tuple(shape)
        self.length = shape[0] if shape else 0
        self.width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        needed = self.data_start + math.prod(shape) * self.dtype.itemsize
        if self.info.file_size < needed:
            raise RunError(f"cannot read NPZ {path}: array {name!r} is truncated "
                           f"({self.info.file_size} bytes, its header says {needed})")

    def read(self, low: int, high: int) -> np.ndarray:
        """Rows [low, high) as float64, of shape (high - low, width)."""
        size = self.dtype.itemsize
        if self.fortran and self.width > 1:  # column-major: each column's rows lie apart
            columns = [self._bytes((j * self.length + low) * size, (high - low) * size) for j in range(self.width)]
            return np.stack([np.frombuffer(c, self.dtype) for c in columns], axis=1).astype(np.float64)
        raw = self._bytes(low * self.width * size, (high - low) * self.width * size)
        return np.frombuffer(raw, self.dtype).reshape(high - low, self.width).astype(np.float64)

    def _bytes(self, offset: int, count: int) -> bytes:
        try:
            if self.info.compress_type == zipfile.ZIP_STORED:
                handle = self.archive.fp
                assert handle is not None
                if self.stored_at is None:  # where the array's bytes begin, past the member's local header
                    handle.seek(self.info.header_offset)
                    local = handle.read(30)  # the local header ends with its name's and extra field's lengths
                    self.stored_at = (self.info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                                      + int.from_bytes(local[28:30], "little") + self.data_start)
                handle.seek(self.stored_at + offset)
                data = handle.read(count)
            else:
                with self.archive.open(self.info) as member:
                    member.seek(self.data_start + offset)
                    data = member.read(count)
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            raise RunError(f"cannot read NPZ {self.path}: array {self.name!r}: {error}") from None
        if len(data) != count:
            raise RunError(f"cannot read NPZ {self.path}: array {self.name!r} is truncated")
        return data


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
) -> PointSource:
    """Opens the one point source given on the command line, or its `shard` K/N.

    Raises:
        UsageError: no source, or more than one.
        RunError: the file cannot be read.
    """
    if shard is not None:
        refuse_unshardable("--csv", csv_path)
        refuse_unshardable("--npz", npz_path)
    if delimiter != "," and csv_path is None:
        raise UsageError("--delimiter applies to --csv only")
    source = _open_one(input_names, at, grid, csv_path, npz_path, columns, delimiter)
    if shard is None:
        return source
    if isinstance(source, CsvSource):
        from derivcli.csv_scan import CsvRowIndex

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
        return CsvSource(csv_path, input_names, columns, delimiter)
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
