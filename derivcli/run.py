"""Wiring: a loaded model, a point source and a writer make one run.

This is the library's front door (httpie's `core.py`): `plan` turns a request
into kernel columns and their names, `compute` streams the points through the
compiled kernel into a writer. Nothing here parses the command
line or knows about Typer.

Example:
    >>> from derivcli import load_model, DerivativeRequest, evaluate
    >>> model = load_model("sample_models/square_tanh.keras")
    >>> table = evaluate(model, [[0.5]], DerivativeRequest(partials=[{"x": 2}]))
    >>> table["d2y/dx^2"]
"""

from __future__ import annotations

import collections
import contextlib
import math
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from derivcli.errors import RunError, UsageError
from derivcli.models import LoadedModel
from derivcli.points import PointBatch, PointSource
from derivcli.specs import (
    MAX_COLUMNS,
    Direction,
    MultiIndex,
    all_partials,
    check_order,
    derivative_column,
    direction_column,
    laplacian_column,
    resolve_direction,
    resolve_partial,
)
from derivcli.writers import Layout, Writer

# Points per batch when --batch-size is not given: large enough to keep the
# compiled kernel busy, small enough for high orders on a laptop.
DEFAULT_BATCH_SIZE = 4096
# XLA's compilation (0.15 to 0.5 s on small nets, more for wide ones) pays for itself on a 2-core
# CPU from about this many points divided by the highest derivative order (bench/bench_jax.py:
# break-even measured at 0.77M points for a Hessian, 0.45M at order 3, 0.42M at order 4 and
# 0.22M at order 8), and for a gradient, which XLA speeds up by only 14% at 4096 points a batch
# and 8% at 65536, from XLA_GRADIENT_POINTS. A run of that many points known in advance uses XLA
# from its second batch (its first, from order XLA_FIRST_BATCH_FROM_ORDER on); a run whose size
# is not known (CSV, standard input) from its batch past that many points, so that a short
# stream never waits for a compilation.
XLA_POINTS_TIMES_ORDER = 1_500_000
XLA_GRADIENT_POINTS = 10_000_000
# Up to order 3 a plain graph traces in about a tenth of a second and runs a batch in milliseconds,
# so a long run's first rows come from it as fast as before XLA; from order 4 the plain first
# batch costs more than it saves (order 8: 0.6 s of tracing and 0.3 s for 65,536 points).
XLA_FIRST_BATCH_FROM_ORDER = 4
# Laplacians over more inputs than this never use XLA: over 50 inputs of a 256-wide net it
# compiled for 5 to 8 s and ran no faster (0.87x to 1.05x); over 2 and 16 inputs, 0.5x and 0.87x.
XLA_LAPLACIAN_INPUTS = 16
# Mixed partials of this order and above come from Taylor series along several
# directions: with --engine auto in float64, and with --engine taylor.
AUTO_MIXED_FROM = 6
# The most multi-index entries (derivative columns times inputs) a plan holds: 1.6 GB of tuples.
MAX_PLANNED_ENTRIES = 200_000_000
# A Jacobian over this many inputs or more is planned as one gradient block per output, not a column per input.
GRADIENT_BLOCK_FROM = 1024
AUTO_TAYLOR_FROM = 3
TAYLOR_MIXED_FROM = 3
# Memory that the batches waiting between the reader, the kernel and the writer may hold.
QUEUE_BYTES = 64 << 20


class PipeClosed(BaseException):
    """The reader of standard output went away (`| head -1`): stop quietly."""


@dataclass
class DerivativeRequest:
    """What a derivative command asks for.

    Attributes:
        partials: `--partial` specs, powers by input name.
        order: `--order N`, every partial of total order N over `wrt`.
        jacobian: all first derivatives (`grad`).
        hessian: the upper triangle of the Hessian (`hessian`).
        laplacian: the Laplacian (`laplacian`).
        wrt: the inputs the derivatives are taken over; None for all.
        outputs: the outputs to report; None for all.
        directions: `--direction` specs, derivatives along vectors.
    """

    partials: list[dict[str, int]] = field(default_factory=list)
    order: int | None = None
    jacobian: bool = False
    hessian: bool = False
    laplacian: bool = False
    wrt: list[str] | None = None
    outputs: list[str] | None = None
    expressions: list[str] = field(default_factory=list)
    directions: list[Direction] = field(default_factory=list)


@dataclass
class Plan:
    """What one run computes.

    Attributes:
        columns: the kernel's derivative columns (`engine.Column`).
        names: every value column's name, in table order (expressions last).
        combine: evaluates the operator expressions on the derivative graph, or None.
        first_gated: the position in `names` of the first column that
            `--max-abs`/`--strict` gate: the first one after the outputs'
            values, or 0 when there is nothing else (`eval`).
        highest_order: the highest derivative order computed.
        laplacian: whether a column or an expression takes a Laplacian.
    """

    columns: list[Any]
    names: list[str]
    combine: Callable[[Any], list[Any]] | None
    first_gated: int
    highest_order: int
    laplacian: bool = False


