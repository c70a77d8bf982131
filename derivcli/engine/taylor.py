"""Taylor mode: derivatives of any order from truncated Taylor series, at the level of graph ops.

Along a direction v, y(x + t v) = sum_k y_k t^k and the n-th derivative along v
is n! y_n. The coefficients are pushed through the ops of the model's traced
TensorFlow graph, frozen and with function calls inlined, so Keras layers,
custom layers and SavedModels are covered alike:
- ops linear in their float inputs (Add, BiasAdd, Reshape, ConcatV2, slicing,
  sums, ...) act on each coefficient;
- bilinear ops (Mul, MatMul, Einsum, convolutions) by the Cauchy product,
  s_k = sum_j op(a_j, b_{k-j});
- division, and elementwise functions by their recurrences, O(n^2) in the
  order instead of the exponential growth of nested reverse mode: for
  s = f(u) with s' = g(u) u', s_k = (1/k) sum_{j=1..k} j u_j g_{k-j};
- piecewise-linear ops (Relu, Maximum, Abs, Select, ...) follow the branch
  that coefficient 0 takes;
- ops whose outputs are not floats (Shape, comparisons) see coefficient 0.
An op outside these rules leaves the model to the nested-tape engine.

Coefficient 0 has the shape of the op's value, (batch, ...); the others carry
a leading axis, one entry per direction, so several directions share one pass.

The collapsed mode (order 2) gives the Forward Laplacian of Li et al.: the
Jacobian (coefficient 1, one entry per input) and the Laplacian (coefficient 2,
summed over the inputs as it is formed) are pushed forward in one pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import tensorflow as tf

from derivcli.engine.graph import FrozenFunction, read_parameters, record_on_tapes

Series = tuple  # of tf.Tensor: coefficient 0, 1, ..., a value that varies with the input
Value = Any  # a plain tf.Tensor (constant along the directions) or a Series


class NotCovered(Exception):
    """The model uses an op the Taylor engine has no rule for."""


# Ops that are linear in their float inputs jointly; non-float inputs (shapes,
# indices, axes, conditions) are passed through as they are.
LINEAR_OPS = {
    "Identity", "Snapshot", "EnsureShape", "Neg", "AddN", "Reshape", "Transpose", "ExpandDims",
    "Squeeze", "StridedSlice", "Slice", "GatherV2", "Gather", "GatherNd", "ConcatV2", "Pack",
    "Unpack", "Split", "SplitV", "Tile", "BroadcastTo", "Sum", "Mean", "Pad", "PadV2", "MirrorPad",
    "Select", "SelectV2", "Cast", "Cumsum", "ReverseV2", "MatrixDiagPartV3", "IdentityN", "AvgPool", "AvgPool3D",
}
# Linear ops that act elementwise with NumPy broadcasting, so that a leading axis of directions passes through.
BROADCASTING_OPS = {
    "Identity", "IdentityN", "Snapshot", "Neg", "Cast", "AddV2", "Add", "Sub", "Mul", "RealDiv", "Div", "SelectV2",
}
AFFINE_OPS = {"AddV2", "Add", "Sub", "BiasAdd"}
BILINEAR_OPS = {
    "Mul", "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv1D", "Conv2D",
    "Conv3D", "DepthwiseConv2dNative",
}
DIVISION_OPS = {"RealDiv", "Div", "DivNoNan"}
PIECEWISE_OPS = {"Relu", "Relu6", "LeakyRelu", "Abs", "Maximum", "Minimum", "ClipByValue"}
SMOOTH_OPS = {
    "Tanh", "Sigmoid", "Softplus", "Exp", "Expm1", "Log", "Log1p", "Sin", "Cos", "Sqrt", "Rsqrt",
    "Square", "Reciprocal", "Inv", "Pow", "Erf", "Erfc", "Elu", "Selu", "Softsign", "SquaredDifference",
}
# Ops whose result does not vary along any direction.
# (StopGradient is not among them: it is the identity on values, and `engine.graph` makes it one.)
CONSTANT_OPS = {"ZerosLike", "OnesLike", "Shape", "ShapeN", "Size", "Rank", "NoOp"}
# Normalized exponentials over the last axis.
SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
# Sorting (sparsemax sorts its inputs): a permutation, so piecewise linear like relu.
SORTING_OPS = {"TopKV2"}
# Max pooling picks one entry of each window: piecewise linear like relu (NHWC, as Keras runs it).
POOLING_OPS = {"MaxPool"}
# Control flow: a loop's body runs a number of times known only when it runs.
LOOP_OPS = {"While", "StatelessWhile", "If", "StatelessIf", "Case", "StatelessCase"}
COVERED_OPS = LINEAR_OPS | AFFINE_OPS | BILINEAR_OPS | DIVISION_OPS | PIECEWISE_OPS | SMOOTH_OPS | CONSTANT_OPS \
    | SOFTMAX_OPS | SORTING_OPS | POOLING_OPS


def _execute(op: Any, inputs: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Adds a copy of graph op `op`, same type and attributes, on new inputs, to the graph being traced."""
    graph = tf.compat.v1.get_default_graph()
    attributes = {key: op.node_def.attr[key] for key in op.node_def.attr if not key.startswith("_")}
    created = graph.create_op(op.type, list(inputs), [t.dtype for t in op.outputs], attrs=attributes)
    record_on_tapes([created])  # training differentiates the series with respect to the weights (`derivcli.training`)
    return list(created.outputs)


