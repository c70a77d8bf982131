"""`derivcli attribute`: saliency, input x gradient, SmoothGrad, Integrated and Expected Gradients.

Every method is a weighted sum of the model's gradient at rows derived from each point:

- saliency: |dy/dx| at x; input-x-gradient: x * dy/dx at x;
- smoothgrad: the mean gradient at x + noise, `--samples` rows;
- integrated-gradients: (x - x') * sum_k w_k dy/dx(x' + a_k (x - x')), the nodes a_k and weights w_k of
  `--rule` on [0, 1] (Gauss-Legendre by default), from the baseline x';
- expected-gradients: the mean of (x - x'_s) * dy/dx(x'_s + a_s (x - x'_s)) over `--samples` baselines
  x'_s drawn from `--baseline FILE`, each with its own uniform a_s.

A point's rows are made one batch at a time (`AttributionKernel`): steps x samples x points are folded into
batches of `--batch-size` rows, each padded to that size, so memory holds one batch whatever the steps, and
a row's result depends only on its point and its place. Noise, baselines and a's are drawn from the seed and
the point's row number in the whole run, never from a running generator: any batch size and any shard give
the same draws. Integer and boolean inputs (token ids, `--target NAME`'s labels) are held at their values in
every row and get no attribution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from derivcli.errors import UsageError

METHODS = ("integrated-gradients", "saliency", "input-x-gradient", "smoothgrad", "expected-gradients")
RULES = ("gauss-legendre", "riemann-left", "riemann-right", "riemann-middle", "riemann-trapezoid")
PATH_METHODS = ("integrated-gradients", "expected-gradients")
# --steps auto: from this many steps per point, doubled until |delta| is within the tolerance, up to the last.
AUTO_STEPS = (16, 4096)
# Rows per batch under --batch-size auto: a batch of images' path rows gains nothing from more (bench_attribution:
# 1,024 rows 3.1 s, 8,192 rows 5.6 s with its compilation), and memory holds one batch.
AUTO_ROWS = 1024
# ... and at most this many bytes of rows in float64 (a 224x224x3 image is 1.2 MB a row: 128 rows, 1.9 GB peak
# for 4,096 steps against 3.1 GB at 1,024 rows, the same bits).
AUTO_ROW_BYTES = 256 << 20


def auto_rows(dimension: int, estimate: int) -> int:
    """Rows per batch under --batch-size auto: the estimate, at most AUTO_ROWS and AUTO_ROW_BYTES; a power of two."""
    fitting = min(estimate, AUTO_ROWS, max(16, AUTO_ROW_BYTES // (8 * max(dimension, 1))))
    return 1 << (fitting.bit_length() - 1)
# --steps auto without --max-delta: |delta| within this fraction of |y(x) - y(baseline)| (and 1e-6 absolute).
AUTO_RELATIVE_DELTA = 1e-3


@dataclass
class AttributionRequest:
    """What `attribute` computes (see the module's doc)."""

    method: str = "integrated-gradients"
    baseline: str | None = None  # None: zero; else a points file (NPZ, HDF5 or CSV)
    steps: int | str = 50  # or "auto"
    rule: str = "gauss-legendre"
    samples: int = 50
    noise: float = 0.15
    seed: int = 0
    max_delta: float | None = None
    wrt: list[str] | None = None
    outputs: list[str] | None = None
    layer: str | None = None  # --layer NAME: integrated gradients to that layer's output, from zero there

    def check(self) -> None:
        """Raises UsageError for a method, rule, step count or noise that does not exist."""
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.rule not in RULES:
            raise UsageError(f"--rule {self.rule!r}: choose one of {', '.join(RULES)}")
        if self.steps != "auto" and (not isinstance(self.steps, int) or self.steps < 1):
            raise UsageError(f"--steps {self.steps}: give a whole number of at least 1, or auto")
        if self.steps == "auto" and self.method != "integrated-gradients":
            raise UsageError("--steps auto doubles the steps of integrated-gradients until delta is small enough")
        if self.rule == "riemann-trapezoid" and self.steps != "auto" and self.steps < 2:
            raise UsageError("--rule riemann-trapezoid needs --steps 2 or more (both ends of the path)")
        if self.samples < 1:
            raise UsageError(f"--samples {self.samples}: give a whole number of at least 1")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise UsageError(f"--noise {self.noise:g}: give a fraction of each point's range, 0 or more (0.15: 15%)")
        if self.method == "expected-gradients" and self.baseline in (None, "zero"):
            raise UsageError("--method expected-gradients draws its baselines from a file: give --baseline FILE "
                             "(points in the model's shapes, such as a sample of the training data)")
        if self.layer is not None and self.method != "integrated-gradients":
            raise UsageError(f"--layer attributes by integrated gradients from zero at the layer; --method "
                             f"{self.method} takes the inputs")
        if self.layer is not None and self.wrt:
            raise UsageError("--layer attributes to every element of the layer's output: leave out --wrt")
        if self.layer is not None and self.steps == "auto":
            raise UsageError("--layer takes --steps N; --steps auto is for inputs")
        if self.max_delta is not None and self.method not in PATH_METHODS:
            raise UsageError(f"--max-delta gates the completeness of a path method ({', '.join(PATH_METHODS)}); "
                             f"{self.method} has no delta")


@functools.lru_cache(maxsize=32)
def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The nodes a_k in [0, 1] and weights w_k of `rule` with `steps` nodes: sum_k w_k f(a_k) ~ int_0^1 f.

    Example:
        >>> nodes, weights = quadrature("riemann-trapezoid", 3)
        >>> nodes.tolist(), weights.tolist()
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    k = np.arange(steps, dtype=np.float64)
    if rule == "gauss-legendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    if rule == "riemann-trapezoid":
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    shift = {"riemann-left": 0.0, "riemann-right": 1.0, "riemann-middle": 0.5}[rule]
    return (k + shift) / steps, np.full(steps, 1.0 / steps)


@dataclass
class AttributionPlan:
    """The columns of an attribution run: per output, its value, then one attribution per `wrt` coordinate,
    then (path methods) its delta, then (`--steps auto`) the steps used.

    Attributes:
        outputs: the attributed outputs, by position among the model's outputs.
        values: every output reported (the attributed ones, and `target` beside `y`).
        wrt: the attributed coordinates, by position.
        names: every value column's name, in table order.
        first_gated: where the columns `--max-abs` gates begin (the attributions).
        attributions: (value column, output name, coordinate) of each attribution, for the arrays in shapes.
    """

    outputs: list[int]
    values: list[int]
    wrt: list[int]
    names: list[str]
    first_gated: int
    delta: bool
    auto_steps: bool
    attributions: list[tuple[int, str, int]] = field(default_factory=list)
    columns: list[Any] = field(default_factory=list)  # `run.Plan`'s, for the code they share: none here
    highest_order: int = 1
    laplacian: bool = False
    combine: Any = None

    def delta_columns(self) -> list[int]:
        """The positions of the delta columns among the values."""
        return [j for j, name in enumerate(self.names) if name.startswith("delta(")]


def plan_attribution(model: Any, request: AttributionRequest) -> AttributionPlan:
    """The columns of `request` on `model` (see `AttributionPlan`).

    Raises:
        UsageError: an unknown or discrete input in `wrt`, an unknown output.
    """
    from derivcli.run import positions_of, refuse_discrete

    request.check()
    if request.layer is not None:
        return plan_layer_attribution(model, request)
    inputs = model.coordinate_names
    held = model.discrete_positions
    values = (positions_of(request.outputs, model.output_names, "--outputs", "output")
              if request.outputs else list(range(len(model.output_names))))
    outputs = [m for m in values if m not in model.index_outputs]
    wrt = positions_of(request.wrt, inputs, "--wrt", "input") if request.wrt else [p for p in range(len(inputs))
                                                                              if p not in held]
    refuse_discrete(held, inputs, [("--wrt", [p]) for p in wrt])
    names = [model.output_names[m] for m in values]
    attributions = []
    for m in outputs:
        output = model.output_names[m]
        for p in wrt:
            attributions.append((len(names), output, p))
            names.append(f"attr({output})/{inputs[p]}")
        if request.method in PATH_METHODS:
            names.append(f"delta({output})")
        if request.steps == "auto":
            names.append(f"steps({output})")
    return AttributionPlan(outputs, values, wrt, names, len(values), request.method in PATH_METHODS,
                           request.steps == "auto", attributions)


@dataclass
class LayerPlan(AttributionPlan):
    """`--layer NAME`: attributions to the layer's output elements (an Embedding's summed over its last axis)."""

    layer: str = ""
    shape: tuple[int, ...] = ()  # the attributed shape of one point's layer output
    summed: bool = False  # an Embedding: the last axis summed, one attribution per token


def plan_layer_attribution(model: Any, request: AttributionRequest) -> LayerPlan:
    """The columns of `attribute --layer NAME`: per output, its value, one attribution per element of the layer's
    output (`attr(y)/NAME[i,j]`), and its delta.

    Raises:
        UsageError: a SavedModel, or no layer of that name.
    """
    import keras

    from derivcli.naming import element_names
    from derivcli.run import positions_of

    if model.kind != "keras":
        raise UsageError("--layer reads a layer of a .keras or .h5 model; a SavedModel keeps no layers by name")
    try:
        layer = model.keras_model.get_layer(request.layer)
    except ValueError:
        names = ", ".join(layer.name for layer in model.keras_model.layers)
        raise UsageError(f"--layer {request.layer!r}: no layer of that name (layers: {names})") from None
    summed = isinstance(layer, keras.layers.Embedding)
    shape = tuple(int(d) for d in layer.output.shape[1:])
    shape = shape[:-1] if summed else shape
    values = (positions_of(request.outputs, model.output_names, "--outputs", "output")
              if request.outputs else list(range(len(model.output_names))))
    outputs = [m for m in values if m not in model.index_outputs]
    names = [model.output_names[m] for m in values]
    attributions = []
    for m in outputs:
        output = model.output_names[m]
        for k, element in enumerate(element_names(layer.name, shape if shape else (1,))):
            attributions.append((len(names), output, k))
            names.append(f"attr({output})/{element}")
        names.append(f"delta({output})")
    return LayerPlan(outputs, values, [], names, len(values), True, False, attributions, layer=layer.name,
                     shape=shape, summed=summed)


class LayerAttributionKernel:
    """A batch of points -> their values, attributions to a layer's output and deltas (`LayerPlan`).

    Each point's rows are the point itself with the layer's output scaled by a_k: z = a_k h(x); the
    attribution is h(x) * sum_k w_k dy/dz at those rows, the delta sum - (y(x) - y(z = 0)). The layer's call is
    wrapped while the function is traced, so the gradient is taken at the layer's output, with the rest of the
    model (other inputs, held token ids) as it is.
    """

    def __init__(self, model: Any, planned: LayerPlan, request: AttributionRequest, row_batch: int,
                 device: str | None = None, xla: str = "auto", inform: Any = lambda message: None) -> None:
        self.model, self.planned, self.request, self.row_batch, self.device = model, planned, request, row_batch, device
        self.xla, self.inform = xla, inform
        self.dtype = np.dtype(model.dtype)
        self.top = model.target == "top"
        self.function_model = model.untargeted() if self.top else model
        self.compiled: Any = None
        self.engine = "gradients at the layer's output"
        nodes, weights = quadrature(request.rule, int(request.steps))  # type: ignore[arg-type]
        self.alphas = np.concatenate([[1.0, 0.0], nodes])
        self.weights = np.concatenate([[0.0, 0.0], weights])

    @property
    def points_per_batch(self) -> int:
        return max(1, self.row_batch // len(self.alphas))

    def fit_rows(self, run_points: int | None) -> None:
        """As `AttributionKernel.fit_rows`."""
        if run_points:
            self.row_batch = min(self.row_batch, run_points * len(self.alphas))

    def __call__(self, points: np.ndarray, batch_index: int | None = None) -> np.ndarray:
        count, rows_each = len(points), len(self.alphas)
        rows = np.repeat(points, rows_each, axis=0)
        alphas = np.tile(self.alphas, count)
        size = int(np.prod(self.planned.shape)) if self.planned.shape else 1
        outputs = len(self.planned.outputs)
        summed = np.zeros((count, outputs, size))
        layer_at_x = np.zeros((count, size))
        values = np.zeros((len(rows), len(self.model.output_names)))
        classes = None
        for low in range(0, len(rows), self.row_batch):
            high = min(low + self.row_batch, len(rows))
            owner = np.arange(low, high) // rows_each
            if self.top and classes is None:
                classes = self._top_classes(points)
            value, layer, gradient = self._run(rows[low:high], alphas[low:high],
                                               None if classes is None else classes[owner])
            values[low:high] = value
            weights = np.tile(self.weights, count)[low:high]
            np.add.at(summed, owner, gradient * weights[:, None, None])
            at_x = alphas[low:high] == 1.0
            layer_at_x[owner[at_x]] = layer[at_x]
        attributions = summed * layer_at_x[:, None, :]
        at_x_values, at_zero = values[::rows_each], values[1::rows_each]
        columns = [at_x_values[:, self.planned.values]]
        for k, m in enumerate(self.planned.outputs):
            columns.append(attributions[:, k, :])
            columns.append((attributions[:, k, :].sum(axis=1) - (at_x_values[:, m] - at_zero[:, m]))[:, None])
        return np.concatenate(columns, axis=1)

    def _top_classes(self, points: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        values = self.function_model.call_flat(tf.constant(points.astype(self.dtype))).numpy()
        return np.argmax(values, axis=1)

    def _run(self, rows: np.ndarray, alphas: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, ...]:
        import tensorflow as tf

        count = len(rows)
        pad = self.row_batch - count
        if pad:
            rows = np.concatenate([rows, np.repeat(rows[:1], pad, axis=0)])
            alphas = np.concatenate([alphas, np.ones(pad)])
            classes = None if classes is None else np.concatenate([classes, np.repeat(classes[:1], pad)])
        if self.compiled is None:
            self.compiled = self._compile()
        picks = np.zeros(self.row_batch, np.int32) if classes is None else classes.astype(np.int32)
        with tf.device(self.device):
            value, layer, gradient = self.compiled(tf.constant(rows.astype(self.dtype)),
                                                   tf.constant(alphas.astype(self.dtype)), tf.constant(picks))
        value = value.numpy()[:count].astype(np.float64)
        if self.top:
            picked = classes[:count] if classes is not None else np.zeros(count, np.int64)
            value = np.stack([value[np.arange(count), picked], picked.astype(np.float64)], axis=1)
        return value, layer.numpy()[:count].astype(np.float64), gradient.numpy()[:count].astype(np.float64)

    def _compile(self) -> Any:
        import tensorflow as tf

        model, planned = self.function_model, self.planned
        layer = model.keras_model.get_layer(planned.layer)
        outputs, top, summed = list(planned.outputs), self.top, planned.summed

        @tf.autograph.experimental.do_not_convert
        def run(rows: tf.Tensor, alphas: tf.Tensor, classes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            captured: dict[str, tf.Tensor] = {}
            original = layer.call

            def scaled(*args: Any, **kwargs: Any) -> tf.Tensor:
                output = original(*args, **kwargs)
                scale = tf.reshape(tf.cast(alphas, output.dtype), [-1] + [1] * (len(output.shape) - 1))
                captured["h"] = output
                captured["z"] = tf.stop_gradient(output) * scale  # z = a h(x): the point on the layer's path
                tape.watch(captured["z"])
                return captured["z"]

            own = layer.__dict__.get("call")
            layer.call = scaled
            try:
                with tf.GradientTape(persistent=True) as tape:
                    values = model.call_flat(rows)
                    picked = [tf.gather(values, classes, axis=1, batch_dims=1)] if top else \
                        [values[:, m] for m in outputs]
            finally:  # the layer's own call again
                if own is None:
                    del layer.call
                else:
                    layer.call = own
            gradients = [tape.gradient(p, captured["z"], unconnected_gradients=tf.UnconnectedGradients.ZERO)
                         for p in picked]
            h = captured["h"]
            if summed:  # an Embedding: h * dy/dz summed over the embedding axis, one number per token
                products = [tf.reduce_sum(g * h, axis=-1) for g in gradients]
                return values, tf.ones_like(products[0]), tf.stack(
                    [tf.reshape(p, (tf.shape(rows)[0], -1)) for p in products], axis=1)
            flat = tf.reshape(h, (tf.shape(rows)[0], -1))
            return values, flat, tf.stack([tf.reshape(g, (tf.shape(rows)[0], -1)) for g in gradients], axis=1)

        dtype = tf.as_dtype(self.model.dtype)
        signature = [tf.TensorSpec((self.row_batch, len(self.model.coordinate_names)), dtype),
                     tf.TensorSpec((self.row_batch,), dtype), tf.TensorSpec((self.row_batch,), tf.int32)]
        # The layer's call is wrapped while tracing, so auto has no frozen graph to size: XLA only when asked.
        compiled, self.engine = compiled_kernel(run, signature, "on" if self.xla == "on" else "off", 0, self.engine,
                                                self.inform)
        return compiled


# XLA compiles an attribution kernel in a second or less on small networks (sample_models/bars_cnn.keras: 37 ops,
# bench_attribution's 0.94x of a hand-written XLA IG), but in minutes on large ones: 388 s on EfficientNetB0
# (2,212 ops) for 8 images, 183 s on MobileNetV3Small (1,089 ops), where the plain graph runs them in seconds.
# Under --xla auto, kernels of more ops than this run plain graphs.
XLA_ATTRIBUTION_MAX_OPS = 300


def compiled_kernel(traced: Any, signature: Sequence[Any], xla: str, ops: int, engine: str,
                    inform: Any) -> tuple[Any, str]:
    """`traced` as a concrete function: XLA-compiled under `--xla on`, or `auto` on a graph of at most
    `XLA_ATTRIBUTION_MAX_OPS` ops (plain where XLA refuses an op); else a plain graph. Returns it and the engine's
    name for --timings."""
    import tensorflow as tf

    if xla == "on" or (xla == "auto" and ops <= XLA_ATTRIBUTION_MAX_OPS):
        if ops > XLA_ATTRIBUTION_MAX_OPS:
            inform(f"compiling the kernel with XLA (--xla on): {ops:,} ops, which can take minutes")
        try:
            compiled = tf.function(traced, jit_compile=True).get_concrete_function(*signature)
            compiled(*(tf.zeros(spec.shape, spec.dtype) for spec in signature))
            return compiled, f"XLA-compiled {engine}"
        except Exception:  # XLA refuses some ops: plain graphs
            pass
    return tf.function(traced).get_concrete_function(*signature), engine


class AttributionKernel:
    """A batch of points -> their value and attribution columns (`AttributionPlan.names`), in rows of `row_batch`.

    `baselines`: (B, D) points, one for every point of the run (B = the run's points) or one for all
    (B = 1); None for zero. For expected-gradients, the pool the baselines are drawn from.
    """

    def __init__(self, model: Any, planned: AttributionPlan, request: AttributionRequest, row_batch: int,
                 baselines: np.ndarray | None, device: str | None = None, xla: str = "auto",
                 inform: Any = lambda message: None) -> None:
        self.model, self.planned, self.request = model, planned, request
        self.xla, self.inform = xla, inform
        self.row_batch = row_batch
        self.dtype = np.dtype(model.dtype)
        dimension = len(model.coordinate_names)
        self.baselines = np.zeros((1, dimension)) if baselines is None else baselines
        self.held = np.array(sorted(model.discrete_positions), dtype=np.int64)
        # A path moves only the attributed coordinates: the others (held ones, and those --wrt leaves out) stay at
        # the point's values, so the attributions account for y(x) - y(baseline) whole.
        self.off_path = np.array(sorted(set(range(dimension)) - set(planned.wrt)), dtype=np.int64)
        self.device = device
        self.gradient: Any = None
        # --target top: each point's class is picked once, at the point, and its gradient taken all along the path
        # (a path row's own largest class would change the function integrated).
        self.top = model.target == "top"
        self.function_model = model.untargeted() if self.top else model
        self.values: Any = None  # --target top: the outputs at the points, to pick each one's class
        self.engine = "nested tapes (a gradient per output at every row)"

    @property
    def rows_per_point(self) -> int:
        """How many rows a point needs (at the first try of --steps auto)."""
        method, request = self.request.method, self.request
        if method in ("saliency", "input-x-gradient"):
            return 1
        if method == "smoothgrad":
            return 1 + request.samples
        if method == "expected-gradients":
            return 1 + 2 * request.samples
        steps = AUTO_STEPS[0] if request.steps == "auto" else int(request.steps)
        return 2 + steps

    @property
    def points_per_batch(self) -> int:
        """Points per batch of the run: as many as their rows fill one batch of rows, at least one."""
        return max(1, self.row_batch // self.rows_per_point)

    def fit_rows(self, run_points: int | None) -> None:
        """Under --batch-size auto: a run whose rows are fewer than a batch of rows computes just those (8 images'
        saliency: 8 rows, not 1,024 padded ones). From the whole run's points, so every shard has the same rows."""
        if run_points:
            self.row_batch = min(self.row_batch, run_points * self.rows_per_point)

    def __call__(self, points: np.ndarray, batch_index: int | None = None) -> np.ndarray:
        first_row = (batch_index or 0) * self.points_per_batch  # the points' rows in the whole run, for the draws
        rows = np.arange(first_row, first_row + len(points))
        method = self.request.method
        if method == "integrated-gradients" and self.request.steps == "auto":
            return self._auto(points, rows)
        steps = None if method != "integrated-gradients" else int(self.request.steps)  # type: ignore[arg-type]
        return self._attribute(points, rows, steps)

    # -- the rows of a point, and what is summed over them --

    def _baseline(self, rows: np.ndarray) -> np.ndarray:
        if len(self.baselines) == 1:
            return np.repeat(self.baselines, len(rows), axis=0)
        return self.baselines[rows]

    def _held(self, made: np.ndarray, point: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Rows with the integer and boolean coordinates (or `positions`) held at the point's values."""
        positions = self.held if positions is None else positions
        if positions.size:
            made[:, positions] = point[positions]
        return made

    def _point_rows(self, point: np.ndarray, baseline: np.ndarray, row: int,
                    steps: int | None) -> tuple[Callable[[int, int], np.ndarray], np.ndarray, np.ndarray]:
        """The rows of one point as a function of a range (made a batch at a time), each row's weight in the
        attribution's sum, and the difference (x - x') that multiplies it (per row: expected gradients)."""
        request = self.request
        method = request.method
        dimension = len(point)
        if method in ("saliency", "input-x-gradient"):
            return (lambda low, high: point[None].repeat(high - low, axis=0)), np.ones(1), np.ones((1, dimension))
        rng = np.random.default_rng([request.seed, row])
        if method == "smoothgrad":
            spread = request.noise * (float(np.max(point)) - float(np.min(point)))
            noise = rng.standard_normal((request.samples, dimension)) * spread

            def smooth(low: int, high: int) -> np.ndarray:
                index = np.arange(low, high)
                made = point[None].repeat(high - low, axis=0)
                made[index > 0] += noise[index[index > 0] - 1]
                return self._held(made, point)

            weights = np.concatenate([[0.0], np.full(request.samples, 1.0 / request.samples)])
            return smooth, weights, np.ones((1, dimension))
        if method == "integrated-gradients":
            nodes, weights = quadrature(request.rule, steps or 1)
            alphas = np.concatenate([[1.0, 0.0], nodes])

            def path(low: int, high: int) -> np.ndarray:
                a = alphas[low:high, None]
                return self._held(baseline[None] + a * (point - baseline)[None], point, self.off_path)

            return path, np.concatenate([[0.0, 0.0], weights]), (point - baseline)[None]
        # expected-gradients: rows x, then the drawn baselines, then the points on their paths
        picks = rng.integers(len(self.baselines), size=request.samples)
        drawn = self._held(self.baselines[picks].astype(np.float64), point, self.off_path)
        alphas = rng.uniform(size=request.samples)
        made_all = np.concatenate([point[None], drawn, drawn + alphas[:, None] * (point[None] - drawn)])

        def expected(low: int, high: int) -> np.ndarray:
            return made_all[low:high].copy()

        weights = np.concatenate([[0.0], np.zeros(request.samples), np.full(request.samples, 1.0 / request.samples)])
        differences = np.concatenate([np.zeros((1 + request.samples, dimension)), point[None] - drawn])
        return expected, weights, differences

    def _attribute(self, points: np.ndarray, rows: np.ndarray, steps: int | None) -> np.ndarray:
        """The value and attribution columns of `points` (their rows in the run: `rows`)."""
        planned = self.planned
        baselines = self._baseline(rows).astype(np.float64)
        if self.off_path.size:  # the coordinates off the path stay at each point's values
            baselines[:, self.off_path] = points[:, self.off_path]
        classes = self._top_classes(points) if self.top else None
        makers = [self._point_rows(points[i].astype(np.float64), baselines[i], int(rows[i]), steps)
                  for i in range(len(points))]
        counts = [len(weights) for _, weights, _ in makers]
        total = sum(counts)
        starts = np.concatenate([[0], np.cumsum(counts)])
        outputs = len(planned.outputs)
        summed = np.zeros((len(points), outputs, len(planned.wrt)))
        values = np.zeros((total, len(self.model.output_names)))
        gradients_at_x = np.zeros((len(points), outputs, len(planned.wrt)))
        for low in range(0, total, self.row_batch):
            high = min(low + self.row_batch, total)
            # The rows of this batch, point by point (a point's rows may span batches).
            first = int(np.searchsorted(starts, low, side="right") - 1)
            pieces, owners, places = [], [], []
            i = first
            while i < len(points) and starts[i] < high:
                own_low, own_high = max(low, starts[i]) - starts[i], min(high, starts[i + 1]) - starts[i]
                pieces.append(makers[i][0](int(own_low), int(own_high)))
                owners.append(np.full(own_high - own_low, i))
                places.append(np.arange(own_low, own_high))
                i += 1
            batch = np.concatenate(pieces)
            owner, place = np.concatenate(owners), np.concatenate(places)
            value, gradient = self._gradients(batch, None if classes is None else classes[owner])
            values[low:high] = value
            for i in np.unique(owner):
                mine = owner == i
                weights, differences = makers[i][1][place[mine]], makers[i][2]
                scale = differences[place[mine]] if len(differences) > 1 else differences[:1]
                # (rows, outputs, wrt): each row's gradient, weighted, times its (x - x') on the wrt coordinates
                contribution = gradient[mine] * (weights[:, None, None] * scale[:, None, planned.wrt])
                summed[i] += contribution.sum(axis=0)
                if place[mine][0] == 0:
                    gradients_at_x[i] = gradient[mine][0]
        return self._columns(points, values, starts, summed, gradients_at_x, steps)

    def _columns(self, points: np.ndarray, values: np.ndarray, starts: np.ndarray, summed: np.ndarray,
                 gradients_at_x: np.ndarray, steps: int | None) -> np.ndarray:
        planned, method = self.planned, self.request.method
        at_x = values[starts[:-1]]  # each point's first row is the point itself
        if method == "saliency":
            summed = np.abs(gradients_at_x)
        elif method == "input-x-gradient":
            summed = gradients_at_x * points[:, None, planned.wrt]
        columns = [at_x[:, planned.values]]
        for k, m in enumerate(planned.outputs):
            columns.append(summed[:, k, :])
            if planned.delta:
                if method == "integrated-gradients":
                    reference = values[starts[:-1] + 1][:, m]  # y at the baseline: each point's second row
                else:
                    samples = self.request.samples
                    reference = np.stack([values[starts[i] + 1:starts[i] + 1 + samples, m].mean()
                                          for i in range(len(points))])
                delta = summed[:, k, :].sum(axis=1) - (at_x[:, m] - reference)
                columns.append(delta[:, None])
            if planned.auto_steps:
                columns.append(np.full((len(points), 1), float(steps or 0)))
        return np.concatenate(columns, axis=1)

    def _auto(self, points: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """--steps auto: each point's steps doubled from 16 until |delta| is within the tolerance (or 4096)."""
        steps, last = AUTO_STEPS
        result = self._attribute(points, rows, steps)
        deltas = self.planned.delta_columns()
        pending = np.arange(len(points))
        while True:
            if not len(pending) or steps >= last:
                return result
            tolerance = self._tolerance(result[pending])
            failing = pending[(np.abs(result[pending][:, deltas]) > tolerance).any(axis=1)]
            if not len(failing):
                return result
            steps *= 2
            result[failing] = self._attribute(points[failing], rows[failing], steps)
            pending = failing

    def _tolerance(self, columns: np.ndarray) -> np.ndarray:
        """|delta| allowed per point and output: --max-delta, else a fraction of |y(x) - y(baseline)|."""
        deltas = self.planned.delta_columns()
        if self.request.max_delta is not None:
            return np.full((len(columns), len(deltas)), self.request.max_delta)
        attributions = [[j for j, name in enumerate(self.planned.names) if name.startswith(f"attr({output})/")]
                        for output in (self.model.output_names[m] for m in self.planned.outputs)]
        totals = np.stack([np.abs(columns[:, cols].sum(axis=1)) for cols in attributions], axis=1)
        return AUTO_RELATIVE_DELTA * totals + 1e-6

    # -- the gradients --

    def _top_classes(self, points: np.ndarray) -> np.ndarray:
        """--target top: each point's largest output element, at the point itself (values only, in a batch of
        the run's points per batch)."""
        import tensorflow as tf

        size = self.points_per_batch
        if self.values is None:
            signature = tf.TensorSpec((size, len(self.model.coordinate_names)), tf.as_dtype(self.model.dtype))
            self.values = tf.function(self.function_model.frozen()).get_concrete_function(signature)
        classes = np.zeros(len(points), dtype=np.int64)
        for low in range(0, len(points), size):
            part = points[low:low + size]
            padded = np.concatenate([part, np.repeat(part[:1], size - len(part), axis=0)]) if len(part) < size else part
            with tf.device(self.device):
                values = self.values(tf.constant(padded.astype(self.dtype))).numpy()[:len(part)]
            classes[low:low + len(part)] = np.argmax(values, axis=1)
        return classes

    def _gradients(self, batch: np.ndarray, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every output's value (rows, M) and the attributed outputs' gradients on the wrt coordinates
        (rows, outputs, wrt), the batch padded to `row_batch` rows. With --target top, `classes` are the rows'
        picked classes: the values are y and target as the targeted model gives them, the gradient that class's."""
        import tensorflow as tf

        count = len(batch)
        if count < self.row_batch:
            batch = np.concatenate([batch, np.repeat(batch[:1], self.row_batch - count, axis=0)])
        if self.gradient is None:
            self.gradient = self._compile()
        arguments = [tf.constant(batch.astype(self.dtype))]
        if self.top:
            picks = np.zeros(self.row_batch, np.int32)
            picks[:count] = classes if classes is not None else 0
            arguments.append(tf.constant(picks))
        with tf.device(self.device):
            values, gradients = self.gradient(*arguments)
        values = values.numpy()[:count].astype(np.float64)
        if self.top:  # as the targeted model gives them: y (the picked class's value) and target
            values = np.stack([values[np.arange(count), classes], classes.astype(np.float64)], axis=1)
        return values, gradients.numpy()[:count].astype(np.float64)

    def _compile(self) -> Any:
        import tensorflow as tf

        function = self.function_model.frozen()  # the function the model computes, free of gradient conventions
        outputs, wrt = list(self.planned.outputs), list(self.planned.wrt)
        dtype = tf.as_dtype(self.model.dtype)
        rows_spec = tf.TensorSpec((self.row_batch, len(self.model.coordinate_names)), dtype)

        @tf.autograph.experimental.do_not_convert
        def values_and_gradients(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            values = function(rows)
            # Rows are independent: the gradient of an output's sum over the rows is each row's gradient.
            gradients = [tf.gradients(values[:, m], rows, unconnected_gradients=tf.UnconnectedGradients.ZERO)[0]
                         for m in outputs]
            return values, tf.gather(tf.stack(gradients, axis=1), wrt, axis=2)  # (rows, outputs, wrt)

        @tf.autograph.experimental.do_not_convert
        def picked_values_and_gradients(rows: tf.Tensor, classes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            values = function(rows)
            picked = tf.gather(values, classes, axis=1, batch_dims=1)
            gradient = tf.gradients(picked, rows, unconnected_gradients=tf.UnconnectedGradients.ZERO)[0]
            return values, tf.gather(gradient, wrt, axis=1)[:, None, :]  # (rows, 1, wrt)

        traced, signature = (picked_values_and_gradients, [rows_spec, tf.TensorSpec((self.row_batch,), tf.int32)]) \
            if self.top else (values_and_gradients, [rows_spec])
        compiled, self.engine = compiled_kernel(traced, signature, self.xla, len(function.graph_def.node),
                                                "gradients", self.inform)
        return compiled


def read_baselines(path: str, model: Any) -> np.ndarray:
    """`--baseline FILE`: points in the model's shapes (NPZ, HDF5) or a CSV, as a (B, D) array.

    Raises:
        RunError, UsageError: as reading points does.
    """
    from derivcli.points import open_source
    from derivcli.run import read_all_points

    suffix = path.lower().rsplit(".", 1)[-1]
    source = open_source(model.coordinate_names, [], [], path if suffix in ("csv", "tsv", "txt") else None,
                         path if suffix == "npz" else None, None, None, 1024, ",", model.tensors,
                         path if suffix in ("h5", "hdf5") else None)
    return read_all_points(source, len(model.coordinate_names), 10_000_000)


def checked_baselines(baselines: np.ndarray | None, total: int | None, method: str, path: str | None) -> None:
    """One baseline for all points, or one per point (integrated gradients); any number to draw from (expected).

    Raises:
        UsageError: a baseline file whose count is neither 1 nor the points'.
    """
    if baselines is None or method == "expected-gradients" or len(baselines) == 1:
        if baselines is not None and not len(baselines):
            raise UsageError(f"--baseline {path}: the file holds no points")
        return
    if total is None or len(baselines) != total:
        raise UsageError(f"--baseline {path}: {len(baselines):,} baselines for {total if total is not None else 'a stream of'} "
                         "points; give one baseline for all points, or one per point")


def parse_steps(text: str) -> int | str:
    """`--steps N` or `--steps auto`."""
    if text.strip() == "auto":
        return "auto"
    if text.strip().isdigit() and int(text) >= 1:
        return int(text)
    raise UsageError(f"--steps {text!r}: give a whole number of at least 1 (50 is the default), or auto")


__all__ = ["AttributionKernel", "AttributionPlan", "AttributionRequest", "METHODS", "RULES", "plan_attribution",
           "quadrature", "read_baselines"]
