"""`derivcli check`: automatic derivatives against float64 finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from derivcli.finite_differences import central_stencil, finite_difference

from conftest import read_csv, save_custom_model
from test_errors import assert_one_line_error


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_stencils_differentiate_monomials_exactly(order):
    """The order-k stencil maps x^k to k! and every lower power to 0 (at x = 0, step 1)."""
    offsets, weights = central_stencil(order)
    for power in range(order + 1):
        expected = float(np.prod(np.arange(1, order + 1))) if power == order else 0.0
        np.testing.assert_allclose(np.dot(weights, np.array(offsets, float) ** power), expected, atol=1e-9)


def test_finite_difference_of_a_known_function():
    """d3/dx dy^2 of sin(x) exp(y) = cos(x) exp(y), to the stated error estimate."""
    function = lambda p: (np.sin(p[:, 0]) * np.exp(p[:, 1]))[:, None]  # noqa: E731
    points = np.array([[0.3, -0.2], [1.1, 0.4]])
    estimate = finite_difference(function, points, (1, 2), 0)
    exact = np.cos(points[:, 0]) * np.exp(points[:, 1])
    assert np.all(np.abs(estimate.value - exact) <= estimate.error + 1e-9)
    np.testing.assert_allclose(estimate.value, exact, rtol=1e-7)


@pytest.mark.parametrize(
    "model", ["sample_models/softplus_2d.keras", "sample_models/square_tanh.keras", "sample_models/heat_pinn.keras",
              "sample_models/square_tanh_savedmodel"],
)
def test_check_passes_on_the_smooth_samples(cli, model):
    result = cli("check", model, "--grid", "-1:1:7")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert set(table["status"]) == {"ok"}
    assert list(table) == ["column", "status", "points", "kink_points", "max_abs_error", "max_rel_error",
                           "fd_error_estimate", "tolerance"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_verdict_follows_from_the_printed_numbers(cli, dtype):
    """A SavedModel's finite differences come from its graph widened to float64: before, they were taken
    in float32, estimated their own error at 0.13 and still failed d2y/dx^2 at 0.03."""
    result = cli("check", "sample_models/square_tanh_savedmodel", "--grid", "-1:1:7", "--order", "2",
                 "--partial", "x^3", *(["--dtype", dtype] if dtype == "float64" else []))
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    for status, error, tolerance, estimate in zip(table["status"], table["max_abs_error"], table["tolerance"],
                                                  table["fd_error_estimate"]):
        assert (status == "ok") == (float(error) <= float(tolerance))
        assert float(estimate) < 1e-6  # float64 differences: their own error is far below the float32 errors
    rerun = cli("check", "sample_models/square_tanh_savedmodel", "--grid", "-1:1:7", "--rtol", "1e-12", "--atol", "0")
    table = read_csv(rerun.stdout)
    for status, error, tolerance in zip(table["status"], table["max_abs_error"], table["tolerance"]):
        assert (status == "ok") == (float(error) <= float(tolerance))
    assert rerun.exit_code == 3 and "FAIL" in table["status"]


def test_check_s_table_shows_three_digits_and_its_csv_every_one(cli):
    args = ["check", "sample_models/softplus_2d.keras", "--grid", "-1:1:5"]
    table = cli(*args, "--format", "table")
    assert table.exit_code == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    for row in rows:
        for cell in row[4:7]:  # the errors: 2.34e-08, three significant digits; the tolerance in full
            assert len(cell.replace("-", "").split("e")[0].replace(".", "").lstrip("0")) <= 3, cell
    full = read_csv(cli(*args, "--format", "csv").stdout)
    assert any(len(str(value)) > 12 for value in full["max_abs_error"])  # csv keeps every digit
    assert [float(row[7]) for row in rows] == list(full["tolerance"])  # every digit: the same float
    for row, error in zip(rows, full["max_abs_error"]):
        assert float(row[4]) == pytest.approx(error, rel=5e-3)


def test_check_high_order_in_float64(cli):
    result = cli("check", "sample_models/square_tanh.keras", "--grid", "-1:1:5", "--partial", "x^4", "--dtype", "float64")
    assert result.exit_code == 0, result.stderr
    # A fourth finite difference is good to about 1e-6 in float64; the automatic one is exact.
    assert read_csv(result.stdout)["max_rel_error"][0] < 1e-5


def test_check_reports_kinks_on_a_relu_model_instead_of_failing(cli):
    import keras

    model = keras.models.load_model("sample_models/square_relu.keras")
    kernel, bias = model.get_layer("hidden1").get_weights()
    kinks = -bias / kernel[0]
    kink = float(kinks[np.argmin(np.abs(kinks))])
    result = cli("check", "sample_models/square_relu.keras", "--at", repr(kink), "--at", "0.123456")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    np.testing.assert_array_equal(table["kink_points"], [1, 1])
    np.testing.assert_array_equal(table["points"], [1, 1])
    assert "have a kink within the finite-difference step, not compared (first at x=" in result.stderr


WRONG_GRADIENT = """
import keras
import tensorflow as tf


