"""Nested reverse-mode derivatives of any order, compiled once per run.

The kernel differentiates `f: (batch, D) -> (batch, M)` inside one
`tf.function` with a fixed input signature, so it is traced once and then
runs whole batches. Per-sample derivatives come from differentiating the sum
over the batch, which is exact because the samples of a batch are
independent (see `derivcli.diagnose` for the check of that assumption).

Every derivative is reached from a lower one by one more gradient; each
gradient is taken once and shared between all columns that need it, so
d2y/dx^2 and d3y/dx^2dt both reuse dy/dx.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from derivcli.engine.taylor import TaylorProgram
from derivcli.errors import RunError

MultiIndex = tuple[int, ...]


# Interpolation needs a direction per composition of the order over the inputs a
# partial involves: C(n + s - 1, s - 1) of them, too many beyond three inputs.
MAX_INTERPOLATED_INPUTS = 3


def interpolates(index: MultiIndex, interpolate_from: int | None) -> bool:
    """Whether the mixed partial `index` comes from Taylor series along several directions."""
    inputs = sum(map(bool, index))
    return interpolate_from is not None and 2 <= inputs <= MAX_INTERPOLATED_INPUTS and sum(index) >= interpolate_from


@dataclass(frozen=True)
class Column:
    """One requested quantity of one output.

    Attributes:
        output: the output's position in the flattened outputs.
        partial: how often each input is differentiated; all zeros is the value.
        laplacian_over: for a Laplacian, the input positions it sums over.
        along: for a derivative along a vector (`--direction`), the vector.
        along_order: the order of that derivative.
    """

    output: int
    partial: MultiIndex = ()
    laplacian_over: tuple[int, ...] | None = None
    along: tuple[float, ...] | None = None
    along_order: int = 0
    block: tuple[int, ...] | None = None  # a gradient block: the first derivatives along these inputs, one column each

    @property
    def order(self) -> int:
        """The derivative's order: 2 for a Laplacian, 1 for a gradient block."""
        if self.block is not None:
            return 1
        return sum(self.partial) + self.along_order + 2 * (self.laplacian_over is not None)

    @property
    def width(self) -> int:
        """How many value columns it fills: a gradient block one per input."""
        return len(self.block) if self.block is not None else 1


def undefined_where_not_finite(derivative: tf.Tensor, *lower: tf.Tensor) -> tf.Tensor:
    """`derivative`, NaN at the points where a lower-order derivative (or the value) it builds on is NaN or Inf.

    Reverse mode turns a NaN into a confident 0 through piecewise ops (ReluGrad
    passes nothing where its input is NaN); a derivative of a quantity that is
    not finite is not defined. `lower` tensors of rank 2 (directions, batch) count
    a point as undefined when any of its directions is.
    """
    finite = None
    for tensor in lower:
        mask = tf.math.is_finite(tensor)
        if mask.shape.rank == 2:
            mask = tf.reduce_all(mask, axis=0)
        finite = mask if finite is None else finite & mask
    if finite is None:
        return derivative
    return tf.where(finite, derivative, tf.constant(float("nan"), derivative.dtype))


