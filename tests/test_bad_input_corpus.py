"""A corpus of bad inputs through the installed command: status, one-line message, no file left."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT, run_installed

pytestmark = pytest.mark.slow
SAMPLE = str(ROOT / "sample_models" / "softplus_2d.keras")


def make_corpus(folder):
    """(name, arguments, status, fragment) for every bad input, built in `folder`."""
    import h5py
    import keras

    (folder / "truncated.keras").write_bytes((ROOT / "sample_models" / "softplus_2d.keras").read_bytes()[:2000])
    (folder / "random.h5").write_bytes(bytes(range(256)) * 16)
    with h5py.File(folder / "no_config.h5", "w") as handle:
        handle.create_group("model_weights")
    broken = folder / "no_variables"
    shutil.copytree(ROOT / "sample_models" / "square_tanh_savedmodel", broken)
    shutil.rmtree(broken / "variables")
    inputs = keras.Input((1,), name="x")
    keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs)).save(folder / "lambda.keras")
    (folder / "bad.csv").write_text("x0,x1\n1,2\n3,four\n")
    return [
        ("truncated-keras", [folder / "truncated.keras", "--at", "1"], 1, "corrupt or truncated"),
        ("random-bytes-h5", [folder / "random.h5", "--at", "1"], 1, "not a .keras (zip), HDF5 or SavedModel"),
        ("h5-without-model-config", [folder / "no_config.h5", "--at", "1"], 1, "cannot load"),
        ("savedmodel-without-variables", [broken, "--at", "1"], 1, "no variables folder"),
        ("lambda-without-unsafe", [folder / "lambda.keras", "--at", "1"], 1, "--unsafe"),
        ("missing-model", [folder / "none.keras", "--at", "1"], 1, "no such file"),
        ("non-numeric-csv-cell", [SAMPLE, "--csv", folder / "bad.csv"], 1, "row 3, column 'x1'"),
        ("bad-grid", [SAMPLE, "--grid", "0:1"], 2, "START:STOP:NUM"),
        ("hostile-expression", [SAMPLE, "--at", "1,2", "--expr", "y.__class__"], 2, "attribute access"),
    ]


def test_every_bad_input_is_one_line_and_leaves_no_file(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, arguments, status, fragment in make_corpus(inputs):
        output = tmp_path / "out"
        output.mkdir()
        command = "op" if "--expr" in arguments else "grad"
        result = run_installed(command, *map(str, arguments), "-o", str(output / "result.csv"))
        stderr = result.stderr.decode()
        assert result.returncode == status, (name, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("derivcli: error: "), (name, stderr)
        assert fragment in stderr, (name, stderr)
        assert "Traceback" not in stderr, name
        assert list(output.iterdir()) == [], f"{name} left {list(output.iterdir())}"
        shutil.rmtree(output)
