"""Derivatives inside a training loss: derivcli's operators on a Keras model's live weights.

A physics-informed network is trained with the operators that `derivcli op`
later checks. `operator(model, expr)` plans the expression once, as `op --expr`
plans it (which derivatives, which engine), and returns a callable that takes a
batch of points to the expression's values. It runs eagerly, inside
`tf.function` (with or without `jit_compile`), in a Keras `train_step` under
`model.fit`, and an outer `tf.GradientTape` differentiates it with respect to
`model.trainable_variables`: the model's frozen graph reads the variables on
every call (`engine.graph.freeze(..., live=True)`), and the Taylor engine's
Forward Laplacian pushes its series through the same reads.

Example, the loss (du/dx + d2u/dy2)^2 of a model on `Input(shape=(2,))`:

    >>> import keras, tensorflow as tf, derivcli
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    >>> residual = derivcli.operator(model, "u_x + u_yy", inputs="x,y", outputs="u")
    >>> points = tf.random.uniform((256, 2), -1, 1)
    >>> with tf.GradientTape() as tape:
    ...     loss = tf.reduce_mean(residual(points) ** 2)
    >>> gradients = tape.gradient(loss, model.trainable_variables)
    >>> [tuple(g.shape) for g in gradients]
    [(2, 16), (16,), (16, 1), (1,)]

The model is differentiated as it computes in inference (`training=False`):
dropout is off and normalization uses its moving statistics. As on the command
line, the derivatives are those of the function the model computes: a
`stop_gradient` in the model changes neither them nor their gradient with
respect to the weights.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from derivcli.errors import UsageError

ENGINES = ("auto", "taylor", "tape")


class Operator:
    """Columns of derivatives or expressions of a Keras model, as a differentiable TensorFlow function.

    Made by `operator`, `gradient`, `hessian`, `laplacian` and `derivative`; call it on a batch
    of points. Planned once, when made. Eagerly, it runs one traced function of its own (input
    signature (None, coordinates): traced once for any batch); inside a traced training step its ops
    join the step's graph and are traced with it, once, so no step retraces anything.

    Attributes:
        names: the columns' names, as `derivcli op` writes them.
        engine: which engine serves, as `--timings` says it: Taylor series, or nested tapes and why.
        refused: why Taylor series, wanted (a Laplacian, or order 3 and up), do not serve; "" when they do.
        dtype: the model's compute dtype, in which points are taken.
    """

    def __init__(self, model: Any, request: Any, inputs: Any = None, outputs: Any = None, engine: str = "auto") -> None:
        import tensorflow as tf

        from derivcli import run
        from derivcli.models import in_training

        if engine not in ENGINES:
            raise UsageError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
        self.model = in_training(model, _names(inputs), _names(outputs))
        self.plan = run.plan(self.model, request)
        # Planned once, eagerly, even when first made inside a traced train_step: freezing reads the variables.
        with tf.init_scope():
            kernel = run.make_kernel(self.model, self.plan, engine=engine)
        self.engine, self.refused = kernel.engine, kernel.refused
        self.dtype = self.model.dtype
        # The plan's columns start with the outputs' values; an operator returns what comes after them.
        self.first = sum(1 for c in self.plan.columns if c.order == 0 and c.block is None)
        self.names = self.plan.names[self.first:]
        self.outputs = [m for m in range(len(self.model.output_names))
                        if self.model.output_names[m] in self.plan.names[:self.first]]
        signature = tf.TensorSpec((None, len(self.model.coordinate_names)), tf.as_dtype(self.dtype))
        self._kernel = kernel
        self._columns = tf.function(self._compute, input_signature=[signature])
        self.traces = 0

    def _compute(self, coordinates: Any) -> Any:
        self.traces += 1  # at trace time only: how often its ops were traced (its own function, or callers')
        return self._kernel.compute(coordinates)[:, self.first:]

    def flatten(self, points: Any) -> Any:
        """A batch of points as (batch, coordinates) in the model's dtype.

        Takes a tensor or array in the model's own input shape (one input), or (batch, coordinates);
        a dict by input name, or a list in input order, for several inputs.

        Raises:
            UsageError: a missing input, or a shape that fits neither form.
        """
        import tensorflow as tf

        infos = self.model.model_inputs
        dtype = tf.as_dtype(self.dtype)
        if isinstance(points, Mapping):
            names = [info.name for info in infos]
            missing = [n for n in names if n not in points]
            if missing:
                raise UsageError(f"points: no {missing[0]!r} among {sorted(points)} (the model's inputs: {', '.join(names)})")
            pieces = [points[n] for n in names]
        elif isinstance(points, (list, tuple)) and len(infos) > 1:
            if len(points) != len(infos):
                raise UsageError(f"points: {len(points)} tensors for {len(infos)} inputs")
            pieces = list(points)
        else:
            tensor = tf.cast(tf.convert_to_tensor(points), dtype)
            width = len(self.model.coordinate_names)
            if tensor.shape.rank == 1 and width == 1:
                return tensor[:, None]
            if tensor.shape.rank == 2 and tensor.shape[1] == width:
                return tensor
            if len(infos) == 1 and tuple(tensor.shape[1:]) == infos[0].shape:
                return tf.reshape(tensor, (-1, width))
            raise UsageError(f"points of shape {tuple(tensor.shape)}: the model takes (batch, {width}) coordinates"
                             + (f" or (batch, {', '.join(map(str, infos[0].shape))})" if len(infos) == 1 else
                                "; pass a dict by input name for several inputs"))
        flat = []
        for piece, info in zip(pieces, infos):
            piece = tf.cast(tf.convert_to_tensor(piece), dtype)
            flat.append(tf.reshape(piece, (-1, info.size)))
        return tf.concat(flat, axis=1)

    def columns(self, points: Any) -> Any:
        """Every column for a batch of points, (batch, columns), in the order of `names`.

        Inside a traced function (a training step) its ops join the caller's graph, recorded on the caller's
        tapes; eagerly, they run as one traced function of their own.
        """
        import tensorflow as tf

        flat = self.flatten(points)
        # Not a function call inside the caller's: XLA (jit_compile) compiled such a call's gradient anew
        # whenever an optimizer had changed the weights, 1 s per step instead of 3 ms.
        return self._compute(flat) if tf.inside_function() else self._columns(flat)

    def __call__(self, points: Any) -> Any:
        return self.columns(points)

    @functools.cached_property
    def hessian_square(self) -> tuple[list[int], int]:
        """Where each entry of every output's full Hessian is among the planned upper triangle's columns, and its size."""
        derivative_columns = self.plan.columns[self.first:]
        positions = sorted({p for c in derivative_columns for p, power in enumerate(c.partial) if power})
        place = {(c.output, c.partial): k for k, c in enumerate(derivative_columns)}
        dimension = len(self.model.coordinate_names)
        square = []
        for output in self.outputs:
            for i in positions:
                for j in positions:
                    index = [0] * dimension
                    index[i] += 1
                    index[j] += 1
                    square.append(place[(output, tuple(index))])
        return square, len(positions)


class ExpressionOperator(Operator):
    """`operator`'s: one expression gives a (batch,) tensor, several a dict by name."""

    def __init__(self, model: Any, expressions: str | Sequence[str], **options: Any) -> None:
        from derivcli.run import DerivativeRequest

        self.single = isinstance(expressions, str)
        texts = [expressions] if self.single else list(expressions)
        if not texts:
            raise UsageError("operator: no expression given")
        super().__init__(model, DerivativeRequest(expressions=texts, wrt=_names(options.pop("wrt", None))), **options)

    def __call__(self, points: Any) -> Any:
        columns = self.columns(points)
        if self.single:
            return columns[:, 0]
        return {name: columns[:, k] for k, name in enumerate(self.names)}


