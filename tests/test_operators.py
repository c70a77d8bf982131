"""`derivcli op`: the expression language, its safety, its numbers and the CI gates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derivcli.errors import UsageError
from derivcli.expressions import Coordinate, Derivative, Laplacian, parse_expression, parse_expressions

from conftest import read_csv
from test_errors import assert_one_line_error

INPUTS, OUTPUTS = ["t", "x"], ["u"]


def test_subscripts_and_d_calls_name_the_same_derivatives():
    a = parse_expression("res=u_t + u*u_x - 0.01/pi*u_xx", INPUTS, OUTPUTS)
    b = parse_expression("D(u, t) + u*D(u, x) - 0.01/pi*D(u, x^2)", INPUTS, OUTPUTS)
    assert a.name == "res" and b.name == "op"
    expected = {Derivative(0, (0, 0)), Derivative(0, (1, 0)), Derivative(0, (0, 1)), Derivative(0, (0, 2))}
    assert set(a.derivatives) == set(b.derivatives) == expected  # (0, 0) is the value u
    mixed = parse_expression("D(u, x, t) + u_xt + lap(u)", INPUTS, OUTPUTS)
    assert set(mixed.derivatives) == {Derivative(0, (1, 1)), Laplacian(0)}


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("__import__('os').system('ls')", "attribute access is not allowed"),
        ("__import__('os')", "unknown function '__import__'"),
        ("u.__class__", "attribute access is not allowed"),
        ("u[0]", "subscripts are allowed only for the elements of a tensor"),
        ("(lambda: 1)()", "only the listed functions"),
        ("lambda: 1", "lambda is not allowed"),
        ("open('f')", "unknown function 'open'"),
        ("eval('1')", "unknown function 'eval'"),
        ("sin(u, x)", "sin() takes one argument"),
        ("sin(x=u)", "plain arguments only"),
        ("foo + 1", "unknown name 'foo'"),
        ("D(u, z)", "expected an input name"),
        ("D(v, x)", "expected an output name"),
        ("D(u)", "at least one input"),
        ("D(u, x^0)", "positive whole number"),
        ("D(u, x^1.5)", "positive whole number"),
        ("u_z", "'z' in the subscript is not an input"),
        ("u ^ 2", "write ** for a power"),
        ("u // 2", "operator FloorDiv is not allowed"),
        ("u < 1", "compare is not allowed"),
        ("'text'", "only numbers"),
        ("True", "only numbers"),
        ("u +", "syntax error at position 4"),
        ("", "the expression is empty"),
        ("[u]", "list is not allowed"),
        ("u if x else t", "ifexp is not allowed"),
        ("sin", "sin is a function"),
        ("x; import os", "syntax error"),
    ],
)
def test_hostile_and_malformed_expressions_are_usage_errors(expr, fragment):
    with pytest.raises(UsageError) as raised:
        parse_expression(expr, INPUTS, OUTPUTS)
    message = raised.value.message
    assert fragment in message, message
    assert repr(expr) in message, "the error quotes the expression"
    assert "\n" not in message


def test_error_points_at_the_offending_part():
    with pytest.raises(UsageError) as raised:
        parse_expression("res=u_t + bad*u_x", INPUTS, OUTPUTS)
    assert raised.value.message.endswith("unknown name 'bad' (inputs: t, x; outputs: u; constants: pi, e) at position 11: 'bad'")


def test_subscripts_need_one_letter_inputs():
    with pytest.raises(UsageError, match="one-letter input names"):
        parse_expression("y_x0", ["x0", "x1"], ["y"])


def test_unnamed_expressions_are_numbered_and_names_must_be_unique():
    assert [e.name for e in parse_expressions(["u", "u_x"], INPUTS, OUTPUTS)] == ["op1", "op2"]
    assert [e.name for e in parse_expressions(["u"], INPUTS, OUTPUTS)] == ["op"]
    with pytest.raises(UsageError, match="used twice"):
        parse_expressions(["a=u", "a=u_x"], INPUTS, OUTPUTS)


# Property: random valid expressions evaluate like the same formula written in NumPy.
LEAVES = {"t": 0.7, "x": -0.3, "u": 1.3, "u_t": 0.2, "u_xx": -2.5, "pi": math.pi, "e": math.e}
SAFE_FUNCTIONS = {"sin": np.sin, "cos": np.cos, "tanh": np.tanh, "exp": np.exp, "abs": np.abs}


@st.composite
def formulas(draw, depth=3):
    """(expression text, numpy value) pairs over the leaves above."""
    if depth == 0 or draw(st.booleans()):
        if draw(st.booleans()):
            number = draw(st.floats(min_value=-5, max_value=5, allow_nan=False).map(lambda v: round(v, 3)))
            return f"({number!r})", number
        name = draw(st.sampled_from(sorted(LEAVES)))
        return name, LEAVES[name]
    kind = draw(st.sampled_from(["+", "-", "*", "/", "func", "neg"]))
    if kind == "func":
        function = draw(st.sampled_from(sorted(SAFE_FUNCTIONS)))
        text, value = draw(formulas(depth=depth - 1))
        with np.errstate(all="ignore"):
            return f"{function}({text})", SAFE_FUNCTIONS[function](value)
    if kind == "neg":
        text, value = draw(formulas(depth=depth - 1))
        return f"-({text})", -value
    left_text, left = draw(formulas(depth=depth - 1))
    right_text, right = draw(formulas(depth=depth - 1))
    if kind == "/" and abs(right) < 1e-3:
        return f"({left_text}) + ({right_text})", left + right
    value = {"+": left + right, "-": left - right, "*": left * right, "/": left / right if right else 0}[kind]
    return f"({left_text}) {kind} ({right_text})", value


@settings(max_examples=200, deadline=None)
@given(formulas())
def test_random_expressions_evaluate_like_numpy(formula):
    text, expected = formula
    expression = parse_expression(text, INPUTS, OUTPUTS)
    values = {Coordinate(0): LEAVES["t"], Coordinate(1): LEAVES["x"], Derivative(0, (0, 0)): LEAVES["u"],
              Derivative(0, (1, 0)): LEAVES["u_t"], Derivative(0, (0, 2)): LEAVES["u_xx"]}
    with np.errstate(all="ignore"):  # exp(exp(...)) may overflow to inf on both sides alike
        result = expression.evaluate(lambda leaf: values.get(leaf, leaf), SAFE_FUNCTIONS)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_random_text_gives_a_result_or_a_usage_error(text):
    try:
        parse_expression(text, INPUTS, OUTPUTS)
    except UsageError as error:
        assert "\n" not in error.message


@pytest.mark.parametrize("xla", [False, True], ids=["plain", "xla"])
def test_op_matches_closed_forms(model_factory, cli, monkeypatch, xla):
    """Operator expressions combine derivatives inside the kernel: under XLA too (a long run's kernel)."""
    from derivcli import run
    from derivcli.engine.tape import DerivativeKernel

    compiled = []
    if xla:
        monkeypatch.setattr(run, "XLA_POINTS_TIMES_ORDER", 1)  # these two points count as a long run
        original = DerivativeKernel.__call__

        def spy(self, coordinates, batch_index=None):
            values = original(self, coordinates, batch_index)
            compiled.append(self.xla not in (None, False))  # compiled, and not fallen back to the plain graph
            return values

        monkeypatch.setattr(DerivativeKernel, "__call__", spy)
    net, path = model_factory("tanh", 2, 1, "keras", input_names=("t", "x"))
    points = np.array([[0.2, -0.4], [0.9, 0.3]])
    args = [a for p in points for a in ("--at", ",".join(map(repr, p.tolist())))]
    result = cli(
        "op", path, *args, "--output-names", "u", "--dtype", "float64", "--batch-size", "2",
        "--expr", "res=u_t + u*u_x - 0.01/pi*u_xx",
        "--expr", "x*D(u, x)*D(u, t) + sin(t)*exp(u) - sqrt(abs(u_xt)) + lap(u)",
        "--expr", "D(u, t^2, x^3)",
    )
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table) == ["t", "x", "u", "res", "op2", "op3"]
    d = lambda i: net.derivative(points, 0, i)  # noqa: E731
    t, x = points.T
    u = d((0, 0))
    np.testing.assert_allclose(table["res"], d((1, 0)) + u * d((0, 1)) - 0.01 / np.pi * d((0, 2)), rtol=1e-10)
    expected = x * d((0, 1)) * d((1, 0)) + np.sin(t) * np.exp(u) - np.sqrt(np.abs(d((1, 1)))) + d((2, 0)) + d((0, 2))
    np.testing.assert_allclose(table["op2"], expected, rtol=1e-10)
    np.testing.assert_allclose(table["op3"], d((2, 3)), rtol=1e-10)
    assert compiled == ([True] if xla else [])


