"""Exact derivatives of one-hidden-layer networks, written once in NumPy.

For y_m = sum_k A[k, m] s(z_k) + c_m with z = x W + b, every partial
derivative is

    d^alpha y_m = sum_k A[k, m] s^(|alpha|)(z_k) prod_i W[i, k]^alpha_i,

and the n-th derivative of tanh is a polynomial in tanh (P_{n+1} = P_n' (1 - t^2)),
that of the sigmoid a polynomial in the sigmoid (Q_{n+1} = Q_n' s (1 - s)),
and softplus' = sigmoid. Everything is evaluated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import polynomial as P


def _tanh_polynomial(order: int) -> np.ndarray:
    coefficients = np.array([0.0, 1.0])  # t
    for _ in range(order):
        coefficients = P.polymul(P.polyder(coefficients), [1.0, 0.0, -1.0])
    return coefficients


def _sigmoid_polynomial(order: int) -> np.ndarray:
    coefficients = np.array([0.0, 1.0])  # s
    for _ in range(order):
        coefficients = P.polymul(P.polyder(coefficients), [0.0, 1.0, -1.0])
    return coefficients


def activation_derivative_rounding(name: str, z: np.ndarray, order: int) -> np.ndarray:
    """A bound on the float64 round-off of `activation_derivative`: its polynomial's
    coefficients grow fast with the order and alternate in sign, so high orders cancel."""
    eps = np.finfo(np.float64).eps
    if name == "tanh":
        return 4 * eps * P.polyval(np.abs(np.tanh(z)), np.abs(_tanh_polynomial(order)))
    sigmoid = 1.0 / (1.0 + np.exp(-z))
    degree = order if name == "sigmoid" else max(order - 1, 0)
    return 4 * eps * P.polyval(sigmoid, np.abs(_sigmoid_polynomial(degree)))


def activation_derivative(name: str, z: np.ndarray, order: int) -> np.ndarray:
    """The `order`-th derivative of the activation `name` at `z`, in float64."""
    if name == "tanh":
        return P.polyval(np.tanh(z), _tanh_polynomial(order))
    sigmoid = 1.0 / (1.0 + np.exp(-z))
    if name == "sigmoid":
        return P.polyval(sigmoid, _sigmoid_polynomial(order))
    if name == "softplus":
        return np.logaddexp(0.0, z) if order == 0 else P.polyval(sigmoid, _sigmoid_polynomial(order - 1))
    raise ValueError(name)


@dataclass
class OneLayerNet:
    """The weights of a one-hidden-layer network and its exact derivatives."""

    activation: str
    kernel: np.ndarray  # W, (inputs, hidden)
    bias: np.ndarray  # b, (hidden,)
    head: np.ndarray  # A, (hidden, outputs)
    offset: np.ndarray  # c, (outputs,)

    @classmethod
    def random(cls, activation: str, inputs: int, outputs: int, hidden: int = 12, seed: int = 0) -> OneLayerNet:
        rng = np.random.default_rng(seed)

        def draw(scale: float, shape: tuple[int, ...] | int) -> np.ndarray:
            # Representable in float32, so that a float32 model holds these weights exactly.
            return rng.normal(0, scale, shape).astype(np.float32).astype(np.float64)

        return cls(activation, draw(0.8, (inputs, hidden)), draw(0.5, hidden),
                   draw(0.7, (hidden, outputs)), draw(0.3, outputs))

    def derivative(self, points: np.ndarray, output: int, index: tuple[int, ...]) -> np.ndarray:
        """d^index y_output at `points` (N, inputs)."""
        z = np.asarray(points, np.float64) @ self.kernel + self.bias
        order = sum(index)
        factor = np.prod(self.kernel ** np.array(index)[:, None], axis=0)  # (hidden,)
        value = activation_derivative(self.activation, z, order) @ (self.head[:, output] * factor)
        return value + (self.offset[output] if order == 0 else 0.0)

    def rounding(self, points: np.ndarray, output: int, index: tuple[int, ...]) -> np.ndarray:
        """A bound on the round-off of `derivative` at `points` (how exact the reference is)."""
        z = np.asarray(points, np.float64) @ self.kernel + self.bias
        factor = np.abs(np.prod(self.kernel ** np.array(index)[:, None], axis=0))
        return activation_derivative_rounding(self.activation, z, sum(index)) @ (np.abs(self.head[:, output]) * factor)

    def laplacian(self, points: np.ndarray, output: int, over: list[int]) -> np.ndarray:
        total = np.zeros(len(points))
        for i in over:
            index = [0] * self.kernel.shape[0]
            index[i] = 2
            total += self.derivative(points, output, tuple(index))
        return total

    def weights(self, dtype: str = "float32") -> list[np.ndarray]:
        return [w.astype(dtype) for w in (self.kernel, self.bias, self.head, self.offset)]