def _names(value: str | Sequence[str] | None) -> list[str] | None:
    """Names given as `"x,y"` or `["x", "y"]`."""
    from derivcli.naming import split_names

    if value is None:
        return None
    if isinstance(value, str):
        return [name.strip() for name in split_names(value)]
    return list(value)


# Operators made by `gradient`, `hessian`, `laplacian` and `derivative`, by model and request, so
# that a call in every step plans and traces once.
_MADE: weakref.WeakKeyDictionary[Any, dict[Any, Operator]] = weakref.WeakKeyDictionary()


def _made(model: Any, what: str, engine: str = "auto", wrt: Any = None, inputs: Any = None, outputs: Any = None,
          partial: str | None = None) -> Operator:
    """The operator of `what` (gradient, hessian, laplacian, derivative) for `model`, made at its first call."""
    from derivcli.run import DerivativeRequest
    from derivcli.specs import parse_partial

    def hashable(value: Any) -> Any:
        return value if value is None or isinstance(value, str) else tuple(value)

    key = (what, engine, hashable(wrt), hashable(inputs), hashable(outputs), partial)
    by_request = _MADE.setdefault(model, {})
    if key not in by_request:
        if what == "derivative":
            request = DerivativeRequest(partials=[parse_partial(partial or "")])
        else:  # the request's flag of the same name (gradient: the Jacobian)
            request = DerivativeRequest(wrt=_names(wrt), **{"jacobian" if what == "gradient" else what: True})
        made = Operator(model, request, inputs, outputs, engine)
        _warn_refused(made, f"derivcli.{what}", 4)
        by_request[key] = made
    return by_request[key]