def positions_of(names: Sequence[str], known: Sequence[str], option: str, what: str) -> list[int]:
    """The positions of `names` in `known`; a tensor's name (`--wrt image`) stands for all its elements."""
    from derivcli.naming import expand_tensors, summarized

    # By dictionary: `--wrt image` of a 224x224x3 input expands to 150,528 names, and list.index is linear.
    place = {name: position for position, name in enumerate(known)}
    expanded = expand_tensors(names, known)
    unknown = [n for n in expanded if n not in place]
    if unknown:
        raise UsageError(
            f"{option} {','.join(names)}: {', '.join(map(repr, unknown))} is not an {what} "
            f"({what}s: {summarized(known)})"
        )
    return [place[n] for n in expanded]


def plan(model: LoadedModel, request: DerivativeRequest) -> Plan:
    """The kernel columns for a request, and their names, in table order.

    Values of the selected outputs come first, then for each output its
    derivatives in the order asked for, then the operator expressions.

    Raises:
        UsageError: unknown names in `wrt`, `outputs`, a partial spec or an
            expression.
    """
    from derivcli.engine import Column
    from derivcli.engine.operators import expression_combiner
    from derivcli.expressions import Derivative, parse_expressions

    inputs = model.coordinate_names
    outputs = (
        positions_of(request.outputs, model.output_names, "--outputs", "output")
        if request.outputs else list(range(len(model.output_names)))
    )
    held = model.discrete_positions
    wrt = (
        positions_of(request.wrt, inputs, "--wrt", "input")
        if request.wrt else [p for p in range(len(inputs)) if p not in held]
    )
    # A column's multi-index holds one entry per input: the Jacobian of a 224x224x3 image would hold
    # 150,528 squared of them. Refused in one line, before they are made, rather than met by the OOM killer.
    # A Jacobian over many inputs is one gradient block per output (`Column.block`), with no multi-index per column.
    blocks = request.jacobian and len(wrt) >= GRADIENT_BLOCK_FROM
    asked = len(request.partials) + len(request.directions) + (request.jacobian and not blocks) * len(wrt) \
        + request.hessian * math.comb(len(wrt) + 1, 2) + request.laplacian
    differentiated = len([m for m in outputs if m not in model.index_outputs])
    entries = asked * differentiated * len(inputs)
    if entries > MAX_PLANNED_ENTRIES:
        raise UsageError(
            f"{asked * differentiated:,} derivative columns over {len(inputs):,} inputs is more than derivcli plans in "
            f"one run ({entries:,} multi-index entries, at most {MAX_PLANNED_ENTRIES:,}); restrict --wrt to part of "
            "the input (--wrt x[0,0,0],x[0,1,0]) or pick columns with --partial")
    partials: list[MultiIndex] = [resolve_partial(p, inputs) for p in request.partials]
    vectors = [(resolve_direction(d, inputs), d.order) for d in request.directions]
    refuse_discrete(held, inputs, [("--wrt", [p]) for p in wrt]
                    + [("--partial", [p for p, power in enumerate(index) if power]) for index in partials]
                    + [("--direction", [p for p, v in enumerate(vector) if v]) for vector, _ in vectors])
    if blocks:
        partials.append(None)  # the gradient block's place among the derivatives
    elif request.jacobian:
        partials += all_partials(1, wrt, len(inputs))
    if request.hessian:
        partials += all_partials(2, wrt, len(inputs))
    if request.order is not None:
        check_order(request.order, "--order", str(request.order))
        count = math.comb(request.order + len(wrt) - 1, len(wrt) - 1) * len(outputs)
        if count > MAX_COLUMNS:
            raise UsageError(f"--order {request.order}: {count:,} partial derivatives over {len(wrt)} inputs is more "
                             f"than {MAX_COLUMNS:,} columns; pick them with --partial or restrict --wrt")
        partials += all_partials(request.order, wrt, len(inputs))
    zero = (0,) * len(inputs)
    columns = [Column(m, zero) for m in outputs]
    names: list[str | tuple[str, ...]] = [model.output_names[m] for m in outputs]  # a block's: one per input
    for m in outputs:
        output_name = model.output_names[m]
        if m in model.index_outputs:  # --target's index: a value, never differentiated
            continue
        for index in partials:
            if index is None:
                columns.append(Column(m, zero, block=tuple(wrt)))
                names.append(tuple(f"d{output_name}/d{inputs[p]}" for p in wrt))  # derivative_column's, in O(D)
                continue
            columns.append(Column(m, index))
            names.append(derivative_column(output_name, index, inputs))
        for vector, order in vectors:
            columns.append(Column(m, zero, along=vector, along_order=order))
            names.append(direction_column(output_name, vector, order))
        if request.laplacian:
            columns.append(Column(m, zero, laplacian_over=tuple(wrt)))
            names.append(laplacian_column(output_name))
    # The same derivative asked for twice (a --partial that --order also covers) is one column,
    # where it was first asked for; two expressions of one name may mean different things.
    first_asked = dict.fromkeys(zip(columns, names))
    columns = [c for c, _ in first_asked]
    names = [n for _, entry in first_asked for n in (entry if isinstance(entry, tuple) else (entry,))]
    expressions = parse_expressions(request.expressions, inputs, model.output_names)
    refuse_discrete(held, inputs, [("--expr", [p for p, power in enumerate(d.index) if power])
                                   for e in expressions for d in e.derivatives if isinstance(d, Derivative)])
    for expression in expressions:
        if any(d.output in model.index_outputs and (not isinstance(d, Derivative) or any(d.index))
               for d in expression.derivatives):
            raise UsageError(f"--expr {expression.text!r}: target is the index --target picked, a whole number that "
                             "has no derivative; differentiate y")
    names += [e.name for e in expressions]
    duplicates = sorted(n for n, count in collections.Counter(names).items() if count > 1)  # linear: 12,288 columns of an image
    if duplicates:
        raise UsageError(f"column {duplicates[0]!r} is asked for twice")
    clash = sorted(set(inputs) & set(names))
    if clash:
        raise UsageError(
            f"{clash[0]!r} names both an input and a result column (outputs: {', '.join(model.output_names)}); "
            "rename with --names or --output-names"
        )
    orders = [c.order for c in columns]
    for expression in expressions:
        derivative_orders = [sum(d.index) if isinstance(d, Derivative) else 2 for d in expression.derivatives]
        check_order(max(derivative_orders, default=0), "--expr", expression.text)
        orders += derivative_orders
    return Plan(
        columns, names,
        expression_combiner(expressions, wrt) if expressions else None,
        len(outputs) if len(names) > len(outputs) else 0,
        max(orders, default=0),
        request.laplacian or any(not isinstance(d, Derivative) for e in expressions for d in e.derivatives),
    )


