"""One computing command, start to end: what `derivcli grad|hessian|laplacian|deriv|op|eval` does.

`run_command` loads the model, plans the columns, warns where the numbers
need a word (a piecewise-linear net, float32 ops under --dtype float64),
opens the points and the writer (and the plot), streams the batches through
the compiled kernel, and applies the gates (`--strict`, `--max-abs`). The
command line only parses options into `RunOptions` and presents: warnings,
the progress bar and `--timings` reach it through callbacks. From Python:

    >>> from derivcli.command import RunOptions, run_command
    >>> from derivcli.run import DerivativeRequest
    >>> from derivcli.specs import parse_grid
    >>> run_command(RunOptions("sample_models/square_tanh.keras", grid=[parse_grid("-1:1:5")],
    ...                        output="d.csv"), DerivativeRequest(jacobian=True))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from derivcli.errors import CheckFailed, UsageError
from derivcli.specs import AtPoint, GridAxis


@dataclass
class RunOptions:
    """Everything a computing command is told besides its request, validated."""

    model: str
    custom_objects: list[str] = field(default_factory=list)
    unsafe: bool = False
    names: list[str] | None = None
    output_names: list[str] | None = None
    at: list[AtPoint] = field(default_factory=list)
    grid: list[GridAxis] = field(default_factory=list)
    csv: str | None = None
    columns: list[str] | None = None
    delimiter: str = ","
    npz: str | None = None
    hdf5: str | None = None
    format: str = "csv"
    output: str | None = None
    batch_size: int | None = None  # None: auto
    dtype: str = "float32"
    device: str = "auto"
    engine: str = "auto"
    xla: str = "auto"  # --xla: auto (where the compile pays), on, off
    quiet: bool = False
    verbose: bool = False  # --verbose: information that is not a warning, even off a terminal
    summary: bool = False  # --summary: one row per value column (count, mean, std ...) instead of one per point
    max_abs: float | None = None
    strict: bool = False
    shard: tuple[int, int] | None = None
    timings: bool = False
    plot: str | None = None  # a .png/.svg/.pdf file, or "-" for the terminal
    plot_axes: list[str] | None = None
    plot_at: list[AtPoint] = field(default_factory=list)
    plot_style: tuple[int, str | None, str | None] = (100, None, None)  # --plot-dpi, --plot-title, --plot-cmap
    target: str | int | None = None  # --target: "top" or an output index
    logits: bool = False
    inputs: bool | None = None  # --inputs/--no-inputs in text formats; None: every input but a tensor's elements


@dataclass
class Timings:
    """Where a run's time went (`--timings`)."""

    load: float  # seconds to load the model, TensorFlow's import included
    first_batch: float | None  # seconds to the first batch's results, tracing included
    first_points: int
    rest: float  # seconds for the other points
    rows: int
    engine: str = ""  # the engine that served, and why not Taylor series where they were wanted

    def line(self) -> str:
        parts = [f"model loaded in {self.load:.2f} s (TensorFlow import included)"]
        if self.engine:
            parts.append(f"engine: {self.engine}")
        if self.first_batch is not None:
            parts.append(f"first batch of {self.first_points:,} point(s) in {self.first_batch:.2f} s (tracing included)")
            rest = self.rows - self.first_points
            if rest:
                parts.append(f"the other {rest:,} in {self.rest:.2f} s ({rest / max(self.rest, 1e-9):,.0f} points/s)")
        return "; ".join(parts)


Warn = Callable[[str], None]
# Given the points (None: unknown) and the batch size: a callback per batch's points, and one to stop.
ProgressFactory = Callable[[int | None, int], tuple[Callable[[int], None] | None, Callable[[], None]]]


def _no_progress(total: int | None, batch_size: int) -> tuple[None, Callable[[], None]]:
    return None, lambda: None