def _is_float(tensor: Any) -> bool:
    return tensor.dtype.is_floating


def _carries_values(tensor: Any) -> bool:
    """Whether a tensor can carry values that vary with the input: floats, and variants
    (a TensorList holds a recurrent layer's time steps). Shapes, indices and booleans cannot."""
    return tensor.dtype.is_floating or tensor.dtype == tf.variant


class TaylorProgram:
    """A model's frozen graph, through which Taylor series are pushed.

    Build it with `TaylorProgram.trace(function, dimension, dtype)`; it raises
    NotCovered when an op that varies with the input has no rule.
    """

    def __init__(self, ops: list[Any], source: str, target: str, parameters: Sequence[tuple[str, Any]] = ()) -> None:
        self.ops = ops
        self.source = source
        self.target = target
        self.parameters = list(parameters)  # a live function's variables (`FrozenFunction.parameters`)

    @classmethod
    def trace(cls, function: Callable[[tf.Tensor], tf.Tensor], dimension: int, dtype: str) -> TaylorProgram:
        """The program of `function` on (None, dimension) inputs of `dtype`."""
        from derivcli.engine.graph import freeze

        return cls.from_frozen(freeze(function, dimension, dtype))

    @classmethod
    def from_frozen(cls, frozen: FrozenFunction) -> TaylorProgram:
        """The program of a frozen model (`engine.graph.freeze`), whose gradient conventions are already gone."""
        source, target = frozen.source, frozen.target
        ops = _ancestors(frozen.operations(), target)
        varying = {source}
        for op in ops:
            if op.type == "Placeholder" or not any(t.name in varying for t in op.inputs):
                continue
            if op.type in LOOP_OPS or op.type.startswith("TensorList"):
                raise NotCovered(
                    f"op {op.type} ({op.name}), a loop such as a recurrent layer's; "
                    "recurrent layers built with unroll=True are covered"
                )
            if any(_carries_values(t) for t in op.outputs) and op.type not in COVERED_OPS - {"NoOp"}:
                raise NotCovered(f"op {op.type} ({op.name})")
            if op.type in POOLING_OPS and op.get_attr("data_format") != b"NHWC":
                raise NotCovered(f"op {op.type} ({op.name}) in {op.get_attr('data_format').decode()} layout")
            if op.type not in CONSTANT_OPS:
                varying.update(t.name for t in op.outputs if _carries_values(t))
        return cls(ops, source, target, frozen.parameters)

    @tf.autograph.experimental.do_not_convert  # plain Python loops over ops: nothing for AutoGraph to convert
    def series(self, coordinates: tf.Tensor, directions: tf.Tensor, order: int) -> Series:
        """The output's coefficients 0..order along each row of `directions` (P, D).

        Coefficient 0 is the output, (batch, M); coefficient k >= 1 is (P, batch, M).
        """
        tangent = tf.broadcast_to(directions[:, None, :], [directions.shape[0], *_shape(coordinates)])
        start = (coordinates, tangent) + (tf.zeros_like(tangent),) * (order - 1)
        return _Pusher(int(directions.shape[0]), collapsed=False).run(self, start[: order + 1])

    @tf.autograph.experimental.do_not_convert
    def laplacian(self, coordinates: tf.Tensor, positions: Sequence[int]) -> tf.Tensor:
        """The Laplacian over input `positions` of every output, (batch, M), by the Forward Laplacian."""
        directions = tf.one_hot(list(positions), int(coordinates.shape[1]), dtype=coordinates.dtype)
        tangent = tf.broadcast_to(directions[:, None, :], [len(positions), *_shape(coordinates)])
        result = _Pusher(len(positions), collapsed=True).run(self, (coordinates, tangent, tf.zeros_like(coordinates)))
        return 2.0 * result[2]