class DerivativeGraph:
    """Memoized derivatives of the outputs, built inside one traced function."""

    def __init__(
        self, coordinates: tf.Tensor, values: tf.Tensor, taylor: TaylorProgram | None = None,
        interpolate_from: int | None = None,
    ) -> None:
        self.coordinates = coordinates
        self.values = values
        self.dimension = int(coordinates.shape[1])
        self.derivatives: dict[tuple[int, MultiIndex], tf.Tensor] = {}
        self.gradients: dict[tuple[int, MultiIndex], tf.Tensor] = {}
        # Pure derivatives of order >= 2 come from Taylor series when the model is covered.
        self.taylor = taylor
        # Mixed partials of this order and above come from Taylor series along several directions.
        self.interpolate_from = interpolate_from
        self.series: dict[Any, list[tf.Tensor]] = {}
        self.laplacians: dict[tuple[int, ...], tf.Tensor] = {}
        self.along: dict[tuple[int, tuple[float, ...], int], tf.Tensor] = {}

    def gradient(self, output: int, index: MultiIndex) -> tf.Tensor:
        """The gradient (batch, D) of the derivative `index` of `output`."""
        key = (output, index)
        if key not in self.gradients:
            self.gradients[key] = tf.gradients(
                self.derivative(output, index),
                self.coordinates,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )[0]
        return self.gradients[key]

    def derivative(self, output: int, index: MultiIndex) -> tf.Tensor:
        """The derivative `index` of `output`, shape (batch,)."""
        index = tuple(index) if index else (0,) * self.dimension
        key = (output, index)
        if key in self.derivatives:
            return self.derivatives[key]
        pure = [p for p, power in enumerate(index) if power]
        if not any(index):
            result = self.values[:, output]
        elif self.taylor is not None and len(pure) == 1 and index[pure[0]] >= 2 \
                and (output, self._lower(index, pure[0])) not in self.gradients:
            # A pure derivative whose last gradient the tapes have not already taken.
            result = self.taylor_derivative(output, pure[0], index[pure[0]])
        elif self.taylor is not None and interpolates(index, self.interpolate_from):
            result = self.interpolated(output, index)
        else:
            position = self._predecessor(output, index)
            lower = list(index)
            lower[position] -= 1
            result = undefined_where_not_finite(
                self.gradient(output, tuple(lower))[:, position], self.derivative(output, tuple(lower)))
        self.derivatives[key] = result
        return result

    def taylor_derivative(self, output: int, position: int, order: int) -> tf.Tensor:
        """d^order y / dx_position^order = order! y_order, from one series per input."""
        return self._series(tf.one_hot([position], self.dimension, dtype=self.coordinates.dtype), position, order, output)

    def _series(self, direction: tf.Tensor, key: Any, order: int, output: int) -> tf.Tensor:
        """order! times coefficient `order` of the series along `direction` (1, D), one series per key."""
        assert self.taylor is not None
        if len(self.series.get(key, [])) <= order:
            self.series[key] = list(self.taylor.series(self.coordinates, direction, order))
        coefficients = self.series[key]
        lower = [coefficients[0][:, output]] + [coefficients[k][0, :, output] for k in range(1, order)]
        return undefined_where_not_finite(coefficients[order][0, :, output] * float(math.factorial(order)), *lower)

    def interpolated(self, output: int, index: MultiIndex) -> tf.Tensor:
        """A mixed partial as a weighted sum of pure derivatives along integer directions.

        All the partials of one order over the same inputs share one series with
        a direction per composition of the order (`taylor.interpolation_rule`).
        """
        from derivcli.engine.taylor import interpolation_directions, interpolation_rule

        order = sum(index)
        support = tuple(p for p, power in enumerate(index) if power)
        key = ("interpolation", order, support)
        if key not in self.series:
            vectors = interpolation_directions(order, support, self.dimension)
            directions = tf.constant(vectors, dtype=self.coordinates.dtype)
            self.series[key] = [vectors, self.taylor.series(self.coordinates, directions, order)[order]]
        vectors, coefficients = self.series[key]
        directions, weights = interpolation_rule(index)
        # D_j^n y = n! times coefficient n of the series along j.
        scale = float(math.factorial(order))
        return undefined_where_not_finite(tf.add_n([
            (weight * scale) * coefficients[vectors.index(direction), :, output]
            for direction, weight in zip(directions, weights)
        ]), self.values[:, output])

    def directional(self, output: int, vector: tuple[float, ...], order: int) -> tf.Tensor:
        """The order-th derivative along `vector`: a Taylor series, or `order` gradients each dotted with it."""
        direction = tf.constant([vector], dtype=self.coordinates.dtype)
        if self.taylor is not None and order >= 2:
            return self._series(direction, vector, order, output)
        key = (output, vector, order)
        if key not in self.along:
            if order == 1:
                gradient = self.gradient(output, (0,) * self.dimension)
            else:
                gradient = tf.gradients(self.directional(output, vector, order - 1), self.coordinates,
                                        unconnected_gradients=tf.UnconnectedGradients.ZERO)[0]
            lower = self.values[:, output] if order == 1 else self.directional(output, vector, order - 1)
            self.along[key] = undefined_where_not_finite(tf.reduce_sum(gradient * direction, axis=1), lower)
        return self.along[key]

    @staticmethod
    def _lower(index: MultiIndex, position: int) -> MultiIndex:
        return tuple(k - (q == position) for q, k in enumerate(index))

    def _predecessor(self, output: int, index: MultiIndex) -> int:
        """Which input to differentiate last: the one that reuses the most work."""
        candidates = [p for p, power in enumerate(index) if power]
        lowers = {p: self._lower(index, p) for p in candidates}
        for table in (self.gradients, self.derivatives):
            for p in candidates:
                if (output, lowers[p]) in table:
                    return p
        return candidates[-1]

    def laplacian(self, output: int, positions: Sequence[int]) -> tf.Tensor:
        """The sum of the pure second derivatives over `positions`.

        With a Taylor program, the Forward Laplacian computes it for every output
        in one pass, with no Hessian; else the Hessian's diagonal by tapes.
        """
        if self.taylor is not None:
            key = tuple(positions)
            if key not in self.laplacians:
                self.laplacians[key] = self.taylor.laplacian(self.coordinates, positions)
            return undefined_where_not_finite(self.laplacians[key][:, output], self.values[:, output])
        terms = []
        for p in positions:
            index = [0] * self.dimension
            index[p] = 2
            terms.append(self.derivative(output, tuple(index)))
        return tf.add_n(terms)

    def block(self, output: int, positions: tuple[int, ...]) -> tf.Tensor:
        """First derivatives of `output` along `positions`, (batch, len(positions)): one gradient, no column per input
        (a 224x224x3 image's gradient is 150,528 columns)."""
        gradient = self.gradient(output, (0,) * self.dimension)
        if positions != tuple(range(self.dimension)):
            gradient = tf.gather(gradient, list(positions), axis=1)
        finite = tf.math.is_finite(self.values[:, output])[:, None]
        return tf.where(finite, gradient, tf.constant(float("nan"), gradient.dtype))

    def column(self, column: Column) -> tf.Tensor:
        if column.block is not None:
            return self.block(column.output, column.block)
        if column.along is not None:
            return self.directional(column.output, column.along, column.along_order)
        if column.laplacian_over is not None:
            return self.laplacian(column.output, column.laplacian_over)
        return self.derivative(column.output, column.partial)


