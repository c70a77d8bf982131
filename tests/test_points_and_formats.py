"""Point sources and output formats, each checked against the closed form by reading the output back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from derivcli.writers import read_columns

from conftest import read_csv

RTOL, ATOL = 1e-5, 1e-6  # float32 model, values of order 1


def check_gradient(net, table, points):
    points = np.asarray(points, dtype=np.float64)
    np.testing.assert_allclose(table["y"], net.derivative(points, 0, (0, 0)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(table["dy/dx0"], net.derivative(points, 0, (1, 0)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(table["dy/dx1"], net.derivative(points, 0, (0, 1)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "at_args",
    [["--at", "0.5,-1", "--at", "2,0.25"], ["--at", "x0=0.5,x1=-1", "--at", "x1=0.25,x0=2"]],
    ids=["positional", "named"],
)
def test_at_points(model_factory, cli, at_args):
    net, path = model_factory("tanh", 2, 1)
    result = cli("grad", path, *at_args)
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    np.testing.assert_array_equal(table["x0"], [0.5, 2])
    check_gradient(net, table, [(0.5, -1), (2, 0.25)])


def test_at_single_value_on_one_input_model(model_factory, cli):
    net, path = model_factory("softplus", 1, 1)
    result = cli("grad", path, "--at", "0.5")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "x,y,dy/dx"
    table = read_csv(result.stdout)
    np.testing.assert_allclose(table["dy/dx"], net.derivative(np.array([[0.5]]), 0, (1,)), rtol=RTOL)


def test_grid_per_input_is_meshgrid_ij_order(model_factory, cli):
    net, path = model_factory("tanh", 2, 1)
    result = cli("grad", path, "--grid", "x0=-1:1:3", "--grid", "x1=0:2:5")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    a, b = np.meshgrid(np.linspace(-1, 1, 3), np.linspace(0, 2, 5), indexing="ij")
    np.testing.assert_allclose(table["x0"], a.ravel())
    np.testing.assert_allclose(table["x1"], b.ravel())
    check_gradient(net, table, np.stack([a.ravel(), b.ravel()], 1))


def test_grid_for_every_unnamed_input_and_pinned_axis(model_factory, cli):
    net, path = model_factory("tanh", 2, 1)
    result = cli("grad", path, "--grid", "-2:2:4", "--grid", "x1=0.5:0.5:1")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    np.testing.assert_allclose(table["x0"], np.linspace(-2, 2, 4).astype(np.float32))
    np.testing.assert_array_equal(table["x1"], [0.5] * 4)
    check_gradient(net, table, np.stack([table["x0"], table["x1"]], 1))


@pytest.mark.parametrize("from_stdin", [False, True], ids=["file", "stdin"])
def test_csv_points_with_passthrough_columns(model_factory, cli, tmp_path, from_stdin):
    net, path = model_factory("tanh", 2, 1)
    text = 'id,x1,note,x0\n7,0.5,"a, quoted",1.5\n8,-0.25,b,-2\n'
    if from_stdin:
        result = cli("grad", path, "--csv", "-", input=text)
    else:
        data = tmp_path / "points.csv"
        data.write_text(text)
        result = cli("grad", path, "--csv", data)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "x0,x1,id,note,y,dy/dx0,dy/dx1"
    table = read_csv(result.stdout)
    assert table["note"] == ["a, quoted", "b"]
    np.testing.assert_array_equal(table["id"], [7, 8])
    check_gradient(net, table, [(1.5, 0.5), (-2, -0.25)])


def test_csv_columns_option_maps_by_position(model_factory, cli, tmp_path):
    net, path = model_factory("tanh", 2, 1)
    data = tmp_path / "p.csv"
    data.write_text("a,b\r\n1,2\r\n\r\n3,4\r\n")  # CRLF and a blank line
    result = cli("grad", path, "--csv", data, "--columns", "b,a")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    np.testing.assert_array_equal(table["x0"], [2, 4])
    np.testing.assert_array_equal(table["x1"], [1, 3])
    assert list(table) == ["x0", "x1", "y", "dy/dx0", "dy/dx1"], "input columns do not pass through"
    check_gradient(net, table, [(2, 1), (4, 3)])


@pytest.mark.parametrize("layout", ["per_input", "single_x"])
def test_npz_points(model_factory, cli, tmp_path, layout):
    net, path = model_factory("tanh", 2, 1)
    points = np.array([[0.1, 0.2], [-0.3, 1.4], [2.0, -1.0]])
    data = tmp_path / "p.npz"
    if layout == "per_input":
        np.savez(data, x0=points[:, 0], x1=points[:, 1])
    else:
        np.savez(data, x=points)
    result = cli("grad", path, "--npz", data)
    assert result.exit_code == 0, result.stderr
    check_gradient(net, read_csv(result.stdout), points)


def test_batches_stream_in_order(model_factory, cli):
    """A batch size that does not divide the points gives the same rows as one batch."""
    net, path = model_factory("tanh", 2, 1)
    whole = cli("grad", path, "--grid", "-1:1:7")
    batched = cli("grad", path, "--grid", "-1:1:7", "--batch-size", "5")
    assert whole.exit_code == batched.exit_code == 0
    one, many = read_csv(whole.stdout), read_csv(batched.stdout)
    np.testing.assert_array_equal(one["x0"], many["x0"])
    np.testing.assert_array_equal(one["x1"], many["x1"])
    for name in ("y", "dy/dx0", "dy/dx1"):
        # BLAS blocks a float32 matmul differently by batch size: 1 ulp apart, not more.
        np.testing.assert_allclose(one[name], many[name], rtol=3e-7, atol=1e-7)


@pytest.mark.parametrize("form", ["csv", "tsv", "json", "jsonl", "table"])
def test_text_formats_read_back(model_factory, cli, form):
    net, path = model_factory("tanh", 2, 1)
    result = cli("grad", path, "--at", "0.5,-1", "--at", "2,0.25", "--format", form)
    assert result.exit_code == 0, result.stderr
    points = [(0.5, -1), (2, 0.25)]
    if form in ("csv", "tsv"):
        table = read_csv(result.stdout, "\t" if form == "tsv" else ",")
    elif form == "json":
        rows = json.loads(result.stdout)
        table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    elif form == "jsonl":
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    else:
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["x0", "x1", "y", "dy/dx0", "dy/dx1"]
        cells = np.array([line.split() for line in lines[1:]], dtype=np.float64)
        table = dict(zip(lines[0].split(), cells.T))
    check_gradient(net, table, points)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".npz", ".h5", ".hdf5"])
def test_output_file_format_from_extension(model_factory, cli, tmp_path, suffix):
    net, path = model_factory("tanh", 2, 1)
    target = tmp_path / f"out{suffix}"
    result = cli("grad", path, "--grid", "x0=-1:1:3", "--grid", "x1=0:1:2", "-o", target)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "no temporary file is left"
    if suffix in (".npz", ".h5", ".hdf5"):
        table = read_columns(str(target))
        assert table["y"].shape == (3, 2), "grid results keep the grid's shape"
        assert list(table["grid_axes"]) == ["x0", "x1"]
        table = {k: np.ravel(v) for k, v in table.items() if k != "grid_axes"}
    elif suffix == ".json":
        rows = json.loads(target.read_text())
        table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in target.read_text().splitlines()]
        table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    else:
        table = read_csv(target.read_text(), "\t" if suffix == ".tsv" else ",")
    check_gradient(net, table, np.stack([table["x0"], table["x1"]], 1))


def test_npz_with_passthrough_and_without_grid(model_factory, cli, tmp_path):
    net, path = model_factory("tanh", 2, 1)
    data = tmp_path / "p.csv"
    data.write_text("id,x0,x1\nA,1,2\nB,3,4\n")
    target = tmp_path / "out.npz"
    result = cli("grad", path, "--csv", data, "-o", target)
    assert result.exit_code == 0, result.stderr
    table = read_columns(str(target))
    assert list(table["id"]) == ["A", "B"]
    assert "grid_axes" not in table
    check_gradient(net, table, [(1, 2), (3, 4)])


def test_floats_round_trip_in_text(model_factory, cli, tmp_path):
    """CSV values parse back to exactly the float32 values in the binary file."""
    net, path = model_factory("tanh", 2, 1)
    text = cli("grad", path, "--grid", "-1:1:9")
    cli("grad", path, "--grid", "-1:1:9", "-o", tmp_path / "o.npz")
    binary = read_columns(str(tmp_path / "o.npz"))
    table = read_csv(text.stdout)
    for name in ("y", "dy/dx0", "dy/dx1"):
        np.testing.assert_array_equal(table[name].astype(np.float32), binary[name].ravel())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_formatted_floats_are_shortest_and_round_trip(dtype):
    """Every float, subnormals and extremes included, reads back bit for bit, with no more digits than NumPy's repr."""
    from derivcli.writers import format_floats

    info = np.finfo(dtype)
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(info.minexp // 4, info.maxexp // 4, 2000),
        [0.0, -0.0, 0.1, 1 / 3, 3.0, 1e-5, 1e16, 12345678.0, info.max, -info.max, info.tiny, info.smallest_subnormal],
    ]).astype(dtype)
    values = np.concatenate([values, [np.nan, np.inf, -np.inf]]).astype(dtype)
    (cells,) = format_floats(values[:, None])
    back = np.array([float(c) for c in cells]).astype(dtype)
    np.testing.assert_array_equal(back.view(f"u{np.dtype(dtype).itemsize}"), values.view(f"u{np.dtype(dtype).itemsize}"))
    def digits(text):
        return text.split("e")[0].replace("-", "").replace(".", "").strip("0")

    assert all(len(digits(c)) <= len(digits(str(v))) for c, v in zip(cells[:-3], values))