def _shape(tensor: tf.Tensor) -> list[Any]:
    return [d if d is not None else tf.shape(tensor)[i] for i, d in enumerate(tensor.shape.as_list())]


def _coefficient(value: Value, k: int) -> tf.Tensor:
    """Coefficient k of a value; a plain value has zeros beyond coefficient 0."""
    if isinstance(value, tuple):
        return value[k]
    return value if k == 0 else tf.zeros_like(value)


def _ancestors(ops: list[Any], target: str) -> list[Any]:
    """The ops `target` depends on, in graph order (a topological order for a frozen graph)."""
    by_output = {t.name: op for op in ops for t in op.outputs}
    needed: set[str] = set()
    stack = [by_output[target]]
    while stack:
        op = stack.pop()
        if op.name in needed:
            continue
        needed.add(op.name)
        stack.extend(by_output[t.name] for t in op.inputs)
    return [op for op in ops if op.name in needed]


class _Pusher:
    """Pushes series through a program; `collapsed` sums coefficient 2 over the directions."""

    def __init__(self, directions: int, collapsed: bool) -> None:
        self.directions = directions
        self.collapsed = collapsed

    def run(self, program: TaylorProgram, start: Series) -> Series:
        self.order = len(start) - 1
        env: dict[str, Value] = {program.source: start}
        # A live function's variables are read where the frozen graph holds their values.
        env.update(read_parameters(program.parameters))
        for op in program.ops:
            if op.type == "Placeholder" or not op.outputs or op.outputs[0].name in env:
                continue
            inputs = [env[t.name] for t in op.inputs]
            if not any(isinstance(v, tuple) for v in inputs) or op.type in CONSTANT_OPS \
                    or not any(_is_float(t) for t in op.outputs):
                outputs = _execute(op, [_coefficient(v, 0) for v in inputs])
            else:
                outputs = self.rule(op, inputs)
            for tensor, value in zip(op.outputs, outputs):
                env[tensor.name] = value
        result = env[program.target]
        if isinstance(result, tuple):
            return result
        # The output does not vary: its coefficients beyond 0 are zeros.
        with_axis = tf.zeros(tf.concat([[self.directions], tf.shape(result)], 0), result.dtype)
        return (result,) + tuple(with_axis if self.has_axis(k) else tf.zeros_like(result) for k in range(1, self.order + 1))

    # -- coefficients with and without the axis of directions --

    def has_axis(self, k: int) -> bool:
        """Whether coefficient k carries the leading axis of directions."""
        return k >= 1 and not (self.collapsed and k >= 2)

    def apply(self, op: Any, arguments: Sequence[tf.Tensor], axes: Sequence[bool]) -> list[tf.Tensor]:
        """Runs `op` on arguments of which those marked in `axes` carry a leading axis of directions."""
        if not any(axes):
            return _execute(op, arguments)
        rank = max(a.shape.rank for a, axis in zip(arguments, axes) if axis) - 1
        if op.type in BROADCASTING_OPS and all(axis or a.shape.rank <= rank for a, axis in zip(arguments, axes)):
            return _execute(op, arguments)
        if op.type == "MatMul" and axes[0] and not axes[1] and not op.get_attr("transpose_a"):
            # One (P * batch, n) GEMM: much faster than P small ones.
            left = arguments[0]
            folded = tf.reshape(left, [-1, tf.shape(left)[-1]])
            (product,) = _execute(op, [folded, arguments[1]])
            return [tf.reshape(product, tf.concat([tf.shape(left)[:-1], tf.shape(product)[-1:]], 0))]
        per_direction = [
            _execute(op, [a[p] if axis else a for a, axis in zip(arguments, axes)]) for p in range(self.directions)
        ]
        return [tf.stack(list(outputs)) for outputs in zip(*per_direction)]

    def times(self, a: tf.Tensor, i: int, b: tf.Tensor, j: int, op: Any = None) -> tf.Tensor:
        """The product of coefficient i of one series and j of another (by `op`, else elementwise)."""
        if op is None:
            product = a * b
        else:
            (product,) = self.apply(op, [a, b], [self.has_axis(i), self.has_axis(j)])
        if self.collapsed and self.has_axis(i) and self.has_axis(j):
            product = tf.reduce_sum(product, axis=0)
        return product

    def cauchy(self, a: Series, b: Series, k: int, op: Any = None) -> tf.Tensor:
        """Coefficient k of the product of two series."""
        return tf.add_n([self.times(a[j], j, b[k - j], k - j, op) for j in range(k + 1)])

    def compose(self, u: Series, first: tf.Tensor, derivative: Callable[[list[tf.Tensor], int], tf.Tensor]) -> Series:
        """s = f(u) with s' = g(u) u', from s_0 = f(u_0) and g_k as a function of s_0..s_k."""
        s, g = [first], [derivative([first], 0)]
        for k in range(1, len(u)):
            terms = [_scaled(self.times(u[j], j, g[k - j], k - j), j) for j in range(1, k + 1)]
            s.append(_scaled(tf.add_n(terms), 1 / k))
            if k < len(u) - 1:
                g.append(derivative(s, k))
        return tuple(s)

    def divide(self, a: Value, b: Series, first: tf.Tensor) -> Series:
        """q = a / b: q_k = (a_k - sum_{j=1..k} q_{k-j} b_j) / b_0."""
        q = [first]
        for k in range(1, len(b)):
            numerator = tf.add_n([self.times(q[k - j], k - j, b[j], j) for j in range(1, k + 1)])
            numerator = a[k] - numerator if isinstance(a, tuple) else -numerator
            q.append(numerator / b[0])
        return tuple(q)

    def power(self, u: Series, p: float, first: tf.Tensor) -> Series:
        """s = u^p: s_k = (1 / (k u_0)) sum_{j=1..k} (p j - (k - j)) u_j s_{k-j}; integer p by products."""
        if float(p).is_integer() and 0 <= p <= 8:
            result: Series = (tf.ones_like(u[0]),) + tuple(tf.zeros_like(c) for c in u[1:])
            for _ in range(int(p)):
                result = tuple(self.cauchy(result, u, k) for k in range(len(u)))
            return (first,) + result[1:]
        s = [first]
        for k in range(1, len(u)):
            terms = [self.times(u[j], j, s[k - j], k - j) * (p * j - (k - j)) for j in range(1, k + 1)]
            s.append(tf.add_n(terms) / (k * u[0]))
        return tuple(s)

    def exp_series(self, u: Series) -> Series:
        return self.compose(u, tf.exp(u[0]), lambda s, k: s[k])

    # -- the rules --

    def rule(self, op: Any, inputs: list[Value]) -> list[Value]:
        kind = op.type
        if kind in AFFINE_OPS:
            return [self.affine(op, inputs)]
        if kind in LINEAR_OPS:
            return self.linear(op, inputs)
        if kind in BILINEAR_OPS:
            return [self.bilinear(op, inputs)]
        if kind in DIVISION_OPS:
            a, b = inputs
            if not isinstance(b, tuple):
                return [tuple(self.apply(op, [c, b], [self.has_axis(k), False])[0] for k, c in enumerate(a))]
            first = _execute(op, [_coefficient(a, 0), b[0]])[0]
            return [self.divide(a, b, first)]
        if kind in SOFTMAX_OPS:
            return [self.softmax(op, inputs[0])]
        if kind in SORTING_OPS:
            return self.top_k(op, inputs)
        if kind in POOLING_OPS:
            return [self.max_pool(op, inputs[0])]
        unary = kind not in ("Maximum", "Minimum", "SquaredDifference") and not any(
            isinstance(v, tuple) for v in inputs[1:])
        if self.collapsed and unary:
            return [self.collapsed_unary(op, inputs)]
        if kind in PIECEWISE_OPS:
            return [self.piecewise(op, inputs)]
        return [self.smooth(op, inputs)]

    def collapsed_unary(self, op: Any, inputs: list[Value]) -> Series:
        """s = f(u) to order 2, summed over directions: s_1 = f' u_1, s_2 = f' u_2 + f''/2 sum_p u_1p^2.

        f' and f''/2 are the series of f at u_0 along a unit step, on (batch, ...)
        tensors: the elementwise work on the directions is three passes.
        """
        u = inputs[0]
        step = _Pusher(1, collapsed=False)
        step.order = 2
        unit = (u[0], tf.ones_like(u[0])[None], tf.zeros_like(u[0])[None])
        rule = step.piecewise if op.type in PIECEWISE_OPS else step.smooth
        value, slope, curvature = rule(op, [unit, *inputs[1:]])
        slope, curvature = slope[0], curvature[0]
        return value, slope * u[1], slope * u[2] + curvature * tf.reduce_sum(u[1] * u[1], axis=0)

    def affine(self, op: Any, inputs: list[Value]) -> Series:
        """Add, Sub, BiasAdd: a constant operand adds to coefficient 0 only."""
        a, b = inputs
        result = [_execute(op, [_coefficient(a, 0), _coefficient(b, 0)])[0]]
        for k in range(1, self.order + 1):
            if isinstance(a, tuple) and isinstance(b, tuple):
                (value,) = self.apply(op, [a[k], b[k]], [self.has_axis(k)] * 2)
            elif isinstance(a, tuple) and (op.type == "BiasAdd" or _keeps_shape(a[0], b)):
                value = a[k]  # a + c and a - c: the constant only shifts coefficient 0
            elif isinstance(b, tuple) and op.type != "BiasAdd" and _keeps_shape(b[0], a):
                value = -b[k] if op.type == "Sub" else b[k]
            else:  # the constant broadcasts the series to a larger shape: add zeros of its shape
                arguments = [v[k] if isinstance(v, tuple) else tf.zeros_like(v) for v in inputs]
                (value,) = self.apply(op, arguments, [isinstance(v, tuple) and self.has_axis(k) for v in inputs])
            result.append(value)
        return tuple(result)

    def linear(self, op: Any, inputs: list[Value]) -> list[Value]:
        """An op linear in its float inputs: coefficient k of the result is the op on coefficients k."""
        coefficients = []
        for k in range(self.order + 1):
            arguments, axes = [], []
            for value in inputs:
                if isinstance(value, tuple):
                    arguments.append(value[k])
                    axes.append(self.has_axis(k))
                else:
                    arguments.append(tf.zeros_like(value) if k and _is_float(value) else value)
                    axes.append(False)
            coefficients.append(self.apply(op, arguments, axes))
        return [tuple(c) if _is_float(t) else c[0] for t, c in zip(op.outputs, zip(*coefficients))]

    def bilinear(self, op: Any, inputs: list[Value]) -> Series:
        a, b = inputs[0], inputs[1]
        if isinstance(a, tuple) and isinstance(b, tuple):
            return tuple(self.cauchy(a, b, k, op) for k in range(self.order + 1))
        if isinstance(a, tuple):
            return tuple(self.apply(op, [c, b], [self.has_axis(k), False])[0] for k, c in enumerate(a))
        return tuple(self.apply(op, [a, c], [False, self.has_axis(k)])[0] for k, c in enumerate(b))

    def piecewise(self, op: Any, inputs: list[Value]) -> Series:
        """Away from its kinks the op is linear on the branch that coefficient 0 takes."""
        values = [_coefficient(v, 0) for v in inputs]
        first = _execute(op, values)[0]
        kind = op.type
        if kind in ("Maximum", "Minimum"):
            pick = values[0] >= values[1] if kind == "Maximum" else values[0] <= values[1]
            a, b = inputs
            return (first,) + tuple(
                tf.where(pick, _coefficient(a, k), _coefficient(b, k)) for k in range(1, self.order + 1)
            )
        u = inputs[0]
        x = values[0]
        if kind == "Relu":
            slope = tf.cast(x > 0, x.dtype)
        elif kind == "Relu6":
            slope = tf.cast((x > 0) & (x < 6), x.dtype)
        elif kind == "LeakyRelu":
            slope = tf.where(x > 0, tf.ones_like(x), tf.cast(op.get_attr("alpha"), x.dtype) * tf.ones_like(x))
        elif kind == "Abs":
            slope = tf.sign(x)
        else:  # ClipByValue
            slope = tf.cast((x > values[1]) & (x < values[2]), x.dtype)
        return (first,) + tuple(slope * u[k] for k in range(1, self.order + 1))

    def smooth(self, op: Any, inputs: list[Value]) -> Series:
        kind = op.type
        values = [_coefficient(v, 0) for v in inputs]
        first = _execute(op, values)[0]
        u = inputs[0]
        if kind == "Pow":
            if isinstance(inputs[1], tuple):
                raise NotCovered("Pow with a varying exponent")
            exponent = tf.get_static_value(inputs[1])
            if exponent is None or np.size(exponent) != 1:
                raise NotCovered("Pow with an exponent that is not one constant")
            return self.power(u, float(np.reshape(exponent, ())), first)
        if kind == "SquaredDifference":
            a, b = inputs
            difference = tuple(_coefficient(a, k) - _coefficient(b, k) for k in range(self.order + 1))
            return (first,) + tuple(self.cauchy(difference, difference, k) for k in range(1, self.order + 1))
        one = 1.0
        if kind == "Tanh":  # tanh' = 1 - tanh^2
            return self.compose(u, first, lambda s, k: (one if k == 0 else 0.0) - self.cauchy(s, s, k))
        if kind == "Sigmoid":  # sigmoid' = s (1 - s)
            return self.compose(u, first, lambda s, k: s[k] - self.cauchy(s, s, k))
        if kind == "Exp":
            return self.exp_series(u)
        if kind == "Expm1":  # (e^u - 1)' = e^u
            return self.compose(u, first, lambda s, k: s[k] + (one if k == 0 else 0.0))
        if kind == "Softplus":  # softplus' = sigmoid
            sigmoid = self.compose(u, tf.sigmoid(u[0]), lambda s, k: s[k] - self.cauchy(s, s, k))
            return self.compose(u, first, lambda s, k: sigmoid[k])
        if kind in ("Sin", "Cos"):
            sin, cos = [tf.sin(u[0])], [tf.cos(u[0])]
            for k in range(1, len(u)):
                sin.append(tf.add_n([self.times(u[j], j, cos[k - j], k - j) * float(j) for j in range(1, k + 1)]) / k)
                cos.append(-tf.add_n([self.times(u[j], j, sin[k - j], k - j) * float(j) for j in range(1, k + 1)]) / k)
            return (first,) + tuple(sin[1:] if kind == "Sin" else cos[1:])
        if kind in ("Log", "Log1p"):
            return self.log_series(u, first, u[0] + 1.0 if kind == "Log1p" else u[0])
        if kind == "Sqrt":
            return self.square_root(u, first)
        if kind == "Rsqrt":
            return self.divide(None, self.square_root(u, tf.sqrt(u[0])), first)
        if kind in ("Reciprocal", "Inv"):
            return self.divide(None, u, first)
        if kind == "Square":
            return (first,) + tuple(self.cauchy(u, u, k) for k in range(1, len(u)))
        if kind in ("Erf", "Erfc"):  # erf' = 2 / sqrt(pi) exp(-u^2)
            gauss = self.exp_series(tuple(-self.cauchy(u, u, k) for k in range(len(u))))
            scale = 2.0 / math.sqrt(math.pi) * (1.0 if kind == "Erf" else -1.0)
            return self.compose(u, first, lambda s, k: scale * gauss[k])
        if kind in ("Elu", "Selu"):
            scale, alpha = (1.0507009873554804934193349852946, 1.6732632423543772848170429916717) \
                if kind == "Selu" else (1.0, 1.0)
            positive = u[0] > 0
            exp = self.exp_series(u)
            return (first,) + tuple(
                tf.where(positive, scale * u[k], scale * alpha * exp[k]) for k in range(1, len(u))
            )
        if kind == "Softsign":  # u / (1 + |u|)
            sign = tf.sign(u[0])
            denominator = (1.0 + tf.abs(u[0]),) + tuple(sign * c for c in u[1:])
            return self.divide(u, denominator, first)
        raise NotCovered(f"op {kind}")

    def log_series(self, u: Series, first: tf.Tensor, base: tf.Tensor) -> Series:
        """s = log(u) (log1p with `base` = 1 + u_0): u s' = u', so s_k = (u_k - (1/k) sum_{j=1..k-1} (k-j) u_j s_{k-j}) / u_0."""
        s = [first]
        for k in range(1, len(u)):
            cross = [self.times(u[j], j, s[k - j], k - j) * ((k - j) / k) for j in range(1, k)]
            s.append((u[k] - tf.add_n(cross) if cross else u[k]) / base)
        return tuple(s)

    def softmax(self, op: Any, u: Series) -> Series:
        """softmax(u) = e / sum(e) with e = exp(u - max u_0) over the last axis; log_softmax(u) = u - max u_0 - log sum(e).

        The shift by the row's maximum (a constant along every direction) leaves both
        functions unchanged and keeps exp from overflowing, as TensorFlow's kernels do.
        """
        first = _execute(op, [u[0]])[0]
        shifted = (u[0] - tf.reduce_max(u[0], axis=-1, keepdims=True),) + tuple(u[1:])
        exponentials = self.exp_series(shifted)
        total = tuple(tf.reduce_sum(c, axis=-1, keepdims=True) for c in exponentials)
        if op.type == "Softmax":
            return self.divide(exponentials, total, first)
        log_total = self.log_series(total, tf.math.log(total[0]), total[0])
        return (first,) + tuple(c - log_c for c, log_c in zip(shifted[1:], log_total[1:]))

    def top_k(self, op: Any, inputs: list[Value]) -> list[Value]:
        """The k largest entries of the last axis: every coefficient is permuted as coefficient 0 is."""
        u, count = inputs
        values, indices = _execute(op, [u[0], count])

        def permuted(coefficient: tf.Tensor) -> tf.Tensor:
            chosen = indices
            if coefficient.shape.rank > indices.shape.rank:  # the axis of directions
                chosen = tf.broadcast_to(indices[None], tf.concat([tf.shape(coefficient)[:1], tf.shape(indices)], 0))
            return tf.gather(coefficient, chosen, batch_dims=coefficient.shape.rank - 1)

        return [(values,) + tuple(permuted(c) for c in u[1:]), indices]

    def max_pool(self, op: Any, u: Series) -> Series:
        """Each window's largest entry: every coefficient is taken where coefficient 0's maximum is (the first of
        equal ones, as the pooling's gradient takes it; the maximum has no derivative at a tie)."""
        values, argmax = tf.nn.max_pool_with_argmax(
            u[0], op.get_attr("ksize"), op.get_attr("strides"), op.get_attr("padding").decode(),
            include_batch_in_index=True)

        def picked(coefficient: tf.Tensor) -> tf.Tensor:
            if coefficient.shape.rank > u[0].shape.rank:  # the axis of directions
                flat = tf.reshape(coefficient, [tf.shape(coefficient)[0], -1])
                return tf.gather(flat, argmax, axis=1)
            return tf.gather(tf.reshape(coefficient, [-1]), argmax)

        return (values,) + tuple(picked(c) for c in u[1:])

    def square_root(self, u: Series, first: tf.Tensor) -> Series:
        """s^2 = u: s_k = (u_k - sum_{j=1..k-1} s_j s_{k-j}) / (2 s_0)."""
        s = [first]
        for k in range(1, len(u)):
            cross = [self.times(s[j], j, s[k - j], k - j) for j in range(1, k)]
            s.append((u[k] - tf.add_n(cross) if cross else u[k]) / (2.0 * first))
        return tuple(s)