class DerivativeKernel:
    """All requested columns for a batch of points, in one compiled function.

    Args:
        function: the model, (batch, D) -> (batch, M), traceable by TensorFlow.
        dimension: D, the number of scalar inputs.
        columns: the quantities to compute, in output order.
        dtype: the compute dtype, `float32` or `float64`.
        device: a TensorFlow device string, or None for TensorFlow's choice.
        combine: optional function of the DerivativeGraph returning extra
            (batch,) tensors appended after `columns` (operator expressions).
        taylor: the model as a Taylor program (`engine.taylor`), to take pure
            derivatives of order >= 2 and Laplacians from Taylor series; None for tapes only.
        xla_from: run full batches from this batch of the run on with XLA (plain graphs
            where XLA fails); None for never. XLA is compiled when its first batch arrives.
        interpolate_from: mixed partials of this total order and above come from Taylor
            series along several directions (`taylor.interpolation_rule`); None for never.
        batch_size: the run's batch size; XLA is compiled for batches of exactly this many
            points (it compiles once per shape) and the others run plain.

    Which batches use XLA depends only on their place in the run (`batch_index`),
    never on timing, so a run's output is the same bits every time, and a shard's
    are the unsharded run's.

    Example:
        >>> kernel = DerivativeKernel(model.call_flat, 1, [Column(0, (1,))], "float32")
        >>> kernel(np.array([[0.5]]))  # dy/dx at x = 0.5
    """

    engine = ""  # which engine serves, and why not Taylor series where they were wanted (`run.make_kernel`)
    refused = ""  # why Taylor series, wanted, do not serve: the op they do not cover

    def __init__(
        self,
        function: Callable[[tf.Tensor], tf.Tensor],
        dimension: int,
        columns: Sequence[Column],
        dtype: str,
        device: str | None = None,
        combine: Callable[[DerivativeGraph], list[tf.Tensor]] | None = None,
        taylor: TaylorProgram | None = None,
        xla_from: int | None = None,
        interpolate_from: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.function = function
        self.taylor = taylor
        self.interpolate_from = interpolate_from
        self.columns = list(columns)
        self.dtype = dtype
        self.device = device
        self.combine = combine
        self.dimension = dimension
        # A concrete function is called without matching a signature: 0.1-0.4 ms less per batch.
        self.plain: Any = None
        # XLA, for batches of `batch_size` points from batch `xla_from` on: None until compiled,
        # False where XLA failed.
        self.xla_from = None if batch_size is None else xla_from
        self.batch_size = batch_size
        self.xla: Any = None
        self.calls = 0

    def compute(self, coordinates: tf.Tensor) -> tf.Tensor:
        """The columns of a (batch, D) tensor as ops of the graph being traced, (batch, columns).

        The kernel's compiled functions trace it; a training step (`derivcli.training`) calls it in its own trace.
        """
        # AutoGraph converts the model's own code (a custom layer may branch on tensors)...
        return self._derivatives(coordinates, self.function(coordinates))

    @tf.autograph.experimental.do_not_convert  # ...but not derivcli's, whose loops run at trace time
    def _derivatives(self, coordinates: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        graph = DerivativeGraph(coordinates, values, self.taylor, self.interpolate_from)
        # Mixed partials first: the gradients they take also give pure derivatives for free.
        order = sorted(range(len(self.columns)), key=lambda j: sum(map(bool, self.columns[j].partial)) < 2)
        computed = {j: graph.column(self.columns[j]) for j in order}
        results = [computed[j] for j in range(len(self.columns))]
        if self.combine is not None:
            results += self.combine(graph)
        batch = tf.shape(coordinates)[0]
        if not results:
            return tf.zeros((batch, 0), coordinates.dtype)
        if any(column.block is not None for column in self.columns):  # gradient blocks: (batch, k) pieces
            pieces = [tf.cast(r, coordinates.dtype) if column.block is not None
                      else _per_point(r, coordinates)[:, None] for column, r in zip(self.columns, results)]
            pieces += [_per_point(r, coordinates)[:, None] for r in results[len(self.columns):]]
            return tf.concat(pieces, axis=1)
        return tf.stack([_per_point(r, coordinates) for r in results], axis=1)

    def __call__(self, coordinates: np.ndarray, batch_index: int | None = None) -> np.ndarray:
        """Computes the columns for a (batch, D) array; returns (batch, columns).

        `batch_index`: the batch's place in the run (a shard's first is not 0);
        None counts this kernel's calls.
        """
        index = self.calls if batch_index is None else batch_index
        self.calls += 1
        tensor = tf.convert_to_tensor(coordinates, dtype=self.dtype)
        with tf.device(self.device):
            if self.xla_from is not None and index >= self.xla_from and len(coordinates) == self.batch_size \
                    and self.xla is not False:
                try:
                    return self._compiled_xla()(tensor).numpy()
                except (tf.errors.ResourceExhaustedError, MemoryError):
                    raise  # a batch too large: `run.run_in_halves` splits it
                except Exception:  # XLA refuses ops in many ways: compile errors, staging errors
                    self.xla = False  # XLA could not compile some op of this model: plain graphs from now on
            if self.plain is None:
                signature = tf.TensorSpec((None, self.dimension), tf.as_dtype(self.dtype))
                self.plain = tf.function(self.compute).get_concrete_function(signature)
            return self.plain(tensor).numpy()

    def _compiled_xla(self) -> Any:
        if self.xla is None:
            signature = tf.TensorSpec((self.batch_size, self.dimension), tf.as_dtype(self.dtype))
            self.xla = tf.function(self.compute, jit_compile=True).get_concrete_function(signature)
        return self.xla


def _per_point(result: tf.Tensor, coordinates: tf.Tensor) -> tf.Tensor:
    """A column as (batch,) in the coordinates' dtype; a constant (an expression such as `2*pi`) repeated per point.

    By adding zeros, not `tf.broadcast_to(..., [batch])`: a shape computed in a function that a
    `jit_compile` training step calls while it updates variables made XLA compile that step anew on
    every call (0.13 s a step instead of 2 ms).
    """
    result = tf.cast(result, coordinates.dtype)
    return result + tf.zeros_like(coordinates[:, 0]) if result.shape.rank == 0 else result


def select_device(choice: str) -> str | None:
    """Maps `--device auto|cpu|gpu` to a TensorFlow device string.

    Raises:
        RunError: `gpu` was asked for and TensorFlow sees none.
    """
    if choice == "cpu":
        return "/CPU:0"
    gpus = tf.config.list_physical_devices("GPU")
    if choice == "gpu":
        if not gpus:
            raise RunError("--device gpu: TensorFlow sees no GPU on this machine; use --device cpu or auto")
        return "/GPU:0"
    return "/GPU:0" if gpus else "/CPU:0"

