"""Every bad input is one line on standard error with the right status, and leaves no file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_installed

SAMPLE = "sample_models/softplus_2d.keras"


def assert_one_line_error(result, status: int, *fragments: str) -> None:
    assert result.exit_code == status, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("derivcli: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "status", "fragments"),
    [
        (["--grid", "1:2"], 2, ["--grid '1:2'", "START:STOP:NUM"]),
        (["--grid", "a:b:c"], 2, ["'a' is not a number"]),
        (["--grid", "0:1:2.5"], 2, ["whole number"]),
        (["--grid", "0:1:0"], 2, ["at least 1"]),
        (["--grid", "0:1:1"], 2, ["pin the input with 0:0:1"]),
        (["--grid", "z=0:1:3"], 2, ["'z' is not an input", "x0, x1"]),
        (["--grid", "x0=0:1:3"], 2, ["no grid for x1"]),
        (["--grid", "0:1:100000", "--grid", "x1=0:1:100000000"], 2, ["more than"]),
        (["--grid", "x0=0:1:100000000000", "--grid", "x1=0:0:1"], 2, ["100,000,000,000 points is more than"]),
        (["--at", "1,2,3"], 2, ["3 value(s) for 2 input(s)"]),
        (["--at", "x0=1"], 2, ["no value for x1"]),
        (["--at", "x0=1,2"], 2, ["not a mix"]),
        (["--at", "1,nan"], 2, ["not a finite number"]),
        (["--at", "1,2", "--grid", "0:1:3"], 2, ["--at and --grid given together"]),
        ([], 2, ["no points"]),
        (["--at", "1,2", "-o", "out.xyz"], 2, ["cannot tell the format", ".xyz"]),
        (["--at", "1,2", "--format", "npz"], 2, ["-o FILE.npz"]),
        (["--at", "1,2", "--format", "xml"], 2, ["choose one of"]),
        (["--at", "1,2", "--dtype", "float16"], 2, ["--dtype"]),
        (["--at", "1,2", "--device", "tpu"], 2, ["--device"]),
        (["--at", "1,2", "--wrt", "q"], 2, ["'q' is not an input"]),
        (["--at", "1,2", "--outputs", "y7"], 2, ["'y7' is not an output"]),
        (["--at", "1,2", "--names", "a"], 2, ["1 name(s) for 2 input(s)"]),
        (["--at", "1,2", "--names", "a,a"], 2, ["named twice"]),
        (["--at", "1,2", "--bogus"], 2, ["No such option: --bogus"]),
        (["--at", "0.5", "1"], 2, ["--at 0.5 1: a point's values are separated by commas, not spaces: --at 0.5,1"]),
        (["--at", "0.5", "-1"], 2, ["--at 0.5,-1"]),
        (["--grid", "x1=0", "--grid", "x0=0:1:3"], 2, ["to hold x1 at 0, write --grid x1=0:0:1"]),
        (["--at", "1,2", "--batch-size", "0"], 2, ["--batch-size"]),
    ],
)
def test_usage_errors(cli, args, status, fragments):
    assert_one_line_error(cli("grad", SAMPLE, *args), status, *fragments)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("z", "'z' is not an input"), ("x0^0", "positive whole number"), ("x0,", "empty input name"),
     ("x0^a", "positive whole number"), ("1x", "not a valid name"),
     ("d2y/dx0^2", "is a column's name; --partial names the inputs to differentiate by: --partial x0^2"),
     ("d3y/dx0dx1^2", "--partial x0,x1^2"),
     ("x0x1", "did you mean x0,x1 (inputs separated by commas)?")],
)
def test_bad_partial_specs(cli, spec, fragment):
    assert_one_line_error(cli("deriv", SAMPLE, "--at", "1,2", "--partial", spec), 2, fragment)


def test_deriv_needs_a_spec(cli):
    assert_one_line_error(cli("deriv", SAMPLE, "--at", "1,2"), 2, "--partial", "--order")


def test_missing_model(cli, tmp_path):
    assert_one_line_error(cli("grad", tmp_path / "none.keras", "--at", "1"), 1, "no such file", ".keras")


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("truncated.keras", None, "corrupt or truncated"),
        ("random.h5", bytes(range(256)) * 8, "not a .keras (zip), HDF5 or SavedModel"),
        ("text.keras", b"hello", "not a .keras (zip), HDF5 or SavedModel"),
    ],
)
def test_corrupt_model_files(cli, tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content if content is not None else Path(SAMPLE).read_bytes()[:3000])
    assert_one_line_error(cli("grad", path, "--at", "1"), 1, fragment)


def test_h5_without_model_config(cli, tmp_path):
    import h5py

    path = tmp_path / "weights_only.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("w", data=np.ones(3))
    assert_one_line_error(cli("grad", path, "--at", "1"), 1, "cannot load")


def test_directory_that_is_not_a_saved_model(cli, tmp_path):
    assert_one_line_error(cli("grad", tmp_path, "--at", "1"), 1, "no saved_model.pb")


def test_saved_model_without_variables(cli, model_factory, tmp_path):
    import shutil

    _, path = model_factory("tanh", 2, 1, "export")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "variables")
    assert_one_line_error(cli("grad", broken, "--at", "1,2"), 1, "no variables folder")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "is empty: expected a header row"),
        ("a,x1\n1,2\n", "no column 'x0'"),
        ("x0,x1\n1,2\n3,abc\n", "row 3, column 'x1': 'abc' is not a number"),
        ("x0,x1\n1,2\n3\n", "row 3: 1 field(s), the header has 2"),
        ('x0,x1\n1,"2\n', "row"),
    ],
    ids=["empty", "missing-column", "non-numeric", "short-row", "open-quote"],
)
def test_bad_csv(cli, tmp_path, text, fragment):
    path = tmp_path / "points.csv"
    path.write_text(text)
    target = tmp_path / "out.csv"
    result = cli("grad", SAMPLE, "--csv", path, "-o", target)
    assert_one_line_error(result, 1, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["points.csv"], "no output or temporary file left"


def test_bad_csv_first_batch_leaves_stdout_empty(cli):
    result = cli("grad", SAMPLE, "--csv", "-", input="x0,x1\n1,oops\n")
    assert_one_line_error(result, 1, "standard input, row 2, column 'x1'")
    assert result.stdout == ""


def test_header_only_csv_gives_header_only(cli):
    result = cli("grad", SAMPLE, "--csv", "-", input="x0,x1\n")
    assert result.exit_code == 0
    assert result.stdout == "x0,x1,y,dy/dx0,dy/dx1\n"


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [({"a": np.ones(3)}, "array 'a' has shape (3,); input 'x' takes (N, 2) for N points, or (2,) for one"),
     ({"a": np.ones(3), "b": np.ones(3)}, "no arrays named x0, x1 and no array 'x' (arrays: a, b)"),
     ({"x": np.ones((3, 3))}, "array 'x' has shape (3, 3); input 'x' takes (N, 2)"),
     ({"x0": np.ones(3), "x1": np.ones(4)}, "different lengths")],
)
def test_bad_npz(cli, tmp_path, arrays, fragment):
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    assert_one_line_error(cli("grad", SAMPLE, "--npz", path), 1, fragment)


def test_unwritable_output_paths(cli, tmp_path):
    assert_one_line_error(cli("grad", SAMPLE, "--at", "1,2", "-o", tmp_path / "no" / "o.csv"), 1, "does not exist")
    assert_one_line_error(cli("grad", SAMPLE, "--at", "1,2", "-o", tmp_path, "--format", "csv"), 1, "is a directory")


def test_failed_run_keeps_the_previous_file(cli, tmp_path):
    """An existing output is replaced only by a complete new one."""
    target = tmp_path / "out.csv"
    target.write_text("precious\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("x0,x1\n" + "1,2\n" * 10 + "1,x\n")
    result = cli("grad", SAMPLE, "--csv", bad, "-o", target, "--batch-size", "4")
    assert result.exit_code == 1
    assert target.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "out.csv"]


def test_unknown_custom_class_names_it_and_the_option():
    # In a fresh process: an earlier test in this one registered the class with Keras.
    result = run_installed("grad", "sample_models/bump.keras", "--at", "0.3")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "derivcli: error: cannot load sample_models/bump.keras: unknown class 'Bump'; "
        "pass the Python file that defines it with --custom-objects FILE.py\n"
    )


def test_custom_objects_file_errors(cli, tmp_path):
    assert_one_line_error(
        cli("grad", "sample_models/bump.keras", "--custom-objects", tmp_path / "none.py", "--at", "0.3"), 1, "no such file"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert_one_line_error(
        cli("grad", "sample_models/bump.keras", "--custom-objects", broken, "--at", "0.3"), 1, "RuntimeError: boom"
    )


def test_gpu_without_gpu_is_a_clear_error(cli):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert_one_line_error(cli("grad", SAMPLE, "--at", "1,2", "--device", "gpu"), 1, "sees no GPU")


def test_traceback_option_shows_the_traceback(cli, tmp_path):
    result = cli("grad", tmp_path / "none.keras", "--at", "0.3", "--traceback")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("derivcli: error: cannot load")
