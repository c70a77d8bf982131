"""`derivcli doctor`: each finding on a model that has it and on one that does not."""

from __future__ import annotations

import json

import pytest
from test_custom_layers import MIXING_LAYER

from conftest import save_custom_model

BUMP = ["--custom-objects", "sample_models/bump_layer.py"]

NAN_LAYERS = """
import keras


class Log(keras.layers.Layer):
    def call(self, x):
        return keras.ops.log(x)


class Sqrt(keras.layers.Layer):
    def call(self, x):
        return keras.ops.sqrt(x)
"""


def doctor_json(cli, *args):
    result = cli("doctor", *args, "--format", "json")
    findings = {f["check"]: f for f in json.loads(result.stdout)["findings"]}
    return result, findings


def test_smoothness_findings(cli):
    result, relu = doctor_json(cli, "sample_models/square_relu.keras")
    assert result.exit_code == 0
    assert relu["smoothness"]["severity"] == "warning"
    assert "confirmed: every second derivative is 0 at all points" in relu["smoothness"]["message"]
    _, tanh = doctor_json(cli, "sample_models/square_tanh.keras")
    assert tanh["smoothness"]["severity"] == "ok"


def test_disconnected_weight_is_named_with_its_reason(cli):
    result, buggy = doctor_json(cli, "sample_models/bump_condition_only.keras", *BUMP)
    assert result.exit_code == 3
    assert buggy["weights"]["severity"] == "error"
    assert buggy["weights"]["message"].startswith("layer bump, weight sigma: receives no gradient")
    assert "used only in a comparison" in buggy["weights"]["message"]
    # The error line names the failed checks; the finding itself is said once, on standard output.
    assert result.stderr.strip() == "derivcli: error: doctor found 1 error(s) (weights); each finding is on standard output"
    result, good = doctor_json(cli, "sample_models/bump.keras", *BUMP)
    assert result.exit_code == 0
    assert good["weights"]["severity"] == "ok"


def test_nan_in_a_value_names_the_layer(cli, tmp_path):
    path, source = save_custom_model(tmp_path, NAN_LAYERS, "Log", dense_first=True)
    result, found = doctor_json(cli, path, "--custom-objects", source, "--at", "0.5", "--at", "-2")
    assert result.exit_code == 3
    message = found["nan"]["message"]
    assert "first at x=-2" in message and "value of layer log" in message
    _, fine = doctor_json(cli, path, "--custom-objects", source, "--at", "0.5")
    assert fine["nan"]["severity"] == "ok"


def test_nan_in_a_derivative_names_the_layer(cli, tmp_path):
    path, source = save_custom_model(tmp_path, NAN_LAYERS, "Sqrt", dense_first=True)
    result, found = doctor_json(cli, path, "--custom-objects", source, "--at", "0", "--at", "1")
    assert result.exit_code == 3
    assert "derivative of layer sqrt" in found["nan"]["message"]


def test_batch_dependence_finding(cli, tmp_path):
    path, source = save_custom_model(tmp_path, MIXING_LAYER, "SquareMinusBatchMean")
    result, found = doctor_json(cli, path, "--custom-objects", source)
    assert result.exit_code == 3
    assert found["batch"]["severity"] == "error" and "--batch-size 1" in found["batch"]["message"]
    _, fine = doctor_json(cli, "sample_models/softplus_2d.keras")
    assert fine["batch"]["severity"] == "ok"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_dependence_is_caught_in_both_dtypes_and_round_off_is_not_taken_for_it(cli, tmp_path, dtype):
    """Weights of +-1000 cancel to 6e-4 relative in float32: once refused as "a layer mixes samples"."""
    import keras
    import numpy as np

    inputs = keras.Input((1,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(2, activation="tanh")(inputs)))
    model.set_weights([np.array([[1.0, 1.0001]], "float32"), np.zeros(2, "float32"),
                       np.array([[1000.0], [-1000.0]], "float32"), np.zeros(1, "float32")])
    model.save(tmp_path / "cancel.keras")
    grad = cli("grad", tmp_path / "cancel.keras", "--grid", "-1.5:1.5:9", "--dtype", dtype)
    assert grad.exit_code == 0, grad.stderr
    _, found = doctor_json(cli, tmp_path / "cancel.keras", "--grid", "-1.5:1.5:9")
    assert found["batch"]["severity"] == "ok"
    path, source = save_custom_model(tmp_path, MIXING_LAYER, "SquareMinusBatchMean")
    mixing = cli("grad", path, "--custom-objects", source, "--grid", "-1:1:5", "--dtype", dtype)
    assert mixing.exit_code == 1 and "a layer mixes samples" in mixing.stderr and "--batch-size 1" in mixing.stderr
    assert cli("grad", path, "--custom-objects", source, "--grid", "-1:1:5", "--dtype", dtype,
               "--batch-size", "1").exit_code == 0


def test_float32_risk_under_cancellation(cli, tmp_path):
    """Two nearly equal tanh units with large opposite weights: float32 loses 4 digits."""
    import keras
    import numpy as np

    inputs = keras.Input((1,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(2, activation="tanh")(inputs)))
    model.set_weights([np.array([[1.0, 1.0001]], "float32"), np.zeros(2, "float32"),
                       np.array([[1000.0], [-1000.0]], "float32"), np.zeros(1, "float32")])
    path = tmp_path / "cancel.keras"
    model.save(path)
    result, risky = doctor_json(cli, path, "--order", "2", "--grid", "-1.5:1.5:9")
    assert result.exit_code == 0
    assert risky["float32"]["severity"] == "warning"
    assert "d2y/dx^2" in risky["float32"]["message"] and "--dtype float64" in risky["float32"]["message"]
    _, safe = doctor_json(cli, "sample_models/square_tanh.keras", "--order", "4", "--grid", "-1.5:1.5:9")
    assert safe["float32"]["severity"] == "ok"


@pytest.mark.parametrize("model", ["sample_models/square_tanh_savedmodel"])
def test_text_report_one_finding_per_line(cli, model):
    result = cli("doctor", model)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"derivcli doctor {model}: 32 random points")
    assert [line.split()[1] for line in lines[1:]] == ["smoothness", "weights", "nan", "batch", "float32"]
    assert all(line.split()[0] in ("ok", "info", "warning", "error") for line in lines[1:])