def run_command(
    options: RunOptions, request: Any, warn: Warn = lambda message: None,
    progress: ProgressFactory = _no_progress, terminal_plot: Callable[[Any], None] | None = None,
    inform: Callable[[str], None] = lambda message: None,
) -> Any:
    """Loads, plans, computes and writes one derivative command; applies the gates.

    Args:
        options: the validated options.
        request: a `run.DerivativeRequest`.
        warn: receives each warning (the command line prints them unless --quiet).
        inform: receives information that is not a warning (a passing gate's margin; the command line prints it on
            a terminal, or with --verbose).
        progress: makes the progress bar (the command line's shows on a terminal).
        terminal_plot: draws `--plot -` figures (given the plot's data); None leaves them out.

    Returns:
        The run's `RunSummary`, with `timings` set.

    Raises:
        CheckFailed: a gate failed (after the output is complete and kept).
    """
    from derivcli.models import load_model
    from derivcli.points import open_source
    from derivcli.run import DEFAULT_BATCH_SIZE, auto_batch_size, compute, layout_for, make_kernel, plan
    from derivcli.specs import MAX_COLUMNS
    from derivcli.writers import open_text_writer, open_writer

    started = time.perf_counter()
    if options.plot is not None:
        from derivcli.plots import check_plot_request

        check_plot_request(options)
    model = load_model(options.model, options.custom_objects, options.unsafe, options.dtype,
                       options.names, options.output_names, options.target, options.logits)
    loaded = time.perf_counter()
    attributing = type(request).__name__ == "AttributionRequest"
    if attributing:
        from derivcli.attribution import plan_attribution

        planned = plan_attribution(model, request)
    else:
        planned = plan(model, request)
    for message in numerical_warnings(model, planned) + held_inputs_note(model, request, planned):
        warn(message)
    # Shards must cut the points identically on every machine, so they never size batches from memory.
    batch_size = options.batch_size or (
        DEFAULT_BATCH_SIZE if options.shard else auto_batch_size(model, planned, model.parameter_count))
    if attributing:  # a batch of rows: a point's steps or samples are rows, and the run's batches hold points
        from derivcli.attribution import (
            AttributionKernel,
            LayerAttributionKernel,
            auto_rows,
            checked_baselines,
            read_baselines,
        )
        from derivcli.engine import select_device

        batch_size = options.batch_size or auto_rows(len(model.coordinate_names), batch_size)
        baselines = read_baselines(request.baseline, model) if request.baseline not in (None, "zero") else None
        if request.layer is not None:
            if baselines is not None:
                raise UsageError("--layer integrates from zero at the layer's output: leave out --baseline FILE")
            kernel = LayerAttributionKernel(model, planned, request, batch_size, select_device(options.device),
                                            options.xla, inform)
        else:
            kernel = AttributionKernel(model, planned, request, batch_size, baselines, select_device(options.device),
                                       options.xla, inform)
        batch_size = kernel.points_per_batch
    source = open_source(model.coordinate_names, options.at, options.grid, options.csv, options.npz,
                         options.columns, options.shard, batch_size, options.delimiter, model.tensors, options.hdf5)
    if attributing:
        checked_baselines(baselines, source.run_total, request.method, request.baseline)
        if options.batch_size is None:
            kernel.fit_rows(source.run_total)
    for note in source.notes:
        warn(note)
    if options.shard and options.output in (None, "-"):
        warn("--shard to standard output: merge checks a shard by the record written beside its file; "
             "write each shard with -o FILE")
    layout = layout_for(model, source, planned)
    text = options.format not in ("npz", "hdf5") and not options.summary
    kept, note = written_inputs(model, options.inputs) if text else (None, None)
    written = len(layout.header) - len(model.coordinate_names) + (len(model.coordinate_names) if kept is None
                                                                    else len(kept))
    if text and written > MAX_COLUMNS:
        raise UsageError(too_many_columns(model, planned, written, kept is None or len(kept) > 0))
    if not attributing:
        kernel = make_kernel(model, planned, options.device, options.engine, points=source.size_in_advance,
                             batch_size=batch_size, xla=options.xla)
    if options.plot is not None and not options.summary:  # first: a bad --plot-axes stops the run before any file
        from derivcli.plots import ImagePlotWriter, PlotWriter, PointsPlotWriter, Tee, image_input

        if options.grid:
            picture = PlotWriter(layout, options, planned.first_gated, terminal_plot, source.axes)
        elif image_input(layout):
            picture = ImagePlotWriter(layout, options, terminal_plot)
        else:
            picture = PointsPlotWriter(layout, options, planned.first_gated, terminal_plot)
    if options.summary:
        from derivcli.summary import SummaryWriter

        writer: Any = SummaryWriter(layout, options.format, options.output, summary_bars(model, planned),
                                    options if options.plot is not None else None)
    else:
        writer = open_text_writer(options.format, layout, options.output, kept) if text \
            else open_writer(options.format, layout, options.output)
    if options.plot is not None and not options.summary:
        writer = Tee(writer, picture)
    advance_bar, stop = progress(source.total, batch_size)
    first_batch: list[tuple[float, int]] = []  # when the first batch was computed, and its points

    def advance(points: int) -> None:
        if not first_batch:
            first_batch.append((time.perf_counter(), points))
        if advance_bar is not None:
            advance_bar(points)

    computing = time.perf_counter()
    try:
        summary = compute(model, source, kernel, planned.names, writer, batch_size, advance)
    finally:
        stop()
    finished = time.perf_counter()
    summary.timings = Timings(
        loaded - started, first_batch[0][0] - computing if first_batch else None,
        first_batch[0][1] if first_batch else 0, finished - first_batch[0][0] if first_batch else 0.0, summary.rows,
        getattr(kernel, "engine", ""))
    for message in result_warnings(model, summary) + ([note] if note else []):
        warn(message)
    if attributing and request.max_delta is not None:
        delta_gate(model.coordinate_names, summary, planned.delta_columns(), request.max_delta)
    gate(options, model.coordinate_names, summary, planned.first_gated, inform)
    return summary


