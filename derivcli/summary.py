"""`--summary`: one row per value column (count, nan, mean, std, mean_abs, rms, min, max) in constant memory.

Each batch's moments are folded into the run's with the parallel update of Chan, Golub and LeVeque
(count, mean and the sum of squared deviations M2), so the summary of any number of points needs
one row of numbers per column. A shard's summary keeps those moments in its record, and `merge`
folds the shards' moments the same way: the merged summary is the whole run's, to round-off.
NaN is counted in `nan` and left out of the rest; std is the sample standard deviation (ddof = 1,
as pandas computes it), NaN below two values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from derivcli.writers import Layout, Writer, open_writer

SUMMARY_COLUMNS = ["count", "nan", "mean", "std", "mean_abs", "rms", "min", "max"]
MOMENTS = ("count", "nan", "mean", "m2", "abs", "sq", "min", "max")  # what a shard's record keeps


class Moments:
    """The running moments of named columns."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        k = len(self.names)
        self.count, self.nan = np.zeros(k), np.zeros(k)
        self.mean, self.m2, self.abs, self.sq = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
        self.min, self.max = np.full(k, np.inf), np.full(k, -np.inf)

    def update(self, values: np.ndarray) -> None:
        """Folds a batch (rows, columns) in."""
        values = np.asarray(values, dtype=np.float64)
        present = ~np.isnan(values)
        count = present.sum(axis=0).astype(np.float64)
        kept = np.where(present, values, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, kept.sum(axis=0) / np.maximum(count, 1), 0.0)
            m2 = np.where(present, values - mean, 0.0)
            m2 = (m2 * m2).sum(axis=0)
        self.fold({"count": count, "nan": (~present).sum(axis=0).astype(np.float64), "mean": mean, "m2": m2,
                   "abs": np.abs(kept).sum(axis=0), "sq": (kept * kept).sum(axis=0),
                   "min": np.where(present, values, np.inf).min(axis=0, initial=np.inf),
                   "max": np.where(present, values, -np.inf).max(axis=0, initial=-np.inf)})

    def fold(self, other: dict[str, np.ndarray]) -> None:
        """Chan's parallel update with another set of moments of the same columns."""
        total = self.count + other["count"]
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other["mean"] - self.mean
            share = np.where(total > 0, other["count"] / np.maximum(total, 1), 0.0)
            self.m2 = self.m2 + other["m2"] + delta * delta * self.count * share
            self.mean = self.mean + delta * share
        self.count = total
        self.nan = self.nan + other["nan"]
        self.abs, self.sq = self.abs + other["abs"], self.sq + other["sq"]
        self.min, self.max = np.minimum(self.min, other["min"]), np.maximum(self.max, other["max"])

    def table(self) -> np.ndarray:
        """(columns, SUMMARY_COLUMNS): what --summary writes."""
        n = self.count
        with np.errstate(invalid="ignore", divide="ignore"):
            empty = n == 0
            mean = np.where(empty, np.nan, self.mean)
            std = np.where(n > 1, np.sqrt(self.m2 / np.maximum(n - 1, 1)), np.nan)
            mean_abs = np.where(empty, np.nan, self.abs / np.maximum(n, 1))
            rms = np.where(empty, np.nan, np.sqrt(self.sq / np.maximum(n, 1)))
            low, high = np.where(empty, np.nan, self.min), np.where(empty, np.nan, self.max)
        return np.stack([n, self.nan, mean, std, mean_abs, rms, low, high], axis=1)

    def to_dict(self) -> dict[str, Any]:
        """The moments as JSON numbers (for a shard's record): every digit, infinities as strings."""
        def numbers(array: np.ndarray) -> list[Any]:
            return [float(v) if np.isfinite(v) else repr(float(v)) for v in array]

        return {"columns": self.names, **{key: numbers(getattr(self, key)) for key in MOMENTS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Moments:
        moments = cls(data["columns"])
        for key in MOMENTS:
            setattr(moments, key, np.array([float(v) for v in data[key]], dtype=np.float64))
        return moments


def summary_layout(layout: Layout, names: Sequence[str]) -> Layout:
    """The layout of a summary table: a text column `column`, then the statistics (float64)."""
    return Layout([], ["column"], list(SUMMARY_COLUMNS), np.dtype(np.float64), shard=layout.shard,
                  shard_record=layout.shard_record, total_rows=len(names), table_digits=6)  # csv keeps every digit


class SummaryWriter(Writer):
    """Takes a run's batches, keeps their moments, and writes the summary table when the run ends, in the
    format chosen (`open_writer`); a shard's record carries the moments for `merge`."""

    def __init__(self, layout: Layout, format_name: str, output: str | None,
                 bars: Sequence[tuple[int, str, str]] = (), plot: Any = None) -> None:
        """`bars`: (value column, output, input) of each first derivative or attribution, which `plot` (the run's
        options, with `plot` set) draws as a bar chart of mean |dy/dx_i| per input, with the spread."""
        self.plot, self.layout = plot, layout
        # Index columns (--target's `target`) are labels, not quantities: a mean class index means nothing.
        dimension = len(layout.coordinate_names)
        self.kept = [j for j in range(len(layout.value_names)) if dimension + j not in layout.integer_columns]
        position = {j: k for k, j in enumerate(self.kept)}
        self.bars = [(position[j], output, name) for j, output, name in bars if j in position]
        names = [layout.value_names[j] for j in self.kept]
        self.moments = Moments(names)
        self.points = 0
        self.inner = open_writer(format_name, summary_layout(layout, names), output)
        self.file = self.inner.file
        self.nonfinite_written_as_null = 0

    def write(self, coordinates: np.ndarray, passthrough: list[Any], values: np.ndarray) -> None:
        self.moments.update(values[:, self.kept].astype(self.layout.dtype))  # the numbers the rows would hold
        self.points += len(values)

    def close(self) -> None:
        record = self.inner.layout.shard_record
        if record is not None:  # merge folds the shards' moments: the record carries them
            self.inner.layout.shard_record = dataclasses.replace(
                record, summary={**self.moments.to_dict(), "points": self.points})
        write_summary(self.inner, self.moments)
        self.nonfinite_written_as_null = self.inner.nonfinite_written_as_null
        if self.plot is not None and self.plot.plot not in (None, "-"):
            from derivcli.plots import Style, save_figure

            save_figure(bar_chart(self.moments, self.bars, Style(*self.plot.plot_style)), self.plot.plot)

    def abort(self) -> None:
        self.inner.abort()


def write_summary(writer: Writer, moments: Moments) -> None:
    """Writes the summary table of `moments` through `writer` and closes it."""
    with writer.naming_write_errors():
        writer.write(np.zeros((len(moments.names), 0)), [list(moments.names)], moments.table())
        writer.close()


def bar_chart(moments: Moments, bars: Sequence[tuple[int, str, str]], style: Any) -> Any:
    """One panel per output: a horizontal bar per input of the mean |dy/dx_i| (or |attribution|) over the points,
    largest at the top, with a line for the standard deviation of dy/dx_i."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    table = moments.table()
    outputs = list(dict.fromkeys(output for _, output, _ in bars))
    most = max(sum(1 for _, o, _ in bars if o == output) for output in outputs)
    figure = Figure(figsize=(5.5 * len(outputs), 0.8 + 0.28 * most + 0.6), dpi=style.dpi, layout="constrained")
    panels = figure.subplots(1, len(outputs), squeeze=False)[0]
    names = moments.names
    for panel, output in zip(panels, outputs):
        mine = [(names[j], name, table[j]) for j, o, name in bars if o == output]
        mine.sort(key=lambda item: -item[2][4] if np.isfinite(item[2][4]) else np.inf)
        labels = [name for _, name, _ in mine][::-1]
        means = np.array([row[4] for _, _, row in mine][::-1])
        spread = np.array([row[3] for _, _, row in mine][::-1])
        panel.barh(labels, means, xerr=np.nan_to_num(spread), color="#4c72b0", ecolor="#444444", capsize=2)
        kind = "attribution" if mine and mine[0][0].startswith("attr(") else "derivative"
        panel.set_xlabel(f"mean |{kind}| over {int(table[0][0]):,} points (line: std)")
        panel.set_title(output, fontsize=10)
        panel.grid(axis="x", alpha=0.3)
    if style.title:
        figure.suptitle(style.title, fontsize=11)
    return figure