def _scaled(tensor: tf.Tensor, factor: float) -> tf.Tensor:
    """`tensor * factor`, without an elementwise pass when the factor is 1."""
    return tensor if factor == 1 else tensor * factor


def _keeps_shape(series_value: tf.Tensor, other: Value) -> bool:
    """Whether adding `other` to a value of this shape leaves the shape as it is (statically known)."""
    other_value = other[0] if isinstance(other, tuple) else other
    mine, theirs = series_value.shape, other_value.shape
    if mine.rank is None or theirs.rank is None or theirs.rank > mine.rank:
        return False
    for a, b in zip(reversed(mine.as_list()), reversed(theirs.as_list())):
        if b not in (1, a) or (a is None and b is None):
            return False
    return True


@functools.cache
def interpolation_rule(index: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...]]:
    """Directions and weights that give a mixed partial from pure directional derivatives.

    For |index| = n over the inputs S it uses, D_j^n y = sum_{|b| = n} n!/b! j^b d^b y
    holds for every integer direction j over S with |j| = n. These directions make
    the system square and invertible (Griewank, Utke and Walther, Math. Comp. 2000),
    so d^index y = sum_j w_j D_j^n y with w the row of the inverse for `index`,
    solved here in exact rational arithmetic.

    Returns:
        (directions over all inputs, weights), the directions with a zero weight left out.
    """
    support = [i for i, power in enumerate(index) if power]
    n = sum(index)
    basis = list(compositions(n, len(support)))
    vectors = interpolation_directions(n, support, len(index))
    target = basis.index(tuple(index[i] for i in support))

    def entry(j: tuple[int, ...], b: tuple[int, ...]) -> Fraction:
        return Fraction(math.factorial(n), math.prod(map(math.factorial, b))) * math.prod(
            Fraction(x) ** p for x, p in zip(j, b))

    # Solve M^T w = e_target, M[j][b] = entry(j, b), by Gauss-Jordan elimination.
    size = len(basis)
    rows = [[entry(j, b) for j in basis] + [Fraction(int(k == target))] for k, b in enumerate(basis)]
    for column in range(size):
        pivot = next(r for r in range(column, size) if rows[r][column])
        rows[column], rows[pivot] = rows[pivot], rows[column]
        rows[column] = [value / rows[column][column] for value in rows[column]]
        for r in range(size):
            if r != column and rows[r][column]:
                factor = rows[r][column]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[column])]
    directions, weights = [], []
    for vector, row in zip(vectors, rows):
        if row[size]:
            directions.append(vector)
            weights.append(float(row[size]))
    return tuple(directions), tuple(weights)


def interpolation_directions(order: int, support: Sequence[int], dimension: int) -> list[tuple[int, ...]]:
    """The integer directions over the inputs `support` whose components sum to `order`,
    as vectors over all `dimension` inputs, in the order of `compositions`."""
    directions = []
    for composition in compositions(order, len(support)):
        vector = [0] * dimension
        for i, component in zip(support, composition):
            vector[i] = component
        directions.append(tuple(vector))
    return directions


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every tuple of `parts` non-negative integers summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)