def arrow_rows(block, delimiter=","):
    """The reference spelling: Arrow's formatter, cell by cell."""
    from derivcli.writers import format_floats

    return "".join(delimiter.join(row) + "\n" for row in zip(*format_floats(block))).encode()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bulk_rows_match_arrow_in_every_decade(dtype):
    """The orjson rows are Arrow's text byte for byte, from subnormals to 1e10; and they are used."""
    from derivcli.writers import ryu_rows

    info = np.finfo(dtype)
    rng = np.random.default_rng(1)
    decades = np.arange(int(np.log10(info.smallest_subnormal)), 10)
    mantissas = rng.uniform(1, 10, (len(decades), 300))
    rounded = np.round(mantissas * 100) / 100  # short digit strings, as in 2.5e-7 or 0.25
    values = (np.concatenate([mantissas, rounded], axis=1) * 10.0 ** decades[:, None]).ravel()
    values = np.concatenate([values, -values, [0.0, -0.0, 1.0, 1e-5, 9.999999e9]]).astype(dtype)
    values = values[np.isfinite(values)]
    band = (1e-6, 1e-5) if dtype == np.float64 else (0.0, 0.0)
    inside = (np.abs(values) < band[0]) | (np.abs(values) >= band[1])
    for block in (values[inside].reshape(-1, 1), values[inside][: len(values[inside]) // 3 * 3].reshape(-1, 3)):
        fast = ryu_rows(block, ",")
        assert fast is not None
        assert fast == arrow_rows(block)
    assert ryu_rows(values[inside][:, None], "\t") == arrow_rows(values[inside][:, None], "\t")


@pytest.mark.parametrize("awkward", [np.nan, np.inf, -np.inf, 1e10, -3.5e12, 2.5e-6])
def test_bulk_rows_leave_awkward_values_to_arrow(awkward):
    """NaN, Inf and the magnitudes where the two spellings part are refused, so Arrow writes them."""
    from derivcli.writers import ryu_rows

    block = np.array([[0.5, awkward], [1.0, 2.0]])
    assert ryu_rows(block, ",") is None
    assert ryu_rows(np.array([[0.5, 2.5e-6]], np.float32), ",") is not None  # float32 agrees there


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    width=st.sampled_from([32, 64]),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 5)),
)
def test_bulk_rows_match_arrow_on_random_floats(data, width, shape):
    """Any float array: either the bulk text equals Arrow's, or the bulk path declines."""
    from derivcli.writers import ryu_rows

    dtype = np.float32 if width == 32 else np.float64
    moderate = st.floats(-1e9, 1e9, width=width)  # arrays the bulk path takes, most of the time
    elements = data.draw(st.sampled_from([st.floats(width=width), moderate]))
    block = data.draw(hnp.arrays(dtype, shape, elements=elements))
    fast = ryu_rows(block, ",")
    if fast is not None:
        assert fast == arrow_rows(block)


