"""Operator expressions evaluated on a `DerivativeGraph`, in TensorFlow."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from derivcli.engine.tape import DerivativeGraph
from derivcli.expressions import Coordinate, Derivative, Expression, Laplacian

TF_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "sin": tf.sin, "cos": tf.cos, "tan": tf.tan, "exp": tf.exp, "log": tf.math.log,
    "sqrt": tf.sqrt, "tanh": tf.tanh, "abs": tf.abs,
}


def expression_combiner(
    expressions: Sequence[Expression], laplacian_over: Sequence[int]
) -> Callable[[DerivativeGraph], list[tf.Tensor]]:
    """A `combine` function for `DerivativeKernel` that evaluates `expressions`.

    Every derivative an expression names comes from the graph's memo, so
    several expressions share their derivative work (u_x is taken once).
    """

    def combine(graph: DerivativeGraph) -> list[tf.Tensor]:
        def resolve(leaf: Any) -> Any:
            if isinstance(leaf, Coordinate):
                return graph.coordinates[:, leaf.position]
            if isinstance(leaf, Derivative):
                return graph.derivative(leaf.output, leaf.index)
            if isinstance(leaf, Laplacian):
                return graph.laplacian(leaf.output, laplacian_over)
            return tf.constant(leaf, graph.coordinates.dtype)

        return [expression.evaluate(resolve, TF_FUNCTIONS) for expression in expressions]

    return combine