def test_laplacian_in_op_follows_wrt(model_factory, cli):
    net, path = model_factory("tanh", 2, 1, "keras", input_names=("t", "x"))
    result = cli("op", path, "--at", "0.2,-0.4", "--expr", "lap(y)", "--wrt", "x", "--dtype", "float64")
    np.testing.assert_allclose(read_csv(result.stdout)["op"], net.derivative(np.array([[0.2, -0.4]]), 0, (0, 2)), rtol=1e-10)


def test_expressions_share_their_derivative_work(model_factory):
    import tensorflow as tf

    from derivcli import load_model
    from derivcli.engine.operators import expression_combiner
    from derivcli.engine.tape import DerivativeGraph

    _, path = model_factory("tanh", 2, 1, "keras", input_names=("t", "x"))
    model = load_model(str(path), output_names=["u"])
    expressions = parse_expressions(["u_t + u*u_x", "u_x*u_xx", "u_xx - u_t"], ["t", "x"], ["u"])
    graphs = []

    @tf.function(input_signature=[tf.TensorSpec((None, 2))])
    def run(points):
        graph = DerivativeGraph(points, model.call_flat(points))
        graphs.append(graph)
        return expression_combiner(expressions, [0, 1])(graph)

    run(tf.zeros((3, 2)))
    # One gradient of u (giving u_t and u_x) and one of u_x (giving u_xx): two in all.
    assert sorted(graphs[0].gradients) == [(0, (0, 0)), (0, (0, 1))]


