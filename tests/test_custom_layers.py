"""Custom classes with --custom-objects, Lambda layers with --unsafe, and `info`."""

from __future__ import annotations

import json

import numpy as np

from conftest import read_csv, save_custom_model
from test_errors import assert_one_line_error


def test_bump_layer_gradient_matches_closed_form(cli):
    points = [0.3, -0.6, 0.95, 1.5]
    args = [a for p in points for a in ("--at", str(p))]
    result = cli("deriv", "sample_models/bump.keras", "--custom-objects", "sample_models/bump_layer.py",
                 *args, "--partial", "x", "--partial", "x^2", "--dtype", "float64")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    x = np.array(points)
    inside = np.abs(x) < 1
    gap = np.where(inside, 1 - x**2, 1.0)
    y = np.where(inside, np.exp(-1 / gap), 0.0)
    # y = exp(-1/(1-x^2)): y' = y g' with g = -1/(1-x^2), g' = -2x/(1-x^2)^2, g'' = -(2+6x^2)/(1-x^2)^3
    first = np.where(inside, y * (-2 * x / gap**2), 0.0)
    second = np.where(inside, y * ((2 * x / gap**2) ** 2 - (2 + 6 * x**2) / gap**3), 0.0)
    np.testing.assert_allclose(table["y"], y, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(table["dy/dx"], first, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(table["d2y/dx^2"], second, rtol=1e-10, atol=1e-300)


def lambda_model(tmp_path):
    import keras

    inputs = keras.Input((1,), name="x")
    outputs = keras.layers.Lambda(lambda t: t * t * t)(inputs)
    path = tmp_path / "cube.keras"
    keras.Model(inputs, outputs).save(path)
    return path


def test_lambda_needs_unsafe(cli, tmp_path):
    path = lambda_model(tmp_path)
    assert_one_line_error(cli("grad", path, "--at", "2"), 1, "Lambda", "--unsafe")
    result = cli("deriv", path, "--at", "2", "--partial", "x", "--partial", "x^2", "--partial", "x^3", "--unsafe")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[1] == "2,8,12,12,6"  # x^3 and its exact derivatives at 2


def test_info_reports_inputs_layers_and_relu_verdict(cli):
    result = cli("info", "sample_models/square_relu.keras", "--format", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["inputs"][0]["coordinates"] == ["x"]
    assert info["outputs"][0]["columns"] == ["y"]
    assert [layer["activation"] for layer in info["layers"] if layer["class"] == "Dense"] == ["relu", "relu", "linear"]
    assert info["parameters"] == 2 * 16 + 17 * 16 + 17
    assert info["smoothness"]["zero_from_order"] == 2
    assert info["smoothness"]["piecewise_linear_layers"] == ["hidden1", "hidden2"]
    table = cli("info", "sample_models/square_relu.keras")
    assert "order 2 and higher are zero almost everywhere" in table.stdout


def test_info_smooth_verdicts(cli):
    for path in ("sample_models/square_tanh.keras", "sample_models/square_tanh_savedmodel", "sample_models/softplus_2d.keras"):
        info = json.loads(cli("info", path, "-f", "json").stdout)
        assert info["smoothness"]["zero_from_order"] is None, path
        assert info["smoothness"]["reason"].startswith("smooth"), path
    bump = json.loads(cli("info", "sample_models/bump.keras", "--custom-objects", "sample_models/bump_layer.py", "-f", "json").stdout)
    assert bump["smoothness"]["zero_from_order"] is None
    assert "bump" in bump["smoothness"]["smooth_layers"]


MIXING_LAYER = """
import keras


class SquareMinusBatchMean(keras.layers.Layer):
    def call(self, x):
        return x * x - keras.ops.mean(x, axis=0)
"""


def test_a_model_that_mixes_samples_is_refused_not_silently_wrong(cli, tmp_path):
    path, source = save_custom_model(tmp_path, MIXING_LAYER, "SquareMinusBatchMean")
    result = cli("grad", path, "--grid", "0:1:5", "--custom-objects", source)
    assert_one_line_error(result, 1, "changes with the other points of its batch", "--batch-size 1")
    # One point per batch: the model is applied to each point alone, y = x^2 - x, y' = 2x - 1.
    alone = cli("grad", path, "--grid", "0:1:5", "--custom-objects", source, "--batch-size", "1")
    assert alone.exit_code == 0, alone.stderr
    np.testing.assert_allclose(read_csv(alone.stdout)["dy/dx"], 2 * np.linspace(0, 1, 5) - 1, atol=1e-6)
