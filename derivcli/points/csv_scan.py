"""Where the rows of a CSV file start, by a scan of its bytes (for `--shard` on a CSV).

A shard of a CSV starts at its first row after one fast scan of the bytes,
without parsing the rows before it. The scan counts the rows as `CsvSource`
does: a line whose cells are all blank is no row, and the first row is the
header. It works on files without quote characters and bare carriage returns,
where every line break ends a row; on any other file it answers None, and the
caller falls back to reading the rows from the start with the csv module.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import numpy as np

# Bytes per scanned block: small enough that the per-block arrays stay a few MiB.
SCAN_BLOCK = 1 << 22
# What str.strip() removes among ASCII bytes: with the delimiter, a line of only these is blank.
_BLANK_BYTES = b" \t\r\x0b\x0c\x1c\x1d\x1e\x1f"


@dataclass
class RowMark:
    """A position in the file between two lines: `rows` data rows lie before `offset`, on `lines` lines."""

    offset: int
    lines: int
    rows: int


class CsvRowIndex:
    """The data rows of a plain CSV file, counted once; `mark(n)` finds where row n starts.

    Attributes:
        total: the data rows (the header and blank lines not counted).
    """

    def __init__(self, path: str, checkpoints: list[RowMark], end: RowMark, delimiter: str = ",") -> None:
        self.path = path
        self.delimiter = delimiter
        self.checkpoints = checkpoints  # where each scanned block starts; `rows` is -1 before the header
        self.end = end
        self.total = max(end.rows, 0)

    @classmethod
    def scan(cls, path: str, max_line_bytes: int, delimiter: str = ",") -> CsvRowIndex | None:
        """Counts the rows of `path`; None when the file has a quote or a bare carriage return.

        Raises:
            OSError: the file cannot be read.
            ValueError: a line longer than `max_line_bytes` (not a CSV of points); its line number.
        """
        checkpoints: list[RowMark] = []
        rows = -1  # the header, the first non-blank line, brings the count to 0
        lines = offset = 0
        pending = b""
        with open(path, "rb") as handle:
            while True:
                data = handle.read(SCAN_BLOCK)
                block = pending + data
                cut = len(block) if not data else block.rfind(b"\n") + 1
                if data and cut == 0:
                    if len(block) > max_line_bytes:
                        raise ValueError(lines + 1)
                    pending = block
                    continue
                body, pending = block[:cut], block[cut:]
                if body:
                    nonblank = _nonblank_lines(_as_read(body, offset), delimiter)
                    if nonblank is None:
                        return None
                    checkpoints.append(RowMark(offset, lines, rows))
                    lines += len(nonblank)
                    rows += int(np.count_nonzero(nonblank))
                    offset += len(body)
                if not data:
                    break
        return cls(path, checkpoints, RowMark(offset, lines, rows), delimiter)

    def mark(self, row: int) -> RowMark:
        """Where data row `row` starts: right after the line of row `row - 1` (of the header for row 0)."""
        if row >= self.total:
            return self.end
        # The target line lies in the last block that starts with fewer rows before it.
        number = max(i for i, c in enumerate(self.checkpoints) if c.rows < row)
        start = self.checkpoints[number]
        stop = self.checkpoints[number + 1].offset if number + 1 < len(self.checkpoints) else self.end.offset
        with open(self.path, "rb") as handle:
            handle.seek(start.offset)
            body = _as_read(handle.read(stop - start.offset), start.offset)
        nonblank = _nonblank_lines(body, self.delimiter)
        assert nonblank is not None  # the scan read the same bytes
        counted = np.cumsum(nonblank) + start.rows
        line = int(np.searchsorted(counted, row, side="left"))
        ends = np.flatnonzero(np.frombuffer(body, np.uint8) == 0x0A) + 1
        return RowMark(start.offset + int(ends[line]), start.lines + line + 1, row)


def _as_read(body: bytes, offset: int) -> bytes:
    """A block as CsvSource reads it: the BOM dropped (three blanks keep the offsets), a last line break added."""
    if offset == 0 and body.startswith(codecs.BOM_UTF8):
        body = b"   " + body[3:]
    return body if not body or body.endswith(b"\n") else body + b"\n"


def _nonblank_lines(body: bytes, delimiter: str = ",") -> np.ndarray | None:
    """For each line of `body` (which ends with a line break), whether it holds a row; None on quotes or bare CRs."""
    if b'"' in body or (b"\r" in body and body.count(b"\r") != body.count(b"\r\n")):
        return None
    if not body.isascii():
        # Non-ASCII whitespace (U+00A0, U+2028...) also makes a blank cell: decide such lines as Python does.
        return np.array([bool(line.decode("utf-8", "surrogateescape").replace(delimiter, "").strip())
                         for line in body.split(b"\n")[:-1]], dtype=bool)
    blank = _BLANK_BYTES + delimiter.encode() if delimiter.isascii() else _BLANK_BYTES
    kept = np.frombuffer(body.translate(None, blank), np.uint8)
    breaks = np.flatnonzero(kept == 0x0A)
    # With blanks deleted, a blank line is a line break right after the previous one.
    return np.diff(breaks, prepend=-1) > 1
