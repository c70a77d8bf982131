"""Taylor mode: pure derivatives of any order from one truncated Taylor series.

Along an input x_i, y(x + t e_i) = sum_k y_k t^k and d^n y / dx_i^n = n! y_n.
The coefficients are pushed through the network: a Dense layer acts on each
coefficient (the bias on y_0 only), and each activation by its recurrence,
O(n^2) in the order instead of the exponential growth of nested reverse mode.
For s = f(u) with s' = g(u) u':  s_k = (1/k) sum_{j=1..k} j u_j g_{k-j}.

Covered: Keras models that are a chain of Dense and Activation layers (after
an optional Concatenate of the inputs), with the activations of
`ACTIVATIONS`. Anything else is left to the nested-tape engine; a model is
accepted only after its Taylor value matches the model's own output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

Series = list[tf.Tensor]


def _compose(u: Series, derivative_series: Callable[[Series, int], tf.Tensor], first: tf.Tensor) -> Series:
    """s = f(u) with s' = g(u) u', given s_0 = f(u_0) and a function giving g_k from s_0..s_k."""
    s = [first]
    g = [derivative_series(s, 0)]
    for k in range(1, len(u)):
        s.append(tf.add_n([j * u[j] * g[k - j] for j in range(1, k + 1)]) / k)
        g.append(derivative_series(s, k))
    return s


def _cauchy(a: Series, b: Series, k: int) -> tf.Tensor:
    """The k-th coefficient of the product of two series."""
    return tf.add_n([a[j] * b[k - j] for j in range(k + 1)])


def _tanh(u: Series) -> Series:
    # tanh' = 1 - tanh^2
    return _compose(u, lambda s, k: (1.0 if k == 0 else 0.0) - _cauchy(s, s, k), tf.tanh(u[0]))


def _sigmoid(u: Series) -> Series:
    # sigmoid' = s (1 - s)
    return _compose(u, lambda s, k: s[k] - _cauchy(s, s, k), tf.sigmoid(u[0]))


def _exp(u: Series) -> Series:
    return _compose(u, lambda s, k: s[k], tf.exp(u[0]))


def _softplus(u: Series) -> Series:
    # softplus' = sigmoid(u)
    sigmoid = _sigmoid(u)
    return _compose(u, lambda s, k: sigmoid[k], tf.math.softplus(u[0]))


def _sin_cos(u: Series) -> tuple[Series, Series]:
    sin, cos = [tf.sin(u[0])], [tf.cos(u[0])]
    for k in range(1, len(u)):
        sin.append(tf.add_n([j * u[j] * cos[k - j] for j in range(1, k + 1)]) / k)
        cos.append(-tf.add_n([j * u[j] * sin[k - j] for j in range(1, k + 1)]) / k)
    return sin, cos


def _relu(u: Series) -> Series:
    # Piecewise linear: away from the kink every coefficient follows the active branch.
    active = tf.cast(u[0] > 0, u[0].dtype)
    return [active * c for c in u]


ACTIVATIONS: dict[str, Callable[[Series], Series]] = {
    "linear": lambda u: u,
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "exponential": _exp,
    "softplus": _softplus,
    "relu": _relu,
    "sin": lambda u: _sin_cos(u)[0],
    "cos": lambda u: _sin_cos(u)[1],
}


def taylor_program(keras_model: Any) -> list[tuple[str, Any]] | None:
    """The model as a list of steps ("dense", layer) / ("activation", name), or None if not covered."""
    import keras

    steps: list[tuple[str, Any]] = []
    layers = [layer for layer in keras_model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if layers and isinstance(layers[0], keras.layers.Concatenate) and len(keras_model.inputs) > 1:
        layers = layers[1:]
    elif len(keras_model.inputs) != 1:
        return None
    for layer in layers:
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        if isinstance(layer, keras.layers.Dense):
            steps.append(("dense", layer))
        elif isinstance(layer, keras.layers.Activation):
            pass
        else:
            return None
        if activation not in ACTIVATIONS:
            return None
        if activation != "linear":
            steps.append(("activation", activation))
    return steps


def taylor_series(steps: list[tuple[str, Any]], coordinates: tf.Tensor, position: int, order: int) -> Series:
    """Output coefficients y_0..y_order (each (batch, outputs)) along input `position`."""
    dimension = coordinates.shape[1]
    direction = tf.one_hot(position, dimension, dtype=coordinates.dtype)
    u: Series = [coordinates, tf.broadcast_to(direction, tf.shape(coordinates))]
    u += [tf.zeros_like(coordinates)] * (order - 1)
    u = u[: order + 1]
    for kind, item in steps:
        if kind == "dense":
            kernel = tf.cast(item.kernel, coordinates.dtype)
            bias = tf.cast(item.bias, coordinates.dtype) if item.use_bias else None
            u = [c @ kernel for c in u]
            if bias is not None:
                u[0] = u[0] + bias
        else:
            u = ACTIVATIONS[item](u)
    return u


def forward_laplacian(steps: list[tuple[str, Any]], coordinates: tf.Tensor, positions: list[int]) -> tf.Tensor:
    """The Laplacian over `positions` of every output, (batch, outputs), in one forward pass.

    The Forward Laplacian (Li et al.): value u, Jacobian J (one row per input
    differentiated) and Laplacian L are pushed forward together. A Dense layer
    maps each; an activation s = f(u) gives J' = f'(u) J and
    L' = f'(u) L + f''(u) sum_i J_i^2, with f' and f'' read off its Taylor series.
    """
    dimension = coordinates.shape[1]
    value = coordinates
    jacobian = tf.broadcast_to(
        tf.one_hot(positions, dimension, dtype=coordinates.dtype)[None], [tf.shape(coordinates)[0], len(positions), dimension]
    )
    laplacian = tf.zeros_like(coordinates)
    for kind, item in steps:
        if kind == "dense":
            kernel = tf.cast(item.kernel, coordinates.dtype)
            value = value @ kernel
            if item.use_bias:
                value = value + tf.cast(item.bias, coordinates.dtype)
            # One (batch * inputs, width) GEMM: a broadcast batched matmul is far slower on CPUs.
            rows = tf.shape(jacobian)
            jacobian = tf.reshape(tf.reshape(jacobian, [-1, rows[2]]) @ kernel, [rows[0], rows[1], -1])
            laplacian = laplacian @ kernel
        else:
            series = ACTIVATIONS[item]([value, tf.ones_like(value), tf.zeros_like(value)])
            first, second = series[1], 2.0 * series[2]
            laplacian = first * laplacian + second * tf.reduce_sum(jacobian * jacobian, axis=1)
            jacobian = first[:, None, :] * jacobian
            value = series[0]
    return laplacian
