"""Numbers right on every model: SavedModel inputs, the Keras backend, NaN, every Keras activation."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from derivcli.models import load_model
from derivcli.run import DerivativeRequest

from conftest import read_csv
from zoo import ZOO, reference_derivative

DERIVCLI = [sys.executable, "-m", "derivcli"]


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """The zoo's model with inputs named x and t (model order x, t), as .keras and exported SavedModel."""
    entry = next(e for e in ZOO if e.name == "two_inputs")
    model = entry.build()
    folder = tmp_path_factory.mktemp("two_inputs")
    model.save(folder / "model.keras")
    model.export(folder / "exported", verbose=False)
    return entry, model.get_weights(), folder


@pytest.mark.parametrize("engine", ["tape", "taylor"])
def test_two_named_inputs_as_an_exported_savedmodel(two_inputs, engine):
    """A SavedModel keeps no input order: derivcli takes the signature's names sorted (t, x), documented."""
    entry, weights, folder = two_inputs
    keras_model = load_model(str(folder / "model.keras"), dtype="float64")
    saved_model = load_model(str(folder / "exported"), dtype="float64")
    assert keras_model.coordinate_names == ["x", "t"] and saved_model.coordinate_names == ["t", "x"]
    point = {"x": 0.674, "t": 0.646}
    request = DerivativeRequest(hessian=True, jacobian=True, partials=[{"x": 3, "t": 1}], laplacian=True)
    from derivcli.run import make_kernel, plan

    planned = plan(saved_model, request)
    kernel = make_kernel(saved_model, planned, engine=engine)
    values = kernel(np.array([[point["t"], point["x"]]]))[0]
    for (name, column), value in zip(zip(planned.names, planned.columns), values):
        by_name = dict(zip(saved_model.coordinate_names, column.partial))
        index = (by_name.get("x", 0), by_name.get("t", 0))
        if column.laplacian_over is not None:
            expected = sum(reference_derivative(entry, weights, (point["x"], point["t"]), 0, i) for i in ((2, 0), (0, 2)))
        else:
            expected = reference_derivative(entry, weights, (point["x"], point["t"]), 0, index)
        np.testing.assert_allclose(value, expected, rtol=1e-11, atol=1e-12, err_msg=name)


def test_savedmodel_input_order_is_the_same_in_every_process(two_inputs):
    """The signature's dict order changed between processes, even with a fixed PYTHONHASHSEED."""
    _, _, folder = two_inputs
    command = [*DERIVCLI, "eval", str(folder / "exported"), "--at", "0.674,0.646"]

    def run(seed: int) -> str:
        environment = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(run, [0, 1, 2, 3, 17, 123456]))
    assert len(set(outputs)) == 1
    assert outputs[0].splitlines()[0].startswith("t,x,")


def test_keras_backend_in_the_environment_is_overridden():
    environment = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([*DERIVCLI, "grad", "sample_models/square_tanh.keras", "--at", "0.5"],
                          capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "x,y,dy/dx"


@pytest.mark.parametrize("engine", ["tape", "taylor"])
def test_nan_never_becomes_a_confident_zero(cli, tmp_path, engine):
    """A ReLU net whose weights went NaN: dy/dx is NaN, so d2y/dx^2 is NaN too, not 0."""
    import keras

    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(3, activation="relu")(inputs)))
    weights = model.get_weights()
    weights[0][0, 1] = np.nan
    model.set_weights(weights)
    model.save(tmp_path / "nan.keras")
    result = cli("deriv", tmp_path / "nan.keras", "--grid", "-1:1:3", "--partial", "x", "--partial", "x^2",
                 "--partial", "x^3", "--engine", engine)
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    for column in ("y", "dy/dx", "d2y/dx^2", "d3y/dx^3"):
        assert np.isnan(table[column]).all(), column
    assert "are 0 wherever the lower orders are finite" in result.stderr


KERAS_ACTIVATIONS = [
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu", "hard_tanh", "leaky_relu",
    "linear", "log_sigmoid", "log_softmax", "mish", "relu", "relu6", "selu", "sigmoid", "silu", "soft_shrink",
    "softmax", "softplus", "softsign", "sparse_plus", "sparse_sigmoid", "sparsemax", "squareplus", "tanh",
    "tanh_shrink",
]
# Aliases (swish, hard_swish), and activations that need arguments beyond the tensor (glu's axis
# halves the features; threshold's threshold and default value): not usable as `activation=`.
NOT_AN_ACTIVATION_STRING = {"get", "serialize", "deserialize", "swish", "hard_swish", "glu", "threshold"}


def test_the_list_holds_every_activation_keras_ships():
    import keras

    shipped = {name for name in dir(keras.activations) if not name.startswith("_")}
    assert shipped - NOT_AN_ACTIVATION_STRING == set(KERAS_ACTIVATIONS)


@pytest.mark.parametrize("activation", KERAS_ACTIVATIONS)
def test_every_keras_activation_gives_every_order_in_both_engines(activation, tmp_path):
    """Orders 1 to 4 by nested tapes and by Taylor series (which cover every one of them), in float64,
    against float64 finite differences of the model's values (`derivcli check`'s estimator)."""
    import keras

    from derivcli.finite_differences import finite_difference
    from derivcli.run import forward_function

    keras.utils.set_random_seed(3)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(3, activation=activation)(inputs)))
    model.save(tmp_path / "model.keras")
    loaded = load_model(str(tmp_path / "model.keras"), dtype="float64")
    # Away from kinks: points where no hidden unit's input is within 0.1 of a breakpoint (0, +-0.5, +-1, +-3, +-6).
    points = np.array([[0.37, -0.21], [-0.44, 0.52]])
    partials = [{"x0": 1}, {"x0": 2}, {"x0": 1, "x1": 1}, {"x0": 3}, {"x0": 2, "x1": 2}]
    request = DerivativeRequest(partials=partials)
    forward = forward_function(loaded)
    for engine in ("tape", "taylor"):
        from derivcli.run import make_kernel, plan

        planned = plan(loaded, request)
        values = make_kernel(loaded, planned, engine=engine)(points)
        for j, index in enumerate([(1, 0), (2, 0), (1, 1), (3, 0), (2, 2)], start=1):
            estimate = finite_difference(forward, points, index, 0)
            allowed = 10 * estimate.error + 1e-7 * (1 + np.abs(estimate.value))
            assert np.all(np.abs(values[:, j] - estimate.value) <= allowed), (
                activation, engine, index, values[:, j], estimate.value, allowed)
