"""`derivcli doctor`: every diagnostic that applies, as a list of findings.

Each finding has a severity (`ok`, `info`, `warning`, `error`), the check
that made it, and one line for the user. An `error` makes the command exit
with status 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from derivcli.diagnose import (
    BATCH_DEPENDENCE_TOLERANCE,
    batch_dependence,
    disconnected_weights,
    first_nonfinite_layer,
    nonfinite_weights,
    smoothness_verdict,
)
from derivcli.run import DEFAULT_BATCH_SIZE, DerivativeRequest, evaluate, format_point

SEVERITIES = ("ok", "info", "warning", "error")
# Points doctor uses when none are given: reproducible, inside the usual input range.
DEFAULT_POINTS = 32


def default_points(dimension: int, held: Sequence[int] = ()) -> np.ndarray:
    """32 seeded random points in [-1, 1]^dimension; the coordinates of discrete inputs (`held`) are 0 or 1,
    an id every lookup table has."""
    points = np.random.default_rng(0).uniform(-1, 1, (DEFAULT_POINTS, dimension))
    points[:, list(held)] = np.random.default_rng(1).integers(0, 2, (DEFAULT_POINTS, len(held)))
    return points


def continuous_names(model: Any) -> list[str]:
    """The coordinates derivatives are taken with respect to: every one but those of integer and boolean inputs."""
    return [name for p, name in enumerate(model.coordinate_names) if p not in model.discrete_positions]


# Derivative checks on more coordinates than this (an image's pixels) take a seeded sample of them.
SAMPLED_COORDINATES = 16
# ... and at most this many derivative columns over all outputs (a 1,000-class classifier: 2 coordinates).
SAMPLED_COLUMNS = 2000


def checked_coordinates(model: Any, wrt: Sequence[str] | None,
                        most: int = SAMPLED_COORDINATES) -> tuple[list[str], Finding | None]:
    """The coordinates the derivative checks differentiate: `--wrt`'s, every continuous one, or on a model with
    many (an image) a seeded sample, with the finding that names them."""
    from derivcli.run import positions_of, refuse_discrete

    names = continuous_names(model)
    if wrt:
        positions = positions_of(wrt, model.coordinate_names, "--wrt", "input")
        refuse_discrete(model.discrete_positions, model.coordinate_names, [("--wrt", positions)])
        return [model.coordinate_names[p] for p in positions], None
    count = max(1, min(most, SAMPLED_COLUMNS // max(1, len(model.output_names))))
    if len(names) <= count:
        return names, None
    picked = sorted(np.random.default_rng(0).choice(len(names), count, replace=False))
    chosen = [names[p] for p in picked]
    return chosen, Finding("info", "coordinates", f"the derivative checks take {count} of the {len(names):,} "
                                                  f"coordinates, sampled: {', '.join(chosen)}; --wrt picks others")
# float32 and float64 derivatives differing by more than this, relative to the
# column's largest value, make float32 a risk for that order.
FLOAT32_RISK_TOLERANCE = 1e-3


@dataclass
class Finding:
    severity: str
    check: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def smoothness_findings(model: Any, points: np.ndarray, batch_size: int, coordinates: Sequence[str]) -> list[Finding]:
    """The verdict from the graph, confirmed by the second derivatives at the points."""
    verdict = smoothness_verdict(model)
    second = evaluate(model, points, DerivativeRequest(partials=[{n: 2} for n in coordinates]), batch_size)
    names = [n for n in second if n.startswith("d2")]
    all_zero = all(np.all(second[n] == 0) for n in names)
    if verdict.zero_from_order is not None:
        confirmed = "; confirmed: every second derivative is 0 at all points" if all_zero else ""
        return [Finding("warning", "smoothness", verdict.reason + confirmed)]
    if all_zero and len(points):
        return [Finding(
            "warning", "smoothness",
            f"every pure second derivative is 0 at all {len(points)} points although the graph looks "
            f"{'smooth' if not verdict.unknown_ops else 'unclassified'}: a custom activation is probably "
            "piecewise linear, so higher derivatives are zero almost everywhere",
        )]
    return [Finding("ok", "smoothness", verdict.reason)]


def weight_findings(model: Any, points: np.ndarray) -> list[Finding]:
    if model.kind != "keras":
        return [Finding("info", "weights", "a SavedModel signature: trainable weights cannot be inspected")]
    found = disconnected_weights(model, points)
    if not found:
        return [Finding("ok", "weights", "every trainable weight receives a gradient from the outputs")]
    return [
        Finding("error", "weights", f"layer {w.layer}, weight {w.weight}: receives no gradient from the outputs, "
                                    f"so training never changes it: {w.reason}; {FIXES[w.kind]}")
        for w in found
    ]


# How to give a weight a gradient, by why it has none.
FIXES = {
    "unread": "remove it, or create it with trainable=False",
    "comparison": "use it in the value, not only in a condition: for a threshold, a smooth gate such as "
                  "sigmoid((w - |x|) / s) in place of where(|x| < w, ...); or create it with trainable=False "
                  "if it is meant to stay fixed",
    "unused": "use it in the computation of the outputs, or create it with trainable=False",
}


def nonfinite_findings(model: Any, points: np.ndarray, batch_size: int, coordinates: Sequence[str]) -> list[Finding]:
    broken = nonfinite_weights(model)
    if broken:
        layer, weight, count = broken[0]
        return [Finding(
            "error", "nan",
            f"layer {layer}, weight {weight}: {count} NaN/Inf value(s) in the weights"
            f"{f' (and {len(broken) - 1} more weight(s))' if len(broken) > 1 else ''}, so every output it feeds is "
            "NaN: the training diverged; retrain (a lower learning rate, gradient clipping) or load an earlier checkpoint",
        )]
    table = evaluate(model, points, DerivativeRequest(jacobian=True, wrt=list(coordinates)), batch_size)
    columns = [n for n in table if n not in model.coordinate_names]
    bad_rows = np.zeros(len(points), dtype=bool)
    bad_columns = []
    for name in columns:
        nonfinite = ~np.isfinite(table[name])
        if nonfinite.any():
            bad_columns.append(f"{name}: {int(nonfinite.sum())}")
            bad_rows |= nonfinite
    if not bad_columns:
        return [Finding("ok", "nan", "outputs and first derivatives are finite at every point")]
    first = points[np.argmax(bad_rows)]
    where = first_nonfinite_layer(model, first)
    origin = f"; it first appears in the {where[1]} of layer {where[0]}" if where else ""
    hint = (" (a NaN in the derivative of a finite value is the tf.where trap: the branch not taken "
            "still differentiates log/sqrt/division at a bad input)") if where and where[1] == "derivative" else ""
    return [Finding(
        "error", "nan",
        f"NaN/Inf at {int(bad_rows.sum())} of {len(points)} points ({', '.join(bad_columns)}); first at "
        f"{format_point(model.coordinate_names, first)}{origin}{hint}",
    )]


def batch_findings(model: Any, points: np.ndarray) -> list[Finding]:
    change = batch_dependence(model, points.astype(model.dtype))
    if change > BATCH_DEPENDENCE_TOLERANCE:
        return [Finding(
            "error", "batch",
            f"outputs change by {change:.2g} (relative) when the other points of a point's batch change: "
            "a layer mixes samples (batch statistics or a reduction over the batch axis); derivative commands "
            "need --batch-size 1 for this model",
        )]
    return [Finding("ok", "batch", "each output depends on its own point only (its batch against a batch of its copies)")]


def float32_findings(model: Any, double: Any, points: np.ndarray, order: int, batch_size: int,
                     coordinates: Sequence[str]) -> list[Finding]:
    """Pure derivatives up to `order` in float32 against float64."""
    if double is None:
        return [Finding("info", "float32", "the model's graph cannot run in float64: no float64 comparison")]
    request = DerivativeRequest(partials=[{n: k} for n in coordinates for k in range(1, order + 1)])
    single, precise = evaluate(model, points, request, batch_size), evaluate(double, points, request, batch_size)
    risky = []
    for name in single:
        if name in model.coordinate_names or name in model.output_names:
            continue
        scale = float(np.max(np.abs(precise[name]), initial=0.0))
        difference = float(np.max(np.abs(single[name] - precise[name]), initial=0.0))
        if scale > 0 and difference > FLOAT32_RISK_TOLERANCE * scale:
            risky.append(f"{name} ({difference / scale:.1g})")
    if risky:
        return [Finding(
            "warning", "float32",
            f"float32 and float64 disagree beyond {FLOAT32_RISK_TOLERANCE:g} relative for {', '.join(risky)}; "
            "use --dtype float64 for these orders",
        )]
    return [Finding("ok", "float32", f"float32 agrees with float64 to {FLOAT32_RISK_TOLERANCE:g} up to order {order}")]


# The highest order compared in float32 and float64 without --order. On graphs of more than LARGE_GRAPH_OPS ops (an
# image classifier) nested tapes of order 2 take minutes (MobileNetV3Small, 1,089 ops: 144 s for 4 second derivatives
# at 4 points), so there the comparison is of first derivatives, the smoothness verdict the graph's alone, and the
# checks take LARGE_GRAPH_COORDINATES coordinates; --order N asks for more.
DEFAULT_ORDER, LARGE_GRAPH_ORDER, LARGE_GRAPH_OPS, LARGE_GRAPH_COORDINATES = 4, 1, 500, 4


def run_doctor(model: Any, double: Any, points: np.ndarray, order: int | None,
               wrt: Sequence[str] | None = None) -> list[Finding]:
    """Every finding for `model` at `points`; `double` is its float64 version or None.

    The batch check runs first: a model that mixes samples is then examined
    one point at a time, which is exact for it.
    """
    large = len(model.frozen().graph_def.node) > LARGE_GRAPH_OPS
    coordinates, sampled = checked_coordinates(model, wrt, LARGE_GRAPH_COORDINATES if large else SAMPLED_COORDINATES)
    if order is None:
        order = LARGE_GRAPH_ORDER if large else DEFAULT_ORDER
    batch = batch_findings(model, points)
    batch_size = 1 if batch[0].severity == "error" else DEFAULT_BATCH_SIZE
    smoothness = [Finding("info", "smoothness", f"{smoothness_verdict(model).reason} (from the graph: second "
                                                "derivatives of a network this large are not computed without "
                                                "--order 2)")] if large and order < 2 \
        else smoothness_findings(double or model, points, batch_size, coordinates)
    with np.errstate(invalid="ignore"):  # NaN columns are a finding, not a warning
        return (
            ([sampled] if sampled else [])
            + smoothness
            + weight_findings(model, points)
            + nonfinite_findings(model, points, batch_size, coordinates)
            + batch
            + float32_findings(model, double, points, order, batch_size, coordinates)
        )


def diagnose_file(options: Any, order: int | None, wrt: Sequence[str] | None = None) -> tuple[str, list[Finding]]:
    """`derivcli doctor`, start to end: the model of `options` (a `command.RunOptions`), at its points or at
    DEFAULT_POINTS random points in [-1, 1]^d; returns where it looked and the findings."""
    from derivcli.check import MAX_CHECK_POINTS
    from derivcli.models import load_with_float64
    from derivcli.points import open_source
    from derivcli.run import read_all_points

    loaded, double = load_with_float64(
        options.model, options.custom_objects, options.unsafe, "float32", options.names, options.output_names,
        getattr(options, "target", None), getattr(options, "logits", False))
    dimension = len(loaded.coordinate_names)
    if options.at or options.grid or options.csv is not None or options.npz is not None or options.hdf5 is not None:
        source = open_source(loaded.coordinate_names, options.at, options.grid, options.csv, options.npz,
                             options.columns, delimiter=options.delimiter, tensors=loaded.tensors,
                             hdf5_path=options.hdf5)
        points = read_all_points(source, dimension, MAX_CHECK_POINTS)
        where = f"{len(points)} given point(s)"
    else:
        points = default_points(dimension, sorted(loaded.discrete_positions))
        held = len(loaded.discrete_positions)
        ids = f", ids 0 or 1 for the {held} discrete coordinate(s)" if held else ""
        where = (f"{DEFAULT_POINTS} random points in [-1, 1]^{dimension - held}{ids} "
                 "(give --at/--grid/--csv/--npz/--hdf5 for yours)")
    return where, run_doctor(loaded, double, points, order, wrt)