def test_csv_writer_is_the_same_whichever_path_formats_a_batch(tmp_path):
    """Batches that take the bulk path and batches that fall back join into one seamless file."""
    from derivcli.writers import Layout, open_writer

    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((50, 3)) for _ in range(4)]
    batches[2][7, 1] = np.nan  # this batch falls back to Arrow
    layout = Layout(["x0"], [], ["y", "dy/dx0"], np.dtype(np.float32))
    for delimiter, suffix in ((",", "csv"), ("\t", "tsv")):
        writer = open_writer(suffix, layout, str(tmp_path / f"o.{suffix}"))
        for block in batches:
            writer.write(block[:, :1], [], block[:, 1:])
        writer.close()
        expected = delimiter.join(layout.header) + "\n"
        expected += b"".join(arrow_rows(block.astype(np.float32), delimiter) for block in batches).decode()
        assert (tmp_path / f"o.{suffix}").read_text() == expected


def test_csv_pass_through_cells_keep_their_text(model_factory, cli, tmp_path):
    """Plain cells take the bulk writer; a cell with a delimiter or quote is quoted as the csv module does."""
    _, path = model_factory("tanh", 2, 1)
    data = tmp_path / "p.csv"
    data.write_text("x0,x1,note\n1,2, spaced \n3,4,é\n")
    plain = read_csv(cli("grad", path, "--csv", data).stdout)
    assert plain["note"] == [" spaced ", "é"]
    data.write_text('x0,x1,note\n1,2,"a,b"\n3,4,"say ""hi"""\n')
    result = cli("grad", path, "--csv", data)
    assert result.stdout.splitlines()[1].split(",", 2)[2].startswith('"a,b",')
    assert read_csv(result.stdout)["note"] == ["a,b", 'say "hi"']


