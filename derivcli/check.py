"""`derivcli check`: automatic derivatives against float64 finite differences.

For each derivative column, the automatic derivatives (in the run's dtype)
are compared with Richardson-extrapolated central differences of the model
evaluated in float64 (a SavedModel's graph widened to float64). A column fails
when its largest error is above its tolerance, `atol + rtol * scale +
fd_error_estimate`, where `scale` is the column's largest finite-difference
magnitude and `fd_error_estimate` the largest error estimate of the finite
differences; the report prints all three, so the verdict can be read off it.
By default `atol` is 0, so the tolerance follows the column's scale.

A column whose finite-difference error estimate is as large as the column
itself (vanishing derivatives, about 1e-16) cannot be judged: any automatic
value of that size would pass. Such a column is `unresolved`, never `ok`;
`--strict` makes it fail.

On a piecewise-linear model, a point whose difference stencil straddles a
kink has no meaningful finite difference; such points are reported, not
compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from derivcli.finite_differences import BASE_STEP, finite_difference

DEFAULT_TOLERANCES = {"float32": (1e-4, 0.0), "float64": (1e-8, 0.0)}  # (rtol, atol): relative to the column's scale
# Within one linear piece, central differences at every step agree to round-off.
KINK_TOLERANCE = 1e-7
# A piecewise-linear model needs no extrapolation (its differences are exact
# within a piece), so a small step keeps fewer kinks inside the stencil.
PIECEWISE_LINEAR_STEP = 1e-4


@dataclass
class ColumnCheck:
    """The comparison of one derivative column."""

    name: str
    max_abs_error: float
    max_rel_error: float
    fd_error_estimate: float
    tolerance: float
    points: int
    kink_points: int
    passed: bool
    first_kink: np.ndarray | None = None
    worst_point: np.ndarray | None = None
    unresolved: str | None = None  # why the finite differences cannot judge a column that passed, if they cannot

    @property
    def status(self) -> str:
        if self.points == 0:
            return "skipped"
        if not self.passed:
            return "FAIL"
        return "unresolved" if self.unresolved else "ok"


@dataclass
class CheckReport:
    columns: list[ColumnCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.columns)


def check_columns(
    automatic: dict[str, np.ndarray],
    points: np.ndarray,
    derivatives: list[tuple[str, int, tuple[int, ...]]],
    float64_function: Any,
    rtol: float,
    atol: float,
    piecewise_linear: bool,
) -> CheckReport:
    """Compares automatic derivative columns with finite differences.

    Args:
        automatic: the automatic derivatives by column name.
        points: (N, D) float64 points.
        derivatives: (column name, output, multi-index) for each column to check.
        float64_function: the model in float64, (M, D) -> (M, outputs) array.
        rtol, atol: the tolerances, beyond the finite-difference error estimate.
        piecewise_linear: the model is piecewise linear, so steps that straddle
            a kink are detected and skipped.
    """
    report = CheckReport()
    for name, output, index in derivatives:
        step = PIECEWISE_LINEAR_STEP if piecewise_linear else BASE_STEP
        estimate = finite_difference(float64_function, points, index, output, step)
        automatic_values = np.asarray(automatic[name], dtype=np.float64)
        compared = np.ones(len(points), dtype=bool)
        if piecewise_linear:
            spread = np.max(np.abs(estimate.levels - estimate.levels[-1]), axis=0)
            magnitude = np.max(np.abs(estimate.levels), axis=0)
            compared = spread <= KINK_TOLERANCE * (magnitude + 1.0) + 4 * estimate.rounding
        error = np.abs(automatic_values - estimate.value)
        error[compared & ~np.isfinite(error)] = np.inf  # NaN counts as the largest error
        scale = float(np.max(np.abs(estimate.value[compared]), initial=0.0))
        fd_error = float(np.max(estimate.error[compared], initial=0.0))
        # One tolerance per column, printed beside the error it judges: the verdict is
        # max_abs_error <= tolerance, readable off the report's own numbers.
        tolerance = atol + rtol * scale + fd_error
        max_error = float(np.max(error[compared], initial=0.0))
        relative = error / max(scale, np.finfo(np.float64).tiny)
        unresolved = None
        if fd_error > 0 and fd_error >= scale:
            unresolved = (f"the finite differences' error estimate ({fd_error:.3g}) is as large as the column's "
                          f"largest value ({scale:.3g}): they cannot tell it from 0")
        report.columns.append(ColumnCheck(
            name=name,
            max_abs_error=max_error,
            max_rel_error=float(np.max(relative[compared], initial=0.0)),
            fd_error_estimate=fd_error,
            tolerance=tolerance,
            points=int(compared.sum()),
            kink_points=int((~compared).sum()),
            passed=max_error <= tolerance,
            first_kink=points[np.argmin(compared)] if not compared.all() else None,
            worst_point=points[np.argmax(np.where(compared, error, -np.inf))] if compared.any() else None,
            unresolved=unresolved,
        ))
    return report


def check_model(
    model: Any,
    double: Any,
    points: np.ndarray,
    request: Any,
    rtol: float | None = None,
    atol: float | None = None,
    batch_size: int = 4096,
    device: str = "auto",
) -> CheckReport:
    """Checks every derivative column of `request` on `model` at `points`.

    Args:
        model: the model whose automatic derivatives are checked.
        double: the same model in float64 for the finite differences (or the
            model itself when it cannot be promoted, a SavedModel).
        points: (N, D) points.
        request: a `DerivativeRequest`; its value and operator columns are ignored.
        rtol, atol: tolerances; None for the dtype's defaults.
    """
    from derivcli.diagnose import smoothness_verdict
    from derivcli.run import evaluate, forward_function, plan

    planned = plan(model, request)
    if any(column.block is not None for column in planned.columns):
        from derivcli.errors import UsageError

        raise UsageError(f"check compares each derivative column with finite differences: a gradient over "
                         f"{len(planned.columns[-1].block or ()):,} inputs is too many; pick columns with --partial "
                         "or restrict --wrt")
    automatic = evaluate(model, points, request, batch_size, device)
    derivatives = [
        (name, column.output, column.partial)
        for column, name in zip(planned.columns, planned.names) if sum(column.partial)
    ]
    default_rtol, default_atol = DEFAULT_TOLERANCES[model.dtype]
    return check_columns(
        automatic, points, derivatives, forward_function(double),
        default_rtol if rtol is None else rtol, default_atol if atol is None else atol,
        piecewise_linear=smoothness_verdict(model).zero_from_order == 2,
    )


def report_rows(report: CheckReport) -> tuple[Any, list[list[str]], np.ndarray]:
    """The report as a writer layout, its text columns and its float columns."""
    from derivcli.writers import Layout

    layout = Layout([], ["column", "status", "points", "kink_points"],
                    ["max_abs_error", "max_rel_error", "fd_error_estimate", "tolerance"], np.dtype(np.float64),
                    table_digits=3, full_digits={"tolerance"})  # an error's size; the tolerance as given
    text = [[c.name for c in report.columns], [c.status for c in report.columns],
            [str(c.points) for c in report.columns], [str(c.kink_points) for c in report.columns]]
    values = np.array([[c.max_abs_error, c.max_rel_error, c.fd_error_estimate, c.tolerance] for c in report.columns])
    return layout, text, values.reshape(-1, 4)


# check and doctor hold all points in memory; they are for samples, not sweeps.
MAX_CHECK_POINTS = 100_000


def run_check(options: Any, request: Any, rtol: float | None, atol: float | None,
              warn: Any = lambda message: None) -> CheckReport:
    """`derivcli check`, start to end: load (and the float64 twin), read the points, compare, write the table.

    Args:
        options: a `command.RunOptions`.
        request: the derivatives compared (`run.DerivativeRequest`).
        rtol, atol: the tolerances; None for the dtype's defaults.
        warn: receives each warning (points with a kink inside the finite-difference step).

    Raises:
        CheckFailed: a column differs beyond its tolerance (the table is written first).
    """
    from derivcli.errors import CheckFailed
    from derivcli.models import load_with_float64
    from derivcli.points import open_source
    from derivcli.run import DEFAULT_BATCH_SIZE, format_point, read_all_points
    from derivcli.writers import open_writer

    loaded, double = load_with_float64(
        options.model, options.custom_objects, options.unsafe, options.dtype, options.names, options.output_names,
        options.target, options.logits)
    source = open_source(loaded.coordinate_names, options.at, options.grid, options.csv, options.npz, options.columns,
                         delimiter=options.delimiter, tensors=loaded.tensors, hdf5_path=options.hdf5)
    points = read_all_points(source, len(loaded.coordinate_names), MAX_CHECK_POINTS)
    report = check_model(loaded, double or loaded, points, request, rtol, atol,
                         options.batch_size or DEFAULT_BATCH_SIZE, options.device)
    layout, text, values = report_rows(report)
    writer = open_writer(options.format, layout, options.output)
    try:
        writer.write(values[:, :0], text, values)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    for column in report.columns:
        if column.kink_points:
            warn(f"{column.name}: {column.kink_points} point(s) have a kink within the finite-difference "
                 f"step, not compared (first at {format_point(loaded.coordinate_names, column.first_kink)})")
    for column in report.columns:
        if column.unresolved and column.passed and not options.strict:
            warn(f"{column.name}: unresolved: {column.unresolved} (--strict makes this fail)")
    failed = [c for c in report.columns if not c.passed]
    unresolved = [c for c in report.columns if c.passed and c.unresolved]
    if options.strict and unresolved and not failed:
        raise CheckFailed(f"{len(unresolved)} column(s) unresolved (--strict); {unresolved[0].name}: "
                          f"{unresolved[0].unresolved}")
    if failed:
        worst = failed[0]
        raise CheckFailed(
            f"{len(failed)} column(s) differ from finite differences beyond tolerance; {worst.name}: max error "
            f"{worst.max_abs_error:.3g} at {format_point(loaded.coordinate_names, worst.worst_point)}"
        )
    return report