def written_inputs(model: Any, inputs: bool | None) -> tuple[list[int] | None, str | None]:
    """The coordinates a text format writes (None: all) and the note that says what was left out.

    By default a tensor input's elements (an image's pixels) are left out: a text table of them is
    unreadable and, on most images, wider than any table takes; `--inputs` puts them in and
    `--no-inputs` leaves out every input's coordinates.
    """
    if inputs is True:
        return None, None
    if inputs is False:
        return [], None
    kept, left, start = [], [], 0
    for info in model.model_inputs:
        if len(info.shape) >= 2:
            name = model.coordinate_names[start].partition("[")[0]
            left.append(f"{name} ({'x'.join(map(str, info.shape))})")
        else:
            kept.extend(range(start, start + info.size))
        start += info.size
    kept.extend(range(start, len(model.coordinate_names)))  # a --target NAME's label input, if any
    if not left:
        return None, None
    return kept, (f"the elements of the tensor input {', '.join(left)} are left out of the text output; --inputs puts "
                  "them in, and NPZ or HDF5 (-o out.npz) keep them in their shapes")


def too_many_columns(model: Any, planned: Any, columns: int, inputs_written: bool) -> str:
    """The one-line error of a text table too wide to write, with the ways out that would help this run."""
    from derivcli.specs import MAX_COLUMNS

    ways = ["write NPZ or HDF5 (-o out.npz), which keep tensors in their shapes"]
    if len(model.output_names) > 1:
        ways.append("pick outputs with --outputs")
    if inputs_written:
        ways.append("leave out the inputs with --no-inputs")
    derivatives = len(planned.names) - len(model.output_names)
    if planned.highest_order >= 1 and derivatives > MAX_COLUMNS // 10:  # a few columns more or less would not do
        ways.append("restrict the inputs differentiated with --wrt")
    return f"{columns:,} columns is more than a text table takes ({MAX_COLUMNS:,}): {'; '.join(ways)}"


def summary_bars(model: Any, planned: Any) -> list[tuple[int, str, str]]:
    """(value column, output, input) of each first derivative or attribution: the bars of `--summary --plot`."""
    from derivcli.run import low_order_derivatives

    if hasattr(planned, "attributions"):  # the attributed coordinate, or the layer's element (`attr(y)/embed3`)
        return [(j, output, planned.names[j].partition("/")[2]) for j, output, _ in planned.attributions]
    return [(j, output, model.coordinate_names[inputs[0]])
            for j, output, inputs in low_order_derivatives(model, planned) if len(inputs) == 1]