def test_timings_tell_start_up_from_streaming(model_factory, cli):
    """--timings: one stderr line with the first batch and the other points counted; stdout unchanged."""
    _, path = model_factory("tanh", 2, 1)
    plain = cli("grad", path, "--grid", "-1:1:5", "--grid", "x1=0:1:2", "--batch-size", "4")
    timed = cli("grad", path, "--grid", "-1:1:5", "--grid", "x1=0:1:2", "--batch-size", "4", "--timings")
    assert timed.exit_code == 0, timed.stderr
    assert timed.stdout == plain.stdout
    (line,) = timed.stderr.splitlines()
    assert line.startswith("derivcli: timings: model loaded in ")
    assert "first batch of 4 point(s) in " in line and "; the other 6 in " in line and line.endswith(" points/s)")
    assert "; engine: nested tapes; " in line  # a gradient: no Taylor series wanted


def test_unicode_line_separators_stay_inside_their_cells(model_factory, cli, tmp_path):
    """U+0085 and U+2028 are not line breaks in CSV: no row is split, dropped or renumbered."""
    _, path = model_factory("tanh", 2, 1)
    data = tmp_path / "p.csv"
    data.write_text("x0,x1,note\n0.5,1,a\u2028b\n1,2,c\x85d\n", encoding="utf-8")
    result = cli("grad", path, "--csv", data)
    assert result.exit_code == 0, result.stderr
    assert read_csv(result.stdout)["note"] == ["a\u2028b", "c\x85d"]
    data.write_text("x0,x1,note\n0,0,\n\x85,0,\n", encoding="utf-8")
    result = cli("grad", path, "--csv", data)
    assert result.exit_code == 1
    assert "row 3, column 'x0': '\\x85' is not a number" in result.stderr