def refuse_discrete(held: dict[int, str], inputs: Sequence[str], asked: Sequence[tuple[str, Sequence[int]]]) -> None:
    """A usage error for a derivative asked for with respect to an integer or boolean input.

    Args:
        held: the discrete coordinates by position, with their dtype (`LoadedModel.discrete_positions`).
        inputs: the coordinate names.
        asked: (option, positions it differentiates) for every request.
    """
    for option, positions in asked:
        discrete = [p for p in positions if p in held]
        if discrete:
            name = inputs[discrete[0]]
            raise UsageError(
                f"{option}: {name} is a discrete input ({held[discrete[0]]}: token ids, categories or labels), and a "
                "derivative with respect to a discrete input does not exist; derivcli holds it at its values and "
                "differentiates with respect to the others (an Embedding's effect is a derivative with respect to "
                "the layer's output, not its ids)")


@dataclass
class RunSummary:
    """What a run saw, for warnings and gates.

    Attributes:
        rows: points processed.
        nonfinite: NaN/Inf count per value column.
        first_nonfinite: the coordinates of the first row with a NaN/Inf.
        max_abs: the largest absolute finite value per value column.
        worst_point: the coordinates where each column's max_abs occurs.
        written_as_null: NaN/Inf cells written as JSON null.
    """

    value_names: list[str]
    rows: int = 0
    nonfinite: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    first_nonfinite: np.ndarray | None = None
    max_abs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    worst_point: list[np.ndarray | None] = field(default_factory=list)
    written_as_null: int = 0

    def __post_init__(self) -> None:
        k = len(self.value_names)
        self.nonfinite = np.zeros(k, dtype=np.int64)
        self.max_abs = np.zeros(k)
        self.worst_point = [None] * k

    def update(self, coordinates: np.ndarray, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        self.nonfinite += (~finite).sum(axis=0)
        if self.first_nonfinite is None and not finite.all():
            self.first_nonfinite = coordinates[np.argmin(finite.all(axis=1))]
        if len(values):
            magnitudes = np.where(finite, np.abs(values), -1.0)
            rows = magnitudes.argmax(axis=0)
            for j, row in enumerate(rows):
                if magnitudes[row, j] > self.max_abs[j]:
                    self.max_abs[j] = magnitudes[row, j]
                    self.worst_point[j] = coordinates[row]
        self.rows += len(values)


def make_kernel(
    model: LoadedModel, planned: Plan, device: str = "auto", engine: str = "auto", points: int | None = None,
    batch_size: int | None = None, xla: str = "auto",
) -> Any:
    """The compiled kernel for a plan, on the device chosen by `--device`.

    `points`: how many points the run has (all its shards'), when known in advance;
    with `batch_size`, it decides from which batch on XLA's compilation time pays
    for itself. Without `batch_size` the kernel never uses XLA.

    `engine`: `tape` (nested reverse mode only), `taylor` (pure derivatives of
    order >= 2 by Taylor series; a usage error when the model is not covered),
    or `auto` (Taylor where it covers the model, tapes elsewhere).

    `xla`: `auto` (from the batch where the compile pays for itself, as below), `on` (every batch of
    the run's batch size) or `off`.
    """
    from derivcli.engine import DerivativeKernel, select_device

    # Under auto, Taylor series serve plans of order 3 and higher, and Laplacians (the Forward
    # Laplacian). At order 2 they are no faster than tapes (bench_derivatives --quick, 1024 points:
    # 0.81 us/pt against 0.71), so a Hessian or a second derivative skips the probe: 0.2 s of start-up.
    wanted = engine == "taylor" or (engine == "auto" and (planned.highest_order >= AUTO_TAYLOR_FROM or planned.laplacian))
    program, reason = taylor_program_for(model) if wanted else (None, "")
    if engine == "taylor" and program is None:
        raise UsageError(f"--engine taylor does not cover this model ({reason}): use --engine auto or tape")
    # Mixed partials by interpolation (bench/bench_mixed.py): from order 6 over at most three
    # inputs, nested tapes trace for minutes where Taylor series take a second. The weighted
    # sum cancels, though: in float32 it keeps about 4 digits at order 6 and 3 at order 8,
    # against 6 for tapes. So auto interpolates in float64 only; --engine taylor always does.
    interpolate_from = None
    if program is not None:
        interpolate_from = TAYLOR_MIXED_FROM if engine == "taylor" else (
            AUTO_MIXED_FROM if model.dtype == "float64" else None)
    # XLA fuses the many small elementwise ops of tapes and series (bench/bench_jax.py: 0.45x to
    # 0.97x the plain graph's time per batch); a model whose ops it cannot compile runs plain graphs.
    xla_from = None
    if xla == "on" and batch_size is not None and planned.highest_order >= 1:
        xla_from = 0
    elif xla == "auto" and batch_size is not None and planned.highest_order >= 1 and all(
            len(c.laplacian_over or ()) <= XLA_LAPLACIAN_INPUTS for c in planned.columns):
        pays_from = XLA_GRADIENT_POINTS if planned.highest_order == 1 else \
            -(-XLA_POINTS_TIMES_ORDER // planned.highest_order)
        if points is None:  # a stream: once it has had that many points (at most twice the best's cost)
            xla_from = -(-pays_from // batch_size)
        elif points >= pays_from:
            xla_from = 0 if planned.highest_order >= XLA_FIRST_BATCH_FROM_ORDER else 1
    # Derivatives differentiate the model's function, free of the graph's gradient conventions
    # (`engine.graph`); values alone need no frozen graph.
    function = model.frozen() if planned.highest_order >= 1 else model.call_flat
    kernel = DerivativeKernel(
        function, len(model.coordinate_names), planned.columns, model.dtype,
        device=select_device(device), combine=planned.combine, taylor=program, xla_from=xla_from,
        interpolate_from=interpolate_from, batch_size=batch_size,
    )
    # What --timings reports: which engine serves, and why not Taylor series where they were wanted.
    kernel.engine = "Taylor series (tapes for first derivatives)" if program is not None else \
        f"nested tapes (Taylor series do not cover {reason})" if wanted else "nested tapes"
    kernel.refused = reason if wanted and program is None else ""
    return kernel


def taylor_program_for(model: LoadedModel) -> tuple[Any, str]:
    """The model's Taylor program and "", or None and why the Taylor engine does not cover it.

    A program is accepted only after a probe: on a few points, its coefficient 0
    must match the model's own output, and its series and Laplacian must trace.
    """
    import tensorflow as tf

    from derivcli.engine.taylor import NotCovered, TaylorProgram

    dimension = len(model.coordinate_names)
    try:
        program = TaylorProgram.from_frozen(model.frozen())
    except NotCovered as error:
        return None, str(error)
    probe = tf.constant(np.random.default_rng(0).uniform(-1, 1, (4, dimension)), tf.as_dtype(model.dtype))

    function = model.frozen()
    direction = tf.constant(np.random.default_rng(1).uniform(-1, 1, (1, dimension)), probe.dtype)

    @tf.function(autograph=False)
    def series_and_tapes(points: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        program.laplacian(points, range(dimension))
        series = program.series(points, direction, 2)
        # The same three quantities by nested tapes: value, first and second derivative along the direction.
        values = function(points)

        def along(tensor: tf.Tensor) -> tf.Tensor:
            return tf.stack([
                tf.reduce_sum(tf.gradients(tensor[:, m], points, unconnected_gradients="zero")[0] * direction, axis=1)
                for m in range(values.shape[1])
            ], axis=1)

        first = along(values)
        second = along(first)
        return tf.stack([series[0], series[1][0], 2 * series[2][0]]), tf.stack([values, first, second])

    try:
        actual, expected = (t.numpy() for t in series_and_tapes(probe))
    except NotCovered as error:
        return None, str(error)
    except Exception as error:  # an op the rules copy but TensorFlow refuses in this form
        return None, f"{type(error).__name__} while tracing its series"
    # A probe for gross errors (an op taken for a constant), not a precision test: the
    # two routes differ by round-off times the conditioning, far below these bounds.
    tolerance = 1e-3 if model.dtype == "float32" else 1e-8
    for order, what in enumerate(("the model's output", "its first derivatives", "its second derivatives")):
        finite = np.isfinite(expected[order])
        scale = np.max(np.abs(expected[order][finite]), initial=0.0) + 1.0
        if not np.allclose(actual[order], expected[order], rtol=tolerance, atol=tolerance * scale, equal_nan=True):
            return None, f"its series does not reproduce {what} (a probe against nested tapes)"
    return program, ""


def compute(
    model: LoadedModel,
    source: PointSource,
    kernel: Callable[[np.ndarray], np.ndarray],
    value_names: Sequence[str],
    writer: Writer,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """Streams every batch of `source` through `kernel` into `writer`.

    The writer is closed on success and aborted on any failure or interrupt,
    so no partial file is left.

    Raises:
        PipeClosed: standard output was closed by its reader.
        RunError: the kernel ran out of memory on a single point.
    """
    summary = RunSummary(list(value_names))
    dtype = np.dtype(model.dtype)
    held = model.discrete_positions
    # Three stages overlap: a thread parses the next batch and another formats
    # the last one while the kernel runs; TensorFlow and Arrow release the GIL.
    # The kernel's thread does nothing else, the summary included.
    def write_and_summarize(coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        with writer.naming_write_errors():
            writer.write(coordinates, passthrough, values)
        summary.update(coordinates, values)

    # Several batches may wait in each queue, to absorb jitter between the stages
    # (about a tenth faster on bench_io's toy model), within a bound on the memory they hold.
    row_bytes = 8 * len(model.coordinate_names)
    reading = Prefetcher(source.batches(batch_size), depth=queue_depth(batch_size * row_bytes))
    writing = InOrder(write_and_summarize, depth=queue_depth(batch_size * (row_bytes + 8 * len(value_names))))
    row = source.start  # the batch's first point in the whole run: it decides the kernel's XLA
    try:
        for index, batch in enumerate(reading):
            coordinates = points_in_dtype(batch.coordinates, dtype, model.coordinate_names, held, row, model.index_bounds)
            if index == 0:
                check_batch_independence(model, coordinates)
            in_place, own_rows = in_the_runs_batch(coordinates, row, batch_size, source.run_total)
            values = run_in_halves(kernel, in_place, row // batch_size)[own_rows]
            row += len(coordinates)
            writing.submit(coordinates, batch.passthrough, values)
            if progress is not None:
                progress(len(coordinates))
        writing.finish()
        with writer.naming_write_errors():
            writer.close()
    except BrokenPipeError:
        reading.stop()
        writing.stop()
        writer.abort()
        raise PipeClosed() from None
    except BaseException:
        reading.stop()
        writing.stop()
        writer.abort()
        raise
    summary.written_as_null = writer.nonfinite_written_as_null
    return summary


def in_the_runs_batch(
    coordinates: np.ndarray, row: int, batch_size: int, run_total: int | None
) -> tuple[np.ndarray, slice]:
    """The points in a batch of the shape the unsharded run gives them, and where they sit in it.

    A shard's first and last batch are parts of the unsharded run's batches. Computed
    alone, in a smaller batch, their last bits could differ from the unsharded run's:
    a BLAS library blocks its sums by the batch's shape, and XLA compiles for whole
    batches only. So they are computed at their own places in a batch of the unsharded
    run's size (the other places hold copies of the first point, and are dropped): a
    row's result depends only on its point, its place and the batch's shape, and the
    merged shards are the unsharded run's bits. It costs at most two batches a shard.
    A stream of unknown size is never a shard: its batches are the run's own.
    """
    first = row - row % batch_size
    if run_total is None or (first == row and len(coordinates) == min(batch_size, run_total - first)):
        return coordinates, slice(None)
    padded = np.repeat(coordinates[:1], min(batch_size, run_total - first), axis=0)
    padded[row - first:row - first + len(coordinates)] = coordinates
    return padded, slice(row - first, row - first + len(coordinates))


def points_in_dtype(
    coordinates: np.ndarray, dtype: np.dtype, names: Sequence[str], held: dict[int, str] | None = None,
    first_row: int = 0, bounds: dict[int, int] | None = None,
) -> np.ndarray:
    """The points in the compute dtype.

    `held`: the coordinates of integer and boolean inputs, which must be whole numbers that the
    compute dtype carries exactly (2**24 in float32, 2**53 in float64): a token id is never rounded.
    `bounds`: held coordinates that index the outputs (`--target NAME`), with the outputs' count.

    Raises:
        RunError: a finite coordinate beyond the dtype's range (1e308 is inf in float32); a held
            coordinate that is not a whole number, or beyond what the dtype holds exactly; an index
            beyond the outputs.
    """
    for position, count in (bounds or {}).items():
        values = coordinates[:, position]
        outside = ~((values >= 0) & (values < count) & (values == np.round(values)))
        if outside.any():
            row = int(np.argmax(outside))
            raise RunError(f"{names[position]}={values[row]:g} (point {first_row + row + 1:,}) is not an output index: "
                           f"--target {names[position]} picks one of the model's {count} output elements (0 to {count - 1})")
    if held:
        positions = sorted(held)
        values = coordinates[:, positions]
        exact = float(2 ** (np.finfo(dtype).nmant + 1))
        bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > exact)
        bad |= np.isin(np.array([held[p] for p in positions]), ["bool"])[None, :] & ~np.isin(values, (0, 1))
        if bad.any():
            row, column = np.argwhere(bad)[0]
            value, kind = values[row, column], held[positions[column]]
            fix = "; use --dtype float64 (whole numbers to 2**53)" if abs(value) > exact and value == round(value) \
                and np.dtype(dtype) == np.float32 else ""
            takes = "0 or 1" if kind == "bool" else f"whole numbers up to {exact:.0f} in {np.dtype(dtype).name}"
            raise RunError(f"{names[positions[column]]}={value:g} (point {first_row + row + 1:,}) is not a value of "
                           f"the {kind} input: it takes {takes}{fix}")
    with np.errstate(over="ignore"):
        converted = coordinates.astype(dtype)
    overflow = np.isinf(converted) & np.isfinite(coordinates)
    if overflow.any():
        row, column = np.argwhere(overflow)[0]
        raise RunError(f"{names[column]}={coordinates[row, column]:g} is beyond the largest {np.dtype(dtype).name} "
                       f"({np.finfo(dtype).max:.4g}); use --dtype float64")
    return converted


def queue_depth(batch_bytes: int) -> int:
    """How many batches of `batch_bytes` may wait between two stages: up to 8, within QUEUE_BYTES."""
    return max(1, min(8, QUEUE_BYTES // max(1, batch_bytes)))


class Prefetcher:
    """Iterates `items` in a background thread, up to `depth` items ahead.

    An exception raised by `items` is raised again by the consumer, in order.
    """

    _DONE = object()

    def __init__(self, items: Iterator[Any], depth: int = 2) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(items,), name="derivcli-reader", daemon=True)
        self.thread.start()

    def _fill(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
            self._put((self._DONE, None))
        except BaseException as error:  # handed to the consumer
            self._put((None, error))

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item, error = self.queue.get()
            if error is not None:
                raise error
            if item is self._DONE:
                return
            yield item

    def stop(self) -> None:
        """Stops the thread at its next item.

        It is a daemon, and it may be blocked reading a pipe that stays open,
        so it is given only a moment to close its file.
        """
        self.stopped.set()
        with contextlib.suppress(queue.Empty):
            self.queue.get_nowait()  # frees a thread blocked on a full queue
        self.thread.join(timeout=1.0)


class InOrder:
    """Calls `function` in a background thread, once per `submit`, in order.

    At most `depth` calls wait behind the running one. The first exception a
    call raises is raised again by the next `submit` or by `finish`.
    """

    def __init__(self, function: Callable[..., None], depth: int = 1) -> None:
        self.function = function
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="derivcli-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            arguments = self.queue.get()
            try:
                if arguments is None or self.stopped.is_set():
                    return
                if self.error is None:
                    self.function(*arguments)
            except BaseException as error:  # handed to the caller
                self.error = error
            finally:
                self.queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, *arguments: Any) -> None:
        self._raise()
        self.queue.put(arguments)

    def finish(self) -> None:
        """Waits for every call, and raises the first exception any of them raised."""
        self.queue.put(None)
        self.queue.join()
        self._raise()

    def stop(self) -> None:
        """Drops the calls not yet started and gives the running one a moment to end.

        The thread is a daemon: a write blocked on a pipe nobody reads cannot hold the exit.
        """
        self.stopped.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)  # wakes an idle thread
        self.thread.join(timeout=1.0)


def run_in_halves(kernel: Callable[..., np.ndarray], coordinates: np.ndarray, batch_index: int) -> np.ndarray:
    """Runs the kernel on batch `batch_index` of the run; a batch that runs out of memory is split in two and retried.

    Samples are independent, so the halves give the same rows; nothing is lost.

    Raises:
        RunError: a single point does not fit in memory.
    """
    import tensorflow as tf

    try:
        return kernel(coordinates, batch_index)
    except tf.errors.InvalidArgumentError as error:
        index = re.search(r"indices\[(\d+),\d+\] = (-?\d+) is not in \[0, (\d+)\)", error.message)
        if index is None:
            raise
        raise RunError(f"an index input holds {index[2]} (point {int(index[1]) + 1} of batch {batch_index + 1}), "
                       f"outside the {index[3]} rows of the model's lookup table (an Embedding's vocabulary)") from None
    except (tf.errors.ResourceExhaustedError, MemoryError):
        if len(coordinates) <= 1:
            raise RunError("out of memory on a single point: the model or the derivative order is too large "
                           "for this machine") from None
    half = len(coordinates) // 2
    return np.concatenate([run_in_halves(kernel, coordinates[:half], batch_index),
                           run_in_halves(kernel, coordinates[half:], batch_index)])


def auto_batch_size(model: LoadedModel, planned: Plan, parameters: int) -> int:
    """A batch size from the model's size and the memory available (`--batch-size auto`).

    A rough, deliberately generous estimate: a point's activations grow with the
    parameter count, and every gradient taken adds a pass's worth. A batch that
    still runs out of memory is split and retried (`run_in_halves`).

    It is a power of two: the memory available changes from run to run, and the
    batch size decides how a BLAS kernel blocks its sums, so a size that followed
    it to the point would change a result's last bits between two runs of one command.
    """
    itemsize = np.dtype(model.dtype).itemsize
    passes = 1 + sum(c.order for c in planned.columns) + 2 * len(planned.columns)
    per_point = itemsize * max(parameters, 1000) / 16 * passes
    per_point += 8 * itemsize * (len(model.coordinate_names) + len(planned.names))  # a row, in and out, a few copies
    fitting = int(min(65536, max(256, available_memory() / 8 // per_point)))
    return 1 << (fitting.bit_length() - 1)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux), or 4 GiB when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def check_batch_independence(model: LoadedModel, coordinates: np.ndarray) -> None:
    """Refuses a model whose outputs for a point depend on the rest of its batch.

    Raises:
        RunError: the model mixes samples, with the fix (`--batch-size 1`).
    """
    from derivcli.diagnose import BATCH_DEPENDENCE_TOLERANCE, batch_dependence

    change = batch_dependence(model, coordinates)
    if change > BATCH_DEPENDENCE_TOLERANCE:
        raise RunError(
            f"the model's output for a point changes with the other points of its batch "
            f"(by {change:.2g} relative, first points): a layer mixes samples, so per-sample "
            "derivatives of a batch would be wrong; rerun with --batch-size 1"
        )


def evaluate(
    model: LoadedModel,
    points: Any,
    request: DerivativeRequest,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
) -> dict[str, np.ndarray]:
    """Computes a request at an array of points, in memory; for library users.

    Args:
        model: from `derivcli.load_model`.
        points: an array of shape (N, D) in input order.
        request: what to compute.

    Returns:
        One array per column, keyed by column name, coordinates included.
    """
    coordinates = np.asarray(points, dtype=np.float64).reshape(-1, len(model.coordinate_names))
    planned = plan(model, request)
    names = planned.names
    kernel = make_kernel(model, planned, device, points=len(coordinates), batch_size=batch_size)
    dtype = np.dtype(model.dtype)
    coordinates = points_in_dtype(coordinates, dtype, model.coordinate_names, model.discrete_positions,
                                  bounds=model.index_bounds)
    coordinates = coordinates.astype(np.float64)
    check_batch_independence(model, coordinates[:batch_size].astype(dtype))
    parts = [
        kernel(coordinates[start : start + batch_size].astype(dtype), start // batch_size)
        for start in range(0, len(coordinates), batch_size)
    ]
    values = np.concatenate(parts) if parts else np.zeros((0, len(names)), dtype)
    table = {name: coordinates[:, j].astype(dtype) for j, name in enumerate(model.coordinate_names)}
    table.update({name: values[:, j] for j, name in enumerate(names)})
    return table


def forward_function(model: LoadedModel, batch_size: int = DEFAULT_BATCH_SIZE) -> Callable[[np.ndarray], np.ndarray]:
    """The model's values as a NumPy function of (N, D) points, compiled once."""
    import tensorflow as tf

    compiled = tf.function(
        model.call_flat,
        input_signature=[tf.TensorSpec((None, len(model.coordinate_names)), tf.as_dtype(model.dtype))],
    )

    def forward(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=model.dtype)
        parts = [compiled(points[i : i + batch_size]).numpy() for i in range(0, len(points), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(model.output_names)), model.dtype)

    return forward


def read_all_points(source: PointSource, dimension: int, limit: int) -> np.ndarray:
    """Every point of a source, in memory; for commands that need them all at once.

    Raises:
        UsageError: more than `limit` points.
    """
    batches = []
    count = 0
    for batch in source.batches(DEFAULT_BATCH_SIZE):
        batches.append(batch.coordinates)
        count += len(batch.coordinates)
        if count > limit:
            raise UsageError(f"more than {limit:,} points; check and doctor work on a sample: give fewer points")
    return np.concatenate(batches) if batches else np.zeros((0, dimension))


def layout_for(model: LoadedModel, source: PointSource, planned: Plan) -> Layout:
    """The writer layout: coordinates, pass-through columns, values; a shard's record; the arrays in the model's shapes."""
    from derivcli.shards import ShardRecord, run_identity

    value_names = planned.names

    clash = set(source.passthrough_names) & (set(model.coordinate_names) | set(value_names))
    if clash:
        raise UsageError(
            f"the CSV column {sorted(clash)[0]!r} has the name of an input or a result column; "
            "rename it, or rename the model's names with --names / --output-names"
        )
    record = None
    if source.shard is not None:
        identity, parts = run_identity(model.path, {
            "points": source.identity(), "columns": [model.coordinate_names, source.passthrough_names, value_names],
            "dtype": model.dtype})
        record = ShardRecord(*source.shard, run=identity, total_rows=source.run_total, parts=parts)
    return Layout(
        list(model.coordinate_names), list(source.passthrough_names), list(value_names),
        np.dtype(model.dtype), source.grid_shape, source.grid_axes, source.shard, record, source.total,
        shaped_arrays_of(model, planned), list(source.passthrough_shapes), integer_columns(model, planned),
    )


def integer_columns(model: LoadedModel, planned: Plan) -> dict[int, np.dtype]:
    """The float columns that hold whole numbers, by position among coordinates and values, with the dtype NPZ and HDF5
    write them in: integer and boolean inputs in theirs, `--target`'s index as int64."""
    columns = {position: np.dtype(dtype) for position, dtype in model.discrete_positions.items()}
    dimension = len(model.coordinate_names)
    index_names = {model.output_names[m] for m in model.index_outputs}
    columns.update({dimension + j: np.dtype(np.int64) for j, name in enumerate(planned.names) if name in index_names})
    return columns


def shaped_arrays_of(model: LoadedModel, planned: Plan) -> list[Any]:
    """The plan's columns that NPZ/HDF5 write in the model's shapes (`naming.shaped_arrays`)."""
    from derivcli.models import is_discrete
    from derivcli.naming import shaped_arrays

    dimension = len(model.coordinate_names)
    tensor_inputs, first = [], 0
    for info in model.model_inputs:
        names = model.coordinate_names[first:first + info.size]
        base = names[0].partition("[")[0]
        if len(info.shape) >= 2 and all(name.startswith(base + "[") for name in names):  # not renamed by --names
            tensor_inputs.append((base, info.shape, first))
        elif len(info.shape) == 1 and info.size > 1 and is_discrete(info.dtype):  # token ids: one (N, 16) array
            stem = names[0][:-1]
            if names == [f"{stem}{k}" for k in range(info.size)]:
                tensor_inputs.append((stem, info.shape, first))
        first += info.size
    tensor_output = None
    if len(model.outputs) == 1 and len(model.outputs[0].shape) >= 2 and model.target is None \
            and planned.names[:len(model.output_names)] == model.output_names:
        base = model.output_names[0].partition("[")[0]
        tensor_output = (base, model.outputs[0].shape, range(dimension, dimension + len(model.output_names)))
    if getattr(planned, "layer", None):  # attribute --layer: attr(y)/LAYER in the layer's output shape
        from derivcli.naming import ShapedArray

        layer_arrays = []
        for output in dict.fromkeys(output for _, output, _ in planned.attributions):
            columns = tuple(dimension + j for j, o, _ in planned.attributions if o == output)
            if len(columns) > 1:
                layer_arrays.append(ShapedArray(f"attr({output})/{planned.layer}", columns, tuple(planned.shape)))
        return shaped_arrays(tensor_inputs, None, []) + layer_arrays
    if hasattr(planned, "attributions"):  # attribute: attr(y)/x in the input's shape
        entries = [(dimension + j, output, (p,)) for j, output, p in planned.attributions]
        if not tensor_inputs:
            return []
        return shaped_arrays(tensor_inputs, None, entries, lambda output, name: f"attr({output})/{name}")
    if not tensor_inputs and tensor_output is None:
        return []
    derivatives = [(dimension + j, output, inputs) for j, output, inputs in low_order_derivatives(model, planned)]
    return shaped_arrays(tensor_inputs, tensor_output, derivatives)


def low_order_derivatives(model: LoadedModel, planned: Plan) -> list[tuple[int, str, tuple[int, ...]]]:
    """(value column, output name, the inputs differentiated, with repeats) of every partial derivative of order
    1 or 2 in the plan, a gradient block's columns one by one."""
    derivatives, position = [], 0
    for column in planned.columns:
        output = model.output_names[column.output]
        if column.block is not None:
            derivatives += [(position + k, output, (p,)) for k, p in enumerate(column.block)]
        elif column.along is None and column.laplacian_over is None and 1 <= sum(column.partial) <= 2:
            derivatives.append((position, output, tuple(p for p, power in enumerate(column.partial) for _ in range(power))))
        position += column.width
    return derivatives


def format_point(names: Sequence[str], point: Any) -> str:
    """A point for a message: `x=0.5, t=1`."""
    return ", ".join(f"{n}={float(v):.6g}" for n, v in zip(names, point))


def write_stderr(text: str) -> None:
    """Writes one line to standard error."""
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


__all__ = [
    "DEFAULT_BATCH_SIZE", "DerivativeRequest", "PipeClosed", "PointBatch", "RunSummary",
    "check_batch_independence", "Plan", "compute", "evaluate", "forward_function", "read_all_points", "layout_for", "make_kernel", "plan",
]
