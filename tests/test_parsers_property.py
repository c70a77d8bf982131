"""Property-based tests: every parser gives a result or a one-line usage error, never a traceback."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derivcli.errors import DerivcliError, UsageError
from derivcli.points import CsvSource, GridSource
from derivcli.specs import parse_at, parse_grid, parse_names, parse_partial, parse_shard

PARSERS = [parse_grid, parse_at, parse_partial, lambda t: parse_names(t, "--names"), parse_shard]
finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


@pytest.mark.parametrize("parser", PARSERS, ids=["grid", "at", "partial", "names", "shard"])
@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30))
def test_random_text_never_raises_anything_but_a_usage_error(parser, text):
    try:
        parser(text)
    except UsageError as error:
        assert "\n" not in error.message and error.message


@settings(max_examples=200, deadline=None)
@given(start=finite, stop=finite, num=st.integers(2, 50), name=st.sampled_from(["", "x=", "x0="]))
def test_valid_grid_specs_parse_to_linspace(start, stop, num, name):
    axis = parse_grid(f"{name}{start!r}:{stop!r}:{num}")
    assert (axis.start, axis.stop, axis.num) == (start, stop, num)
    source = GridSource([axis], ["x" if name in ("", "x=") else "x0"])
    (batch,) = list(source.batches(100))
    np.testing.assert_array_equal(batch.coordinates[:, 0], np.linspace(start, stop, num))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=5))
def test_at_points_round_trip(values):
    assert parse_at(",".join(map(repr, values))).values == tuple(values)
    named = parse_at(",".join(f"v{i}={v!r}" for i, v in enumerate(values)))
    assert named.names == tuple(f"v{i}" for i in range(len(values)))


@settings(max_examples=200, deadline=None)
@given(powers=st.dictionaries(st.sampled_from(["x", "y", "t", "x0"]), st.integers(1, 8), min_size=1))  # order <= 32
def test_partial_specs_round_trip(powers):
    text = ",".join(name if p == 1 else f"{name}^{p}" for name, p in powers.items())
    assert parse_partial(text) == powers


cells = st.one_of(
    finite.map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e308", "1e309", "-0", " 2 ", "+3", "0x1p3", "", "1,5", 'a"b']),
    st.text(max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(cells, cells, st.text(max_size=6)), max_size=12),
       bom=st.booleans(), crlf=st.booleans(), blank_lines=st.booleans())
def test_random_csv_gives_rows_or_a_one_line_error(tmp_path_factory, rows, bom, crlf, blank_lines):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(["x0", "x1", "note"])
    for row in rows:
        writer.writerow(row)
        if blank_lines:
            buffer.write("\n")
    path = tmp_path_factory.mktemp("csv") / "points.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8"))
    try:
        source = CsvSource(str(path), ["x0", "x1"])
        batches = list(source.batches(5))
    except DerivcliError as error:
        assert "\n" not in error.message
        return
    coordinates = np.concatenate([b.coordinates for b in batches]) if batches else np.zeros((0, 2))
    kept = [r for r in rows if any(str(c).strip() for c in r)]
    assert len(coordinates) == len(kept)
    for (a, b, _), parsed in zip(kept, coordinates):
        for cell, value in zip((a, b), parsed):
            expected = float(cell)
            assert value == expected or (math.isnan(value) and math.isnan(expected))


def _read_csv(path, fast: bool, read_block: int = 1 << 20):
    """Every batch of a CSV, or the error's message; `fast=False` forces the csv-module path.

    `read_block` bytes per read: small ones cut lines across reads, as a pipe does.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("derivcli.points.csvfile.READ_BLOCK", read_block)
        if not fast:
            patch.setattr("derivcli.points.csvfile._plain", lambda raw: False)
        try:
            source = CsvSource(str(path), ["x0", "x1"])
            batches = [(b.coordinates.tolist(), b.passthrough) for b in source.batches(3)]
        except DerivcliError as error:
            return error.message
    assert all(len(rows) == 3 for rows, _ in batches[:-1])  # whole batches, whatever the blank lines
    return batches


raw_cells = st.one_of(
    finite.map(repr),
    st.sampled_from([b"nan", b"nan(123)", b"-nan", b"1_0", b"\xd9\xa1", b"1e400", b" 1", b"", b"\xff", b"1.5f", b".5", b"5.",
                     b'"2"', b'"a,b"', b'"x\ny"', b'"open', b'x"y', b"3\r", b"\r4"]),
    st.text(alphabet="0123456789.e+-naif ", max_size=6),
).map(lambda c: c if isinstance(c, bytes) else c.encode())


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.one_of(st.tuples(finite, finite, st.sampled_from(["", "a", "b c", "é"])), st.none()),
                     min_size=1, max_size=40),
       crlf=st.booleans(), read_block=st.integers(1, 64))
def test_valid_csv_cut_into_any_reads_gives_every_row(tmp_path_factory, rows, crlf, read_block):
    """Valid rows (None: a blank line) read in blocks of any size: every row, in order, in whole batches."""
    end = "\r\n" if crlf else "\n"
    text = "x0,x1,note" + end + "".join("" + end if row is None else f"{row[0]!r},{row[1]!r},{row[2]}{end}" for row in rows)
    path = tmp_path_factory.mktemp("csv") / "points.csv"
    path.write_text(text, encoding="utf-8", newline="")
    fast, careful = _read_csv(path, True, read_block), _read_csv(path, False)
    assert repr(fast) == repr(careful)
    kept = [row for row in rows if row is not None]
    assert [value for coordinates, _ in fast for value in coordinates] == [[a, b] for a, b, _ in kept]
    assert [cell for _, (notes,) in fast for cell in notes] == [note for _, _, note in kept]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.one_of(st.lists(raw_cells, min_size=1, max_size=4).map(b",".join), st.just(b"")), max_size=10),
       crlf=st.booleans(), read_block=st.sampled_from([1, 5, 16, 1 << 20]))
def test_bulk_csv_path_agrees_with_the_csv_module(tmp_path_factory, lines, crlf, read_block):
    """Arrow's bulk parse gives exactly the rows, values and errors of the careful csv-module path,
    however the input is cut into reads."""
    end = b"\r\n" if crlf else b"\n"
    path = tmp_path_factory.mktemp("csv") / "points.csv"
    path.write_bytes(b"x0,x1,note" + end + b"".join(line + end for line in lines))
    fast, careful = _read_csv(path, True, read_block), _read_csv(path, False)
    assert repr(fast) == repr(careful)  # repr: NaN == NaN


@settings(max_examples=300, deadline=None)
@given(start=finite, stop=st.one_of(finite, st.just(0.0)), num=st.integers(1, 3000), data=st.data())
def test_grid_values_are_numpy_linspace_bit_for_bit(start, stop, num, data):
    """A batch's grid values, made without the whole axis, are np.linspace's exactly."""
    from derivcli.points import linspace_at
    from derivcli.specs import GridAxis

    if data.draw(st.booleans()):
        stop = start  # a zero step
    indices = np.arange(num)
    expected = np.linspace(start, stop, num, dtype=np.float64)
    assert linspace_at(GridAxis(None, start, stop, num), indices).view(np.uint64).tolist() == expected.view(np.uint64).tolist()