@tf.custom_gradient
def cube(x):
    return x ** 3, lambda upstream: upstream * 2.0 * x ** 2  # wrong: should be 3 x^2


class WrongCube(keras.layers.Layer):
    def call(self, x):
        return cube(x)
"""


def test_a_custom_gradient_does_not_change_the_derivative(cli, tmp_path):
    """The layer's training gradient of x^3 is 2x^2; derivcli differentiates the function: 3x^2, 6x."""
    path, source = save_custom_model(tmp_path, WRONG_GRADIENT, "WrongCube")
    result = cli("check", path, "--at", "0.5", "--at", "1.5", "--order", "2", "--partial", "x", "--custom-objects", source)
    assert result.exit_code == 0, result.stderr
    assert read_csv(result.stdout)["status"] == ["ok", "ok"]
    table = read_csv(cli("deriv", path, "--at", "0.5", "--at", "1.5", "--partial", "x", "--partial", "x^2",
                         "--custom-objects", source, "--dtype", "float64").stdout)
    np.testing.assert_allclose(np.array(table["dy/dx"], float), [0.75, 6.75], rtol=1e-15)
    np.testing.assert_allclose(np.array(table["d2y/dx^2"], float), [3.0, 9.0], rtol=1e-15)


def test_check_fails_on_a_wrong_derivative(cli):
    """Below the float32 round-off, the check fails, names the column and the point, and exits 3."""
    result = cli("check", "sample_models/softplus_2d.keras", "--at", "0.5,1", "--partial", "x0^2", "--rtol", "1e-14",
                 "--atol", "0")
    assert_one_line_error(result, 3, "1 column(s) differ from finite differences", "d2y/dx0^2", "x0=0.5")
    assert read_csv(result.stdout)["status"] == ["FAIL"]


@pytest.fixture(scope="module")
def saturated_tanh(tmp_path_factory):
    """y = tanh(x + 18): at x = 0, dy/dx = 1 - tanh(18)^2 = 9.3e-16, below what float64 differences resolve."""
    import keras

    inputs = keras.Input((1,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(1, activation="tanh", name="out")(inputs))
    model.set_weights([np.ones((1, 1), "float32"), np.full(1, 18.0, "float32")])
    path = tmp_path_factory.mktemp("saturated") / "saturated.keras"
    model.save(path)
    return str(path)


def test_a_column_the_differences_cannot_resolve_is_unresolved_never_ok(cli, saturated_tanh):
    """On main at 755183a this column was `ok` with max_rel_error 1 and the tolerance printed `1.e-06`: any value
    of its size would have passed. Now it is `unresolved`, with the reason, and --strict fails it."""
    result = cli("check", saturated_tanh, "--at", "0", "--partial", "x")
    assert result.exit_code == 0, result.stderr
    row = read_csv(result.stdout)
    assert row["status"] == ["unresolved"]
    assert float(row["fd_error_estimate"][0]) >= abs(1 - np.tanh(18.0) ** 2)
    assert "dy/dx: unresolved: the finite differences' error estimate" in result.stderr
    assert "--strict makes this fail" in result.stderr
    strict = cli("check", saturated_tanh, "--at", "0", "--partial", "x", "--strict")
    assert_one_line_error(strict, 3, "1 column(s) unresolved (--strict)", "dy/dx")
    # Where the derivative is 1, the same model's column is resolved and ok.
    resolved = cli("check", saturated_tanh, "--at", "-18", "--partial", "x")
    assert read_csv(resolved.stdout)["status"] == ["ok"], resolved.stderr


def test_the_default_tolerance_follows_the_column_and_prints_in_full(cli):
    """The tolerance is rtol * scale + the difference's error estimate (atol 0), and the table prints it whole."""
    csv = read_csv(cli("check", "sample_models/softplus_2d.keras", "--at", "0.5,1", "--partial", "x0").stdout)
    scale_bound = 1e-4 * 10 + float(csv["fd_error_estimate"][0])  # |dy/dx0| < 10 on this net
    assert 0 < float(csv["tolerance"][0]) < scale_bound
    args = ["check", "sample_models/softplus_2d.keras", "--at", "0.5,1", "--at", "0,0", "--partial", "x0"]
    table = cli(*args, "--format", "table").stdout.split()
    assert float(table[-1]) == read_csv(cli(*args).stdout)["tolerance"][0]  # every digit; the errors show three
    assert len(table[-1]) > 12 and len(table[-3]) <= 8