def _warn_refused(made: Operator, what: str, stacklevel: int) -> None:
    """Says that nested tapes serve where Taylor series were wanted, and why."""
    if made.refused:
        warnings.warn(f"{what}: nested tapes serve; Taylor series do not cover {made.refused}", stacklevel=stacklevel)


def operator(
    model: Any,
    expr: str | Sequence[str],
    inputs: str | Sequence[str] | None = None,
    outputs: str | Sequence[str] | None = None,
    wrt: str | Sequence[str] | None = None,
    engine: str = "auto",
) -> ExpressionOperator:
    """The operator expression `expr` of `model`, as a function of a batch of points.

    Args:
        model: a Keras model with defined inputs (functional or Sequential), float32 or float64.
        expr: an expression in `derivcli op`'s language (`"u_t - 0.01*lap(u)"`, `"res=D(u, x^2) + u"`),
            or a list of them.
        inputs: names of the input coordinates (`"t,x"`, or one name per input for tensor inputs),
            as `--names`.
        outputs: names of the outputs, as `--output-names`.
        wrt: the inputs `lap` sums over, as `--wrt` (`"x"` stands for all of an input's elements).
        engine: `auto` (Taylor series for Laplacians and orders 3 and up where they cover the model,
            nested tapes elsewhere), `taylor` (an error where they do not cover it) or `tape`.

    Returns:
        A callable: points (a tensor, or a dict by input name) to a (batch,) tensor, or for a list
        of expressions a dict of them by name. Its `engine` and `refused` attributes say which
        engine serves and why Taylor series do not.

    Raises:
        UsageError: an expression, name or engine that does not fit the model; `engine="taylor"`
            on a model the Taylor engine does not cover.

    Example:
        >>> import keras, tensorflow as tf, derivcli
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="tanh"),
        ...                           keras.layers.Dense(1)])
        >>> heat = derivcli.operator(model, "D(u, t) - 0.01*lap(u)", inputs="t,x,y", outputs="u", wrt="x,y")
        >>> heat.engine
        'Taylor series (tapes for first derivatives)'
        >>> heat(tf.zeros((5, 3))).shape
        TensorShape([5])
    """
    made = ExpressionOperator(model, expr, inputs=inputs, outputs=outputs, wrt=wrt, engine=engine)
    _warn_refused(made, f"derivcli.operator({expr!r})", 3)
    return made


def _per_output(operator_: Operator, columns: Any, trailing: Sequence[int]) -> Any:
    """(batch, M * k) as (batch, *trailing) for one output, (batch, M, *trailing) for several."""
    import tensorflow as tf

    count = len(operator_.outputs)
    shape = [-1, *trailing] if count == 1 else [-1, count, *trailing]
    return tf.reshape(columns, shape)