def delta_gate(coordinate_names: Sequence[str], summary: Any, columns: Sequence[int], tolerance: float) -> None:
    """`attribute --max-delta TOL`: CheckFailed when a path method's completeness is off by more than TOL."""
    from derivcli.run import format_point

    if not columns or summary.rows == 0:
        return
    worst = max(columns, key=lambda j: summary.max_abs[j])
    if summary.max_abs[worst] > tolerance or summary.nonfinite[list(columns)].any():
        raise CheckFailed(f"max |{summary.value_names[worst]}| = {summary.max_abs[worst]:.6g} at "
                          f"{format_point(coordinate_names, summary.worst_point[worst])} exceeds --max-delta "
                          f"{tolerance:g}: more --steps (or --steps auto), or another --rule")


def numerical_warnings(model: Any, planned: Any) -> list[str]:
    """What the user must know before trusting the columns: zero higher orders, float32 inside float64."""
    messages = []
    if planned.highest_order >= 2:
        from derivcli.diagnose import smoothness_verdict

        verdict = smoothness_verdict(model)
        if verdict.zero_from_order is not None and planned.highest_order >= verdict.zero_from_order:
            messages.append(f"derivatives of order >= {verdict.zero_from_order} are 0 wherever the lower orders "
                            f"are finite: {verdict.reason}")
    if model.dtype == "float64" and planned.highest_order >= 1:
        narrow = model.frozen().low_precision
        if narrow:
            messages.append(f"--dtype float64: {len(narrow)} op(s) of the model compute in float32 or hold "
                            f"float32-rounded constants (first: {narrow[0]}); their rounding (about 1e-8 "
                            "relative) stays in the results")
    return messages


def held_inputs_note(model: Any, request: Any, planned: Any) -> list[str]:
    """A derivative command on a model whose every input is integer (token ids): why it prints no derivative, and
    what to run instead."""
    from derivcli.run import DerivativeRequest

    asked = isinstance(request, DerivativeRequest) and (request.jacobian or request.hessian or request.laplacian
                                                        or request.partials or request.order)
    if not asked or planned.highest_order >= 1 or len(model.discrete_positions) < len(model.coordinate_names):
        return []
    embeddings = [layer.name for layer in model.keras_model.layers if type(layer).__name__ ==
                  "Embedding"] if model.kind == "keras" else []
    hint = f"attribute --layer {embeddings[0]}" if embeddings else "attribute --layer LAYER (an Embedding)"
    return [f"every input of this model is integer (token ids or categories): they are held at their values and "
            f"never differentiated, so there is no derivative to print; {hint} attributes the output to each token"]


def result_warnings(model: Any, summary: Any) -> list[str]:
    """NaN/Inf in the results, and NaN/Inf written as JSON null."""
    from derivcli.run import format_point

    messages = []
    total = int(summary.nonfinite.sum())
    if total:
        where = ", ".join(f"{n}: {int(c)}" for n, c in zip(summary.value_names, summary.nonfinite) if c)
        messages.append(f"{total} NaN/Inf value(s) ({where}); first at "
                        f"{format_point(model.coordinate_names, summary.first_nonfinite)}")
    if summary.written_as_null:
        messages.append(f"{summary.written_as_null} NaN/Inf value(s) written as JSON null")
    return messages


def gate(options: RunOptions, coordinate_names: Sequence[str], summary: Any, first_gated: int, inform: Warn) -> None:
    """`--strict` and `--max-abs`: CheckFailed (exit status 3) with a one-line summary when they fail.

    The output is complete and kept either way: the gate judges the numbers,
    it does not withhold them.
    """
    from derivcli.run import format_point

    gated = range(first_gated, len(summary.value_names))
    nonfinite = int(summary.nonfinite[first_gated:].sum())
    if nonfinite and (options.strict or options.max_abs is not None):
        raise CheckFailed(f"{nonfinite} NaN/Inf value(s); first at "
                          f"{format_point(coordinate_names, summary.first_nonfinite)}")
    if options.max_abs is None or not len(gated) or summary.rows == 0:
        return
    worst = max(gated, key=lambda j: summary.max_abs[j])
    name, value = summary.value_names[worst], summary.max_abs[worst]
    point = format_point(coordinate_names, summary.worst_point[worst])
    if value > options.max_abs:
        raise CheckFailed(f"max |{name}| = {value:.6g} at {point} exceeds --max-abs {options.max_abs:g}")
    inform(f"max |{name}| = {value:.6g} at {point}, within --max-abs {options.max_abs:g}")


__all__ = ["RunOptions", "Timings", "gate", "run_command"]