def test_max_abs_gate_and_strict(cli, tmp_path):
    base = ["op", "sample_models/softplus_2d.keras", "--names", "t,x", "--output-names", "u",
            "--grid", "t=0:1:3", "--grid", "x=-1:1:5", "--expr", "res=u_t - u_xx"]
    target = tmp_path / "res.npz"
    failing = cli(*base, "--max-abs", "0.05", "-o", target)
    assert_one_line_error(failing, 3, "max |res| =", "exceeds --max-abs 0.05", "at t=")
    assert target.exists(), "the gate judges the numbers; the file is still written"
    passing = cli(*base, "--max-abs", "100")
    assert passing.exit_code == 0
    assert passing.stderr == ""  # a gate that passes is information, not a warning: off a terminal, only on request
    verbose = cli(*base, "--max-abs", "100", "--verbose")
    assert verbose.exit_code == 0 and verbose.stderr.startswith("derivcli: max |res| = ")
    assert "within --max-abs 100" in verbose.stderr and "warning" not in verbose.stderr


def test_nan_is_reported_with_its_first_point_and_strict_fails(cli):
    args = ["op", "sample_models/softplus_2d.keras", "--at", "0.5,1", "--at", "-3,0", "--expr", "log(y)"]
    plain = cli(*args)
    assert plain.exit_code == 0
    assert "1 NaN/Inf value(s) (op: 1); first at x0=-3, x1=0" in plain.stderr
    assert read_csv(plain.stdout)["op"][1] != read_csv(plain.stdout)["op"][1], "nan is written as nan"
    assert_one_line_error(cli(*args, "--strict", "--quiet"), 3, "1 NaN/Inf value(s)", "x0=-3")


def test_op_usage_error_from_the_command_line(cli):
    result = cli("op", "sample_models/softplus_2d.keras", "--at", "1,2", "--expr", "y.numpy()")
    assert_one_line_error(result, 2, "attribute access is not allowed", "'y.numpy()'")


def test_heat_pinn_sample_gate_passes_and_fails(cli):
    """The README walkthrough: the trained PINN's residual passes at 0.2 and fails at 0.05."""
    base = ["op", "sample_models/heat_pinn.keras", "--output-names", "u", "--grid", "t=0:1:21",
            "--grid", "x=-1:1:41", "--expr", "res=u_t - 0.1*u_xx"]
    assert cli(*base, "--max-abs", "0.2").exit_code == 0
    assert cli(*base, "--max-abs", "0.05").exit_code == 3
