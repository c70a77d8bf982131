"""`--csv FILE` and `--csv -`: a header row and rows of numbers, parsed by Arrow in blocks."""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import operator
import os
import queue
import stat
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from derivcli.errors import RunError, UsageError
from derivcli.naming import summarized
from derivcli.points.base import PointBatch, PointSource, rebatch

# Bytes per read of a CSV: Arrow parses blocks of this size in one call, without the GIL.
READ_BLOCK = 1 << 20
# The longest CSV line read: a row of coordinates and ids is short, and a file without line
# breaks (`--csv /dev/zero`, a binary file) must not be held in memory whole.
MAX_LINE_BYTES = 1 << 20
# A pipe that gives nothing for this long, with whole rows waiting: those rows are computed at once.
STALL_SECONDS = 0.1




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
                f"({summarized(input_names)})"
            )
        self.header = [cell.strip() for cell in header]
        wanted = list(columns) if columns else list(input_names)
        if columns and len(columns) != len(input_names):
            raise UsageError(
                f"--columns {','.join(columns)}: {len(columns)} column(s) for "
                f"{len(input_names)} input(s) ({summarized(input_names)})"
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
