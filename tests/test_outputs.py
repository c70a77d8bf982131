"""An output never replaces an input or a special file, and keeps what it replaces' permissions."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading

import numpy as np
import pytest

from conftest import SAMPLES, derivcli_executable, read_csv
from test_errors import assert_one_line_error


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.h5"
    shutil.copy(SAMPLES / "shifted_square.h5", path)
    return path


def test_an_output_never_replaces_an_input(cli, tmp_path, model):
    points = tmp_path / "points.csv"
    points.write_text("x\n0.5\n")
    shutil.copytree(SAMPLES / "square_tanh_savedmodel", tmp_path / "saved")
    before = {path: path.read_bytes() for path in (model, points)}
    cases = [
        (("eval", model, "--at", "0.5", "-o", model), "is the model"),
        (("grad", model, "--csv", points, "-o", points), "is the --csv"),
        (("grad", tmp_path / "saved", "--at", "1", "-o", tmp_path / "saved" / "out.csv"), "is inside the model"),
        (("grad", tmp_path / "saved", "--at", "1", "-o", tmp_path / "saved" / "variables" / "out.csv"),
         "is inside the model"),
        (("grad", SAMPLES / "bump.keras", "--custom-objects", tmp_path / "layer.py", "--at", "0.3",
          "-o", tmp_path / "layer.py"), "is the --custom-objects"),
    ]
    shutil.copy(SAMPLES / "bump_layer.py", tmp_path / "layer.py")
    for arguments, message in cases:
        result = cli(*arguments)
        assert_one_line_error(result, 2, message, "write the output to another file")
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        p.name for p in (SAMPLES / "square_tanh_savedmodel").iterdir())
    shard = tmp_path / "part0.csv"
    assert cli("grad", model, "--grid", "0:1:4", "--shard", "0/1", "-o", shard).exit_code == 0
    kept = shard.read_bytes()
    assert_one_line_error(cli("merge", shard, "-o", shard), 2, "is the shard")
    assert shard.read_bytes() == kept


def test_a_replaced_file_keeps_its_permissions(cli, tmp_path, model):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    target.chmod(0o600)
    assert cli("grad", model, "--at", "0.5", "-o", target).exit_code == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert read_csv(target.read_text())["x"][0] == 0.5


def test_a_link_to_a_file_is_followed_not_replaced(cli, tmp_path, model):
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    assert cli("grad", model, "--at", "0.5", "-o", link).exit_code == 0
    assert link.is_symlink() and read_csv(real.read_text())["x"][0] == 0.5


@pytest.mark.parametrize("format_name", ["csv", "npz", "hdf5"])
def test_a_fifo_is_written_into_not_replaced(cli, tmp_path, model, format_name):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = {}

    def read() -> None:
        with open(fifo, "rb") as handle:
            received["bytes"] = handle.read()

    reader = threading.Thread(target=read)
    reader.start()
    result = cli("grad", model, "--at", "0.5", "-o", fifo, "--format", format_name)
    reader.join(timeout=60)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert received["bytes"][:4] == {"csv": b"x,y,", "npz": b"PK\x03\x04", "hdf5": b"\x89HDF"}[format_name]


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root (CI and the dev machines run as root)")
def test_devices_are_written_into_and_a_full_device_is_one_line(tmp_path, model):
    null, full = tmp_path / "null", tmp_path / "full"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    derivcli = derivcli_executable()
    for format_name in ("csv", "npz", "hdf5"):
        done = subprocess.run([derivcli, "grad", str(model), "--at", "0.5", "-o", str(null), "--format", format_name],
                              capture_output=True, timeout=120)
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        assert stat.S_ISCHR(null.stat().st_mode)
    done = subprocess.run([derivcli, "grad", str(model), "--grid", "0:1:100000", "-o", str(full), "--format", "csv"],
                          capture_output=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(full) in lines[0]
    assert stat.S_ISCHR(full.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


@pytest.mark.parametrize("arguments", [
    ("deriv", "--partial", "x0^1000000000"),
    ("deriv", "--partial", "x0^20,x1^13"),
    ("deriv", "--order", "1000000000"),
    ("deriv", "--direction", "1,1^99"),
    ("op", "--expr", "D(y, x0^1000)"),
])
def test_a_derivative_order_above_the_maximum_is_one_line_at_once(cli, arguments):
    command, *options = arguments
    result = cli(command, SAMPLES / "softplus_2d.keras", "--at", "1,2", *options)
    assert_one_line_error(result, 2, "is above the highest derivcli computes, 32")


def test_too_many_columns_is_a_usage_error():
    from derivcli.run import DerivativeRequest, plan

    class Wide:
        coordinate_names = [f"x{i}" for i in range(10)]
        output_names = ["y"]
        discrete_positions: dict[int, str] = {}
        index_outputs: set[int] = set()

    with pytest.raises(Exception, match="92,378 partial derivatives over 10 inputs"):
        plan(Wide(), DerivativeRequest(order=10))


def test_an_input_and_an_output_of_the_same_name_is_refused(cli):
    """`--names x,y` on a model whose output is y wrote x,y,y,...: the input coordinate was lost in JSON."""
    result = cli("grad", SAMPLES / "softplus_2d.keras", "--at", "1,2", "--names", "x,y")
    assert_one_line_error(result, 2, "'y' names both an input and a result column", "--output-names")
    assert cli("grad", SAMPLES / "softplus_2d.keras", "--at", "1,2", "--names", "x,y", "--output-names", "u",
               "--format", "json").exit_code == 0


def test_csv_without_line_breaks_or_with_huge_lines_is_one_line_in_bounded_memory(tmp_path):
    """`--csv /dev/zero` grew past 16 GB; a million columns took 7 GB; a big cell said `field larger than field limit`."""
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(1_000_000)) + "\n")
    big_cell = tmp_path / "cell.csv"
    big_cell.write_text("x0,x1,id\n1,2,\"" + "a" * 200_000 + "\"\n")
    long_row = tmp_path / "long.csv"
    long_row.write_text("x0,x1\n1,2\n" + "1" * 3_000_000 + "\n")
    cases = [("/dev/zero", "/dev/zero, row 1: a line longer than 1 MiB"), (wide, "row 1: a line longer than 1 MiB"),
             (big_cell, "row 2: a cell longer than 128 KiB"), (long_row, "row 3: a line longer than 1 MiB")]
    for source, message in cases:
        done = subprocess.run(["/usr/bin/time", "-f", "%M", derivcli_executable(), "grad",
                               str(SAMPLES / "softplus_2d.keras"), "--csv", str(source)],
                              capture_output=True, text=True, timeout=120)
        *lines, peak_kilobytes = [line for line in done.stderr.strip().splitlines()
                                  if not line.startswith("Command exited")]  # time's own line
        assert done.returncode == 1 and len(lines) == 1 and message in lines[0], done.stderr
        assert int(peak_kilobytes) < 2_000_000  # TensorFlow alone is about 0.5 GB


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.array([[1.0, {}]], dtype=object)}, "holds Python objects"),
    ({"x0": np.array([1 + 2j]), "x1": np.array([1.0])}, "holds complex numbers"),
    ({"x": np.array([["1", "2"]])}, "holds text"),
    ({"x": np.zeros(2, dtype=[("a", "f8"), ("b", "f8")])}, "holds records"),
])
def test_npz_arrays_that_are_not_real_numbers_are_refused(cli, tmp_path, arrays, message):
    """Complex values once lost their imaginary part silently; object arrays are never unpickled."""
    path = tmp_path / "points.npz"
    np.savez(path, **arrays)
    result = cli("grad", SAMPLES / "softplus_2d.keras", "--npz", path)
    assert_one_line_error(result, 1, message)
    assert "allow_pickle" not in result.stderr


@pytest.mark.parametrize(("arguments", "status", "message"), [
    (("--at", "1e308,1"), 1, "x0=1e+308 is beyond the largest float32 (3.403e+38); use --dtype float64"),
    (("--at", "1,2", "--batch-size", "²"), 2, "--batch-size '²': give a positive whole number"),
    (("--at", "1,2", "-o", "/proc/out.csv"), 1, "cannot create a file in '/proc'"),
])
def test_bad_values_that_once_slipped_through(cli, arguments, status, message):
    result = cli("grad", SAMPLES / "softplus_2d.keras", *arguments)
    assert_one_line_error(result, status, message)
    assert "Warning" not in result.stderr


@pytest.mark.parametrize(("redirect", "status", "message"), [
    ("2>&-", 0, None),
    (">&-", 1, "standard output is closed; write the output to a file with -o FILE"),
    ("<&-", 1, "--csv -: standard input is closed"),
])
def test_closed_standard_streams(redirect, status, message):
    """With 2>&- every command once exited 1 silently."""
    command = f"{derivcli_executable()} grad {SAMPLES / 'softplus_2d.keras'} " + (
        "--csv - " if "<" in redirect else "--at 1,2 ") + redirect
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    if message is None:
        assert done.stdout.splitlines()[0] == "x0,x1,y,dy/dx0,dy/dx1"
    else:
        assert done.stderr.strip() == f"derivcli: error: {message}" or message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("expression", "message"), [
    ("(" * 2000 + "x" + ")" * 2000, "longer than the 4,000 allowed"),
    ("+".join(["x"] * 1501), "nested more than 200 levels deep"),
    ("1" * 401 + "*x", "beyond the float range"),
    ("-" * 100_000 + "x", "longer than the 4,000 allowed"),
])
def test_expressions_beyond_the_limits_are_one_usage_line(cli, expression, message):
    """Once a RecursionError, an OverflowError, and "out of memory; lower --batch-size" with exit 1."""
    result = cli("op", SAMPLES / "square_tanh.keras", "--at", "0.5", "--expr", expression)
    assert_one_line_error(result, 2, message)


@pytest.mark.parametrize("suffix", [".csv", ".npz", ".h5"])
def test_a_file_size_limit_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, suffix):
    target = tmp_path / f"big{suffix}"
    command = f"ulimit -f 100; {derivcli_executable()} grad {SAMPLES / 'softplus_2d.keras'} --grid -1:1:1000 -o {target}"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"derivcli: error: -o {target}: cannot write: File too large (EFBIG)"]
    assert list(tmp_path.iterdir()) == []


def test_a_link_to_standard_output_is_written_through(tmp_path, model):
    """`-o /dev/stdout` (a link to /proc/self/fd/1) once replaced the link with a regular file."""
    link = tmp_path / "stdout.csv"
    link.symlink_to("/proc/self/fd/1")
    done = subprocess.run([derivcli_executable(), "grad", str(model), "--at", "0.5", "-o", str(link)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "x,y,dy/dx"
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"


@pytest.mark.parametrize(("options", "header"), [
    # every third-order partial, one of them named again first: one column each, in the order first asked
    (["--partial", "x0,x1^2", "--order", "3"],
     "x0,x1,y,d3y/dx0dx1^2,d3y/dx0^3,d3y/dx0^2dx1,d3y/dx1^3"),
    (["--partial", "x0", "--partial", "x0", "--partial", "x1,x0", "--partial", "x0,x1"],
     "x0,x1,y,dy/dx0,d2y/dx0dx1"),
    (["--partial", "x1", "--order", "1"], "x0,x1,y,dy/dx1,dy/dx0"),
])
def test_the_same_derivative_asked_twice_is_one_column(cli, options, header):
    once = cli("deriv", SAMPLES / "softplus_2d.keras", "--at", "1,2", "--format", "csv", "--dtype", "float64", *options)
    assert once.exit_code == 0, once.stderr
    lines = once.stdout.splitlines()
    assert lines[0] == header
    # each column holds the value of its own derivative, asked for alone
    for name, value in zip(header.split(","), lines[1].split(",")):
        if not name.startswith("d"):
            continue
        spec = ",".join(part for part in name.split("/")[1].split("d") if part)  # d3y/dx0dx1^2 -> x0,x1^2
        alone = cli("deriv", SAMPLES / "softplus_2d.keras", "--at", "1,2", "--format", "csv", "--dtype", "float64",
                    "--partial", spec)
        assert alone.stdout.splitlines()[0].split(",")[-1] == name
        np.testing.assert_allclose(float(alone.stdout.splitlines()[1].split(",")[-1]), float(value), rtol=1e-12)


@pytest.mark.parametrize("arguments", [
    ("op", "--expr", "y=x0"),
    ("op", "--expr", "x1=x0"),
    ("op", "--expr", "r=D(y, x0)", "--expr", "r=D(y, x1)"),
])
def test_a_column_name_used_twice_is_refused(cli, arguments):
    command, *options = arguments
    result = cli(command, SAMPLES / "softplus_2d.keras", "--at", "1,2", *options)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "twice" in result.stderr or "names both an input and a result column" in result.stderr
