"""The Taylor engine's op rules, in float64, against closed forms and against nested tapes.

Closed forms: an elementwise function of an affine u = a x + b has a known n-th
derivative, so every smooth rule is checked to order 10. Keras activations
built from several ops (gelu, silu, mish, ...) are checked against nested
GradientTapes to order 5, and the Forward Laplacian against the Hessian's trace.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from numpy.polynomial import hermite

from derivcli.engine.taylor import NotCovered, TaylorProgram

A, B = 0.7, 0.2  # u = A x + B
ORDER = 10
RTOL = 1e-11  # relative to the largest value of each order over the points


def falling(p: float, n: int) -> float:
    return math.prod(p - i for i in range(n))


# (op, n-th derivative of op(u) in x as a function of u and n, points x where it is defined)
CLOSED_FORMS = {
    "exp": (tf.exp, lambda u, n: A**n * np.exp(u), (-1.5, 1.5)),
    "expm1": (tf.math.expm1, lambda u, n: A**n * np.exp(u), (-1.5, 1.5)),
    "sin": (tf.sin, lambda u, n: A**n * np.sin(u + n * np.pi / 2), (-2, 2)),
    "cos": (tf.cos, lambda u, n: A**n * np.cos(u + n * np.pi / 2), (-2, 2)),
    "log": (tf.math.log, lambda u, n: (-1) ** (n - 1) * math.factorial(n - 1) * A**n / u**n, (0.5, 2)),
    "log1p": (tf.math.log1p, lambda u, n: (-1) ** (n - 1) * math.factorial(n - 1) * A**n / (1 + u) ** n, (0, 2)),
    "sqrt": (tf.sqrt, lambda u, n: A**n * falling(0.5, n) * u ** (0.5 - n), (0.5, 2)),
    "rsqrt": (tf.math.rsqrt, lambda u, n: A**n * falling(-0.5, n) * u ** (-0.5 - n), (0.5, 2)),
    "reciprocal": (tf.math.reciprocal, lambda u, n: A**n * falling(-1, n) * u ** (-1 - n), (0.5, 2)),
    "divide": (lambda u: 3.0 / u, lambda u, n: 3.0 * A**n * falling(-1, n) * u ** (-1 - n), (0.5, 2)),
    "pow 2.5": (lambda u: tf.pow(u, 2.5), lambda u, n: A**n * falling(2.5, n) * u ** (2.5 - n), (0.5, 2)),
    "pow 3": (lambda u: tf.pow(u, 3.0), lambda u, n: A**n * falling(3, n) * u ** (3 - n), (-2, 2)),
    "square": (tf.square, lambda u, n: A**n * falling(2, n) * u ** (2 - n), (-2, 2)),
    "u * u * u": (lambda u: u * u * u, lambda u, n: A**n * falling(3, n) * u ** (3 - n), (-2, 2)),
    "erf": (tf.math.erf, lambda u, n: A**n * 2 / np.sqrt(np.pi) * (-1) ** (n - 1)
            * hermite.hermval(u, [0] * (n - 1) + [1]) * np.exp(-u * u), (-1.5, 1.5)),
    "elu, negative side": (tf.nn.elu, lambda u, n: A**n * np.exp(u), (-3, -1)),
    "softsign, positive side": (tf.nn.softsign, lambda u, n: A**n * falling(-1, n) * -(1 + u) ** (-1 - n), (0.5, 2)),
}


def series_derivatives(function, points: np.ndarray, order: int) -> np.ndarray:
    """n! times the Taylor coefficients along x, (order + 1, N), from the engine."""
    program = TaylorProgram.trace(function, 1, "float64")

    @tf.function(autograph=False)
    def run(x):
        return program.series(x, tf.ones((1, 1), tf.float64), order)

    coefficients = run(tf.constant(points[:, None]))
    return np.stack([np.ravel(c) * math.factorial(k) for k, c in enumerate(coefficients)])


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_smooth_rules_match_closed_forms_to_order_10(name):
    op, derivative, (low, high) = CLOSED_FORMS[name]
    x = np.linspace(low, high, 9)
    values = series_derivatives(lambda v: op(A * v + B), x, ORDER)
    for n in range(1, ORDER + 1):
        expected = derivative(A * x + B, n)
        tolerance = RTOL * np.max(np.abs(expected))
        assert np.max(np.abs(values[n] - expected)) <= tolerance, (name, n, values[n], expected)


def nested_tapes(function, points: np.ndarray, order: int) -> list[np.ndarray]:
    x = tf.constant(points)
    derivatives = []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        current = function(x)[:, 0]
        for _ in range(order):
            current = tape.gradient(current, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)[:, 0]
            derivatives.append(current)
    return [d.numpy() for d in derivatives]


ACTIVATIONS = ["tanh", "sigmoid", "softplus", "silu", "gelu", "mish", "elu", "selu", "log_sigmoid",
               "relu", "leaky_relu", "relu6", "hard_sigmoid", "exponential"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_keras_activations_agree_with_nested_tapes_to_order_5(activation):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((1,), dtype="float64"),
        keras.layers.Dense(6, activation, dtype="float64"),
        keras.layers.Dense(6, activation, dtype="float64"),
        keras.layers.Dense(1, dtype="float64"),
    ])
    x = np.linspace(-1.3, 1.1, 7)
    values = series_derivatives(lambda v: model(v), x, 5)
    for n, expected in enumerate(nested_tapes(model, x[:, None], 5), start=1):
        tolerance = RTOL * np.max(np.abs(expected)) + 1e-13
        assert np.max(np.abs(values[n] - expected)) <= tolerance, (activation, n)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "silu", "softplus", "elu"])
def test_forward_laplacian_equals_the_hessian_trace(activation):
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(8, activation, dtype="float64"),
        keras.layers.Dense(2, dtype="float64"),
    ])
    points = np.random.default_rng(0).uniform(-1, 1, (6, 3))
    program = TaylorProgram.trace(lambda v: model(v), 3, "float64")
    laplacian = tf.function(lambda x: program.laplacian(x, [0, 2]), autograph=False)(tf.constant(points)).numpy()
    x = tf.constant(points)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(x)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(x)
            outputs = [model(x)[:, m] for m in range(2)]
        columns = {(m, i): inner.gradient(outputs[m], x)[:, i] for m in range(2) for i in (0, 2)}
    for m in range(2):
        expected = sum(outer.gradient(columns[m, i], x)[:, i] for i in (0, 2)).numpy()
        np.testing.assert_allclose(laplacian[:, m], expected, rtol=1e-12, atol=1e-12)


def test_an_op_without_a_rule_is_named():
    with pytest.raises(NotCovered, match="Atan"):
        TaylorProgram.trace(lambda v: tf.atan(v) * 2.0, 1, "float64")
