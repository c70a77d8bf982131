"""Partial derivatives up to order 8 against closed forms, in float32 and float64."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from derivcli import DerivativeRequest, evaluate, load_model
from derivcli.specs import all_partials

from conftest import ROOT, read_csv

# float32: the kernel's round-off grows with the order (each order adds a pass
# through the net), and high derivatives of tanh are large sums that cancel.
# The tolerance is relative to the largest value of the column.
FLOAT32_RTOL = {1: 2e-6, 2: 5e-6, 3: 2e-5, 4: 5e-5, 5: 2e-4, 6: 5e-4, 7: 2e-3, 8: 5e-3}
FLOAT64_RTOL = 1e-10


def points_for(dimension: int, count: int = 7, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.5, 1.5, (count, dimension))


def assert_close(actual, expected, rtol):
    scale = np.max(np.abs(expected)) + 1e-12
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pure_derivatives_to_order_8_on_one_input(model_factory, activation, dtype):
    net, path = model_factory(activation, 1, 1)
    model = load_model(str(path), dtype=dtype)
    points = points_for(1)
    request = DerivativeRequest(partials=[{"x": n} for n in range(1, 9)])
    table = evaluate(model, points, request)
    for n in range(1, 9):
        name = "dy/dx" if n == 1 else f"d{n}y/dx^{n}"
        rtol = FLOAT64_RTOL if dtype == "float64" else FLOAT32_RTOL[n]
        assert_close(table[name], net.derivative(points, 0, (n,)), rtol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_mixed_partial_to_order_4_on_two_inputs(model_factory, dtype):
    net, path = model_factory("tanh", 2, 1)
    model = load_model(str(path), dtype=dtype)
    points = points_for(2)
    for order in range(1, 5):
        table = evaluate(model, points, DerivativeRequest(order=order))
        for index in all_partials(order, [0, 1], 2):
            from derivcli.specs import derivative_column

            name = derivative_column("y", index, ["x0", "x1"])
            assert_close(table[name], net.derivative(points, 0, index), FLOAT64_RTOL if dtype == "float64" else FLOAT32_RTOL[order])


def test_high_mixed_partials_on_five_inputs_in_float64(model_factory):
    net, path = model_factory("softplus", 5, 1)
    model = load_model(str(path), dtype="float64")
    points = points_for(5)
    specs = [{"x0": 3, "x4": 5}, {"x1": 2, "x2": 2, "x3": 2}, {"x0": 1, "x1": 1, "x2": 1, "x3": 1, "x4": 1}]
    table = evaluate(model, points, DerivativeRequest(partials=specs))
    names = ["d8y/dx0^3dx4^5", "d6y/dx1^2dx2^2dx3^2", "d5y/dx0dx1dx2dx3dx4"]
    for spec, name in zip(specs, names):
        index = tuple(spec.get(f"x{i}", 0) for i in range(5))
        assert_close(table[name], net.derivative(points, 0, index), FLOAT64_RTOL)


def test_multi_output_hessian_and_laplacian(model_factory, cli):
    net, path = model_factory("tanh", 3, 2)
    points = points_for(3, 4)
    args = [a for p in points for a in ("--at", ",".join(map(repr, p.tolist())))]
    hessian = read_csv(cli("hessian", path, *args, "--dtype", "float64").stdout)
    expected_columns = ["x0", "x1", "x2", "y0", "y1"] + [
        f"d2{y}/{d}" for y in ("y0", "y1")
        for d in ("dx0^2", "dx0dx1", "dx0dx2", "dx1^2", "dx1dx2", "dx2^2")
    ]
    assert list(hessian) == expected_columns
    for m, (i, j) in itertools.product(range(2), itertools.combinations_with_replacement(range(3), 2)):
        index = [0, 0, 0]
        index[i] += 1
        index[j] += 1
        name = f"d2y{m}/" + "".join(
            f"dx{k}^{p}" if p > 1 else f"dx{k}" for k, p in enumerate(index) if p
        )
        assert_close(hessian[name], net.derivative(points, m, tuple(index)), FLOAT64_RTOL)
    laplacian = read_csv(cli("laplacian", path, *args, "--wrt", "x0,x2", "--dtype", "float64").stdout)
    assert list(laplacian) == ["x0", "x1", "x2", "y0", "y1", "laplacian(y0)", "laplacian(y1)"]
    for m in range(2):
        assert_close(laplacian[f"laplacian(y{m})"], net.laplacian(points, m, [0, 2]), FLOAT64_RTOL)


def test_outputs_and_wrt_select_columns(model_factory, cli):
    net, path = model_factory("tanh", 3, 2)
    result = cli("grad", path, "--at", "0.1,0.2,0.3", "--outputs", "y1", "--wrt", "x2,x0")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table) == ["x0", "x1", "x2", "y1", "dy1/dx2", "dy1/dx0"]
    point = np.array([[0.1, 0.2, 0.3]])
    assert_close(table["dy1/dx2"], net.derivative(point, 1, (0, 0, 1)), 1e-5)


def test_named_inputs_and_renames_with_sample_names(model_factory, cli):
    """Several 1-feature inputs use their layer names; --names and --output-names rename."""
    net, path = model_factory("tanh", 2, 1, "keras", input_names=("t", "x"))
    result = cli("deriv", path, "--at", "t=0.2,x=-0.4", "--partial", "t,x^2", "--dtype", "float64")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table) == ["t", "x", "y", "d3y/dtdx^2"]
    assert_close(table["d3y/dtdx^2"], net.derivative(np.array([[0.2, -0.4]]), 0, (1, 2)), FLOAT64_RTOL)
    renamed = cli("grad", path, "--at", "0.2,-0.4", "--names", "a,b", "--output-names", "u")
    assert renamed.stdout.splitlines()[0] == "a,b,u,du/da,du/db"


def test_float64_is_the_same_function_in_double_precision(model_factory):
    net, path = model_factory("tanh", 2, 1)
    points = points_for(2)
    single = evaluate(load_model(str(path)), points, DerivativeRequest())["y"]
    double = evaluate(load_model(str(path), dtype="float64"), points, DerivativeRequest())["y"]
    assert double.dtype == np.float64 and single.dtype == np.float32
    # The float32 model's weights are exact in float64, so the float64 run matches
    # the closed form to double precision, and the float32 run to single precision.
    assert_close(double, net.derivative(points, 0, (0, 0)), 1e-13)
    assert_close(single, double, 1e-6)


def test_relu_second_derivative_is_zero_and_stderr_says_why(cli):
    result = cli("deriv", "sample_models/square_relu.keras", "--grid", "1:6:6", "--partial", "x", "--partial", "x^2")
    assert result.exit_code == 0
    table = read_csv(result.stdout)
    np.testing.assert_array_equal(table["d2y/dx^2"], np.zeros(6))
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and "piecewise linear" in warnings[0] and "hidden1" in warnings[0]


def test_batch_independence_of_per_sample_derivatives(model_factory):
    """A point's derivatives do not depend on the other points of its batch."""
    net, path = model_factory("tanh", 2, 1)
    model = load_model(str(path), dtype="float64")
    points = points_for(2, 9)
    together = evaluate(model, points, DerivativeRequest(order=2))
    alone = [evaluate(model, p[None], DerivativeRequest(order=2)) for p in points]
    for name, column in together.items():
        np.testing.assert_allclose(column, [a[name][0] for a in alone], rtol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus"])
def test_taylor_engine_matches_closed_forms_to_order_16_in_float64(model_factory, activation):
    from derivcli.run import make_kernel, plan

    net, path = model_factory(activation, 2, 2)
    model = load_model(str(path), dtype="float64")
    points = points_for(2, 5)
    request = DerivativeRequest(partials=[{"x1": n} for n in (2, 5, 8, 12, 16)] + [{"x0": 3}])
    planned = plan(model, request)
    kernel = make_kernel(model, planned, engine="taylor")
    assert kernel.taylor is not None
    values = kernel(points)
    for j, (column, name) in enumerate(zip(planned.columns, planned.names)):
        expected = net.derivative(points, column.output, column.partial)
        # At order 16 the closed form itself cancels (its polynomial's coefficients reach 1e13):
        # the tolerance is its own round-off bound plus the usual float64 tolerance.
        reference_error = net.rounding(points, column.output, column.partial)
        difference = np.abs(values[:, j] - expected)
        allowed = reference_error + FLOAT64_RTOL * np.max(np.abs(expected))
        assert np.all(difference <= allowed), (name, difference, allowed)


def test_taylor_and_tape_engines_agree_in_float32(model_factory, cli):
    _, path = model_factory("tanh", 1, 1)
    args = ["deriv", path, "--grid", "-1:1:9", "--partial", "x^2", "--partial", "x^5"]
    taylor = read_csv(cli(*args, "--engine", "taylor").stdout)
    tape = read_csv(cli(*args, "--engine", "tape").stdout)
    for name in ("d2y/dx^2", "d5y/dx^5"):
        assert_close(taylor[name], tape[name], 1e-5)


def test_taylor_engine_refuses_models_it_does_not_cover_and_auto_falls_back(cli, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    path = tmp_path / "lstm"  # a loop has no Taylor rule: a SavedModel keeps the recurrent layer's loop
    keras.Sequential([keras.Input((2,)), keras.layers.Reshape((2, 1)), keras.layers.LSTM(2),
                      keras.layers.Dense(1)]).export(path, verbose=False)
    args = ["deriv", path, "--at", "0.5,0.2", "--partial", "x0^3"]
    result = cli(*args, "--engine", "taylor")
    assert result.exit_code == 2 and "does not cover this model (op TensorList" in result.stderr
    assert "unroll=True are covered" in result.stderr
    assert cli(*args).exit_code == 0
    assert cli(*args, "--engine", "tape").stdout == cli(*args).stdout


def test_custom_layer_goes_through_the_taylor_engine(cli):
    """The bump layer's ops (where, division, exp) have Taylor rules: order 4 agrees with nested tapes."""
    bump = ["deriv", "sample_models/bump.keras", "--custom-objects", "sample_models/bump_layer.py",
            "--grid", "-0.9:0.9:7", "--partial", "x^2", "--partial", "x^4", "--dtype", "float64"]
    taylor = read_csv(cli(*bump, "--engine", "taylor").stdout)
    tape = read_csv(cli(*bump, "--engine", "tape").stdout)
    for name in ("d2y/dx^2", "d4y/dx^4"):
        assert_close(taylor[name], tape[name], 1e-10)


@pytest.mark.parametrize("engine", ["taylor", "tape"])
def test_derivatives_along_a_direction_match_the_closed_form(model_factory, engine):
    """D_v^n y = sum over |a| = n of n!/a! v^a d^a y, from the closed form's partials, to order 6."""
    from math import factorial, prod

    from derivcli.run import make_kernel, plan
    from derivcli.specs import Direction, parse_at

    net, path = model_factory("softplus", 3, 1)
    model = load_model(str(path), dtype="float64")
    points = points_for(3, 5)
    vector = (0.5, -1.0, 2.0)
    request = DerivativeRequest(directions=[Direction(parse_at("0.5,-1,2"), n, f"0.5,-1,2^{n}") for n in range(1, 7)])
    planned = plan(model, request)
    values = make_kernel(model, planned, engine=engine)(points)
    for n in range(1, 7):
        expected = sum(
            factorial(n) / prod(map(factorial, index)) * prod(v**a for v, a in zip(vector, index))
            * net.derivative(points, 0, index)
            for index in all_partials(n, [0, 1, 2], 3)
        )
        name = "dy/d(0.5,-1,2)" if n == 1 else f"d{n}y/d(0.5,-1,2)^{n}"
        assert_close(values[:, planned.names.index(name)], expected, FLOAT64_RTOL)


def test_direction_option_names_columns_and_fills_unnamed_inputs_with_zero(cli):
    args = ["deriv", "sample_models/softplus_2d.keras", "--at", "0.5,0.3"]
    table = read_csv(cli(*args, "--direction", "x1=2^3", "--partial", "x1^3", "--direction", "1,1").stdout)
    assert list(table)[3:] == ["d3y/dx1^3", "d3y/d(0,2)^3", "dy/d(1,1)"]
    np.testing.assert_allclose(table["d3y/d(0,2)^3"], 8 * table["d3y/dx1^3"], rtol=1e-5)
    for bad, message in [("0,0", "must be finite and not zero"), ("1,1^x", "must be a positive whole number"),
                         ("z=1", "z is not an input"), ("1,2,3", "3 value(s) for 2 input(s)")]:
        result = cli(*args, "--direction", bad)
        assert result.exit_code == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("inputs", "orders"), [(2, (3, 4, 6, 8)), (3, (3, 4))])
def test_mixed_partials_by_interpolation_match_the_closed_form(model_factory, dtype, inputs, orders):
    """--engine taylor takes mixed partials from series along integer directions, weighted exactly."""
    from derivcli.run import make_kernel, plan
    from derivcli.specs import derivative_column

    net, path = model_factory("tanh", inputs, 1)
    model = load_model(str(path), dtype=dtype)
    points = points_for(inputs, 6)
    names = ["x0", "x1", "x2"][:inputs]
    for order in orders:
        mixed = [index for index in all_partials(order, list(range(inputs)), inputs) if sum(map(bool, index)) >= 2]
        planned = plan(model, DerivativeRequest(partials=[dict(zip(names, index)) for index in mixed]))
        kernel = make_kernel(model, planned, engine="taylor")
        assert kernel.interpolate_from is not None
        values = kernel(points)
        for index in mixed:
            column = values[:, planned.names.index(derivative_column("y", index, names))]
            assert_close(column, net.derivative(points, 0, index), FLOAT64_RTOL if dtype == "float64" else FLOAT32_RTOL[order])


def test_interpolation_weights_are_exact():
    """The weights reproduce d^2/dxdy from D^2 along (2,0), (1,1), (0,2), and are exact rationals."""
    from derivcli.engine.taylor import interpolation_rule

    directions, weights = interpolation_rule((1, 1))
    assert dict(zip(directions, weights)) == {(2, 0): -1 / 8, (1, 1): 1 / 2, (0, 2): -1 / 8}
    # On a homogeneous polynomial of degree 5, D_j^5 p = 5! p(j), so sum_j w_j 5! p(j) = d^index p.
    directions, weights = interpolation_rule((2, 0, 3))
    assert sum(w * 120 * (j[0] ** 2 * j[2] ** 3) for j, w in zip(directions, weights)) == pytest.approx(2 * 6)
    assert sum(w * 120 * (j[0] ** 3 * j[2] ** 2) for j, w in zip(directions, weights)) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize(("command", "options", "probed"), [
    ("hessian", [], False),
    ("deriv", ["--partial", "x0^2", "--partial", "x0,x1"], False),
    ("op", ["--expr", "D(y, x0^2) - D(y, x1)"], False),
    ("laplacian", [], True),  # the Forward Laplacian
    ("op", ["--expr", "lap(y)"], True),
    ("deriv", ["--partial", "x0^3"], True),
    ("deriv", ["--partial", "x0^2", "--engine", "taylor"], True),
])
def test_the_taylor_probe_runs_only_where_series_can_serve(cli, monkeypatch, command, options, probed):
    """At order 2 Taylor series are no faster than tapes: a run of order 2 without a Laplacian goes
    to tapes without building and probing a Taylor program (0.2 s of a one-point Hessian)."""
    from derivcli import run

    built = []
    original = run.taylor_program_for
    monkeypatch.setattr(run, "taylor_program_for", lambda model: built.append(1) or original(model))
    result = cli(command, ROOT / "sample_models" / "softplus_2d.keras", "--at", "0.5,0.5", *options)
    assert result.exit_code == 0, result.stderr
    assert bool(built) == probed