def gradient(
    model: Any, x: Any, wrt: str | Sequence[str] | None = None, inputs: str | Sequence[str] | None = None,
    outputs: str | Sequence[str] | None = None,
) -> Any:
    """The first derivatives of the outputs with respect to the inputs.

    Args:
        model: a Keras model with defined inputs.
        x: a batch of points: a tensor in the model's input shape or (batch, coordinates), or a dict by input name.
        wrt: the inputs to differentiate with respect to; all (continuous) inputs when None.
        inputs, outputs: names for the coordinates and outputs, as in `operator`.

    Returns:
        For a model with one input and `wrt` None: a tensor in the input's shape, (batch, *shape);
        for several inputs, a dict of them by input name. With `wrt`: (batch, len(wrt)). A model
        with M > 1 output elements adds an axis of M after the batch axis.

    Example:
        >>> import keras, numpy as np, derivcli
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
        >>> model.set_weights([np.array([[3.0], [-1.0]])])
        >>> derivcli.gradient(model, np.ones((2, 2))).numpy()
        array([[ 3., -1.],
               [ 3., -1.]], dtype=float32)
    """
    made = _made(model, "gradient", wrt=wrt, inputs=inputs, outputs=outputs)
    columns = made.columns(x)
    if wrt is not None:
        return _per_output(made, columns, [columns.shape[1] // len(made.outputs)])
    shaped = [info.shape for info in made.model.model_inputs]
    if len(shaped) == 1:
        return _per_output(made, columns, list(shaped[0]))
    import tensorflow as tf

    sizes = [int(np.prod(shape)) for shape in shaped]
    per_output = _per_output(made, columns, [sum(sizes)])
    pieces = tf.split(per_output, sizes, axis=-1)
    lead = [] if len(made.outputs) == 1 else [len(made.outputs)]
    return {info.name: tf.reshape(piece, [-1, *lead, *info.shape])
            for info, piece in zip(made.model.model_inputs, pieces)}


def hessian(
    model: Any, x: Any, wrt: str | Sequence[str] | None = None, inputs: str | Sequence[str] | None = None,
    outputs: str | Sequence[str] | None = None,
) -> Any:
    """The matrix of second derivatives over the (flattened) coordinates, or over `wrt`.

    Returns:
        (batch, D, D) for one output element, (batch, M, D, D) for M, with D the coordinates
        differentiated (all continuous ones, or `wrt`).

    Example:
        >>> import keras, numpy as np, derivcli
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="exponential", use_bias=False)])
        >>> model.set_weights([np.array([[1.0], [2.0]])])
        >>> derivcli.hessian(model, np.zeros((1, 2))).numpy()  # e^(x0 + 2 x1): [[1, 2], [2, 4]] at 0
        array([[[1., 2.],
                [2., 4.]]], dtype=float32)
    """
    import tensorflow as tf

    made = _made(model, "hessian", wrt=wrt, inputs=inputs, outputs=outputs)
    square, size = made.hessian_square
    return _per_output(made, tf.gather(made.columns(x), square, axis=1), [size, size])


def laplacian(
    model: Any, x: Any, wrt: str | Sequence[str] | None = None, inputs: str | Sequence[str] | None = None,
    outputs: str | Sequence[str] | None = None, engine: str = "auto",
) -> Any:
    """The Laplacian over the (continuous) coordinates, or over `wrt`: by the Forward Laplacian where it covers the model.

    Returns:
        (batch,) for one output element, (batch, M) for M.

    Example:
        >>> import keras, numpy as np, derivcli
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="exponential", use_bias=False)])
        >>> model.set_weights([np.array([[1.0], [2.0], [2.0]])])
        >>> derivcli.laplacian(model, np.zeros((2, 3))).numpy()  # (1 + 4 + 4) e^(x0 + 2 x1 + 2 x2)
        array([9., 9.], dtype=float32)
    """
    made = _made(model, "laplacian", engine, wrt, inputs, outputs)
    return _per_output(made, made.columns(x), [])


def derivative(
    model: Any, x: Any, partial: str, inputs: str | Sequence[str] | None = None,
    outputs: str | Sequence[str] | None = None, engine: str = "auto",
) -> Any:
    """One partial derivative of every output, written as `--partial` writes it (`x`, `x^2`, `t,x^2`).

    Returns:
        (batch,) for one output element, (batch, M) for M.

    Example:
        >>> import keras, numpy as np, derivcli
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="exponential", use_bias=False)])
        >>> model.set_weights([np.array([[1.0], [2.0]])])
        >>> derivcli.derivative(model, np.zeros((1, 2)), "x0,x1^2").numpy()  # 1 * 2^2 e^0
        array([4.], dtype=float32)
    """
    made = _made(model, "derivative", engine, inputs=inputs, outputs=outputs, partial=partial)
    return _per_output(made, made.columns(x), [])
