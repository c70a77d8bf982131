"""Pictures of grid results: curves on 1-D grids, heatmaps on 2-D grids, as files or in the terminal.

`PlotData` holds one result on its grid; `choose_view` picks the one or two
axes drawn (`--plot-axes`, the others pinned by `--plot-at` or at their first
value); `build_figure` makes the matplotlib figure (Agg, imported only here),
and `render_terminal` draws the same panels with Unicode characters: Braille
dots for curves, shade blocks for heatmaps. `PlotWriter` collects a run's
values for `--plot`; `plot_results` serves `derivcli plot`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from derivcli.errors import RunError, UsageError
from derivcli.specs import AtPoint
from derivcli.writers import AtomicFile, Layout, PassingWriter, Writer

PICTURE_FORMATS = (".png", ".svg", ".pdf")
# --plot holds every value of the grid in memory: at most this many numbers (400 MB).
MAX_PLOT_CELLS = 50_000_000
# Pixels per inch of PNG files; panels are 4 x 2.2 inches (curves) or 4 x 3.2 (heatmaps).
DPI = 100


@dataclass
class PlotData:
    """One result on its grid.

    Attributes:
        label: what the result is (a file name), shown above its column of panels; "" for one result.
        axes: the grid's inputs, in order, and the values along each.
        values: each plotted column, as an array of the grid's shape, in column order.
        marked: the columns whose largest |value| is marked (gated by --max-abs, or --mark-max).
    """

    axes: list[tuple[str, np.ndarray]]
    values: dict[str, np.ndarray]
    marked: list[str] = field(default_factory=list)
    label: str = ""
    image: bool = False  # an image's (column, row) axes: row 0 at the top, square pixels
    scatter: bool = False  # points that are not a grid: markers against the drawn axis, no line
    centred: list[str] = field(default_factory=list)  # signed columns: a diverging map centred at zero

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray], grid_axes: Sequence[str], value_names: Sequence[str],
                     marked: Sequence[str] = (), label: str = "") -> PlotData:
        """From arrays of the grid's shape: the inputs' coordinates (named by `grid_axes`) and the values."""
        axes = []
        for position, name in enumerate(grid_axes):
            coordinates = np.asarray(columns[name])
            index = tuple(slice(None) if i == position else 0 for i in range(coordinates.ndim))
            axes.append((name, np.asarray(coordinates[index], dtype=np.float64)))
        return cls(axes, {name: np.asarray(columns[name]) for name in value_names}, list(marked), label)


@dataclass
class View:
    """What is drawn: one or two axes (their positions in the grid), the others pinned at an index."""

    drawn: list[int]
    pinned: dict[int, int]
    note: str  # the pinned axes' values, for the title

    def slice(self, array: np.ndarray) -> np.ndarray:
        """The drawn part of a grid-shaped array, its axes in the drawn order."""
        index = tuple(self.pinned.get(i, slice(None)) for i in range(array.ndim))
        part = array[index]
        kept = [i for i in range(array.ndim) if i not in self.pinned]
        # An RGB image's channel axis, beyond the grid's, stays last.
        return np.transpose(part, [kept.index(i) for i in self.drawn] + [kept.index(i) for i in kept
                                                                           if i not in self.drawn])


def choose_view(data: PlotData, axes: Sequence[str] | None, at: Sequence[AtPoint]) -> View:
    """The drawn axes: `axes` (one or two names), else the grid's axes of more than one point.

    Raises:
        UsageError: an unknown or repeated name, more than two axes to draw, or nothing to draw.
    """
    names = [name for name, _ in data.axes]
    sizes = [len(values) for _, values in data.axes]
    if axes:
        unknown = [a for a in axes if a not in names]
        if unknown or len(set(axes)) != len(axes) or len(axes) > 2:
            problem = f"{unknown[0]!r} is not a grid axis" if unknown else "give one or two different axes"
            raise UsageError(f"--plot-axes {','.join(axes)}: {problem} (grid axes: {', '.join(names)})")
        drawn = [names.index(a) for a in axes]
    else:
        drawn = [i for i, size in enumerate(sizes) if size > 1]
        if len(drawn) > 2:
            raise UsageError(
                f"the grid varies along {len(drawn)} axes ({', '.join(names[i] for i in drawn)}): choose one or two "
                "with --plot-axes A,B (the others are taken at --plot-at NAME=VALUE, or at their first value)")
        if not drawn:
            raise UsageError("the grid is a single point: nothing to plot; give an axis of more than one point")
    given: dict[str, float] = {}
    for point in at:
        if point.names is None:
            raise UsageError("--plot-at: give NAME=VALUE, for example --plot-at t=0.5")
        given.update(zip(point.names, point.values))
    for name in given:
        if name not in names:
            raise UsageError(f"--plot-at {name}=...: {name!r} is not a grid axis (grid axes: {', '.join(names)})")
        if names.index(name) in drawn:
            raise UsageError(f"--plot-at {name}=...: {name} is drawn; pin only the other axes")
    pinned, notes = {}, []
    for i, (name, values) in enumerate(data.axes):
        if i in drawn:
            continue
        if name in given:
            pinned[i] = int(np.argmin(np.abs(values - given[name])))
            notes.append(f"{name}={values[pinned[i]]:.6g}")
        else:
            pinned[i] = 0
            if len(values) > 1:
                notes.append(f"{name}={values[0]:.6g} (its first value)")
            else:
                notes.append(f"{name}={values[0]:.6g}")
    return View(drawn, pinned, ", ".join(notes))


def worst(values: np.ndarray) -> tuple[int, ...] | None:
    """Where |value| is largest (a NaN/Inf first), or None on an empty array."""
    if not values.size:
        return None
    bad = ~np.isfinite(values)
    flat = int(np.argmax(bad)) if bad.any() else int(np.nanargmax(np.abs(values)))
    return tuple(int(i) for i in np.unravel_index(flat, values.shape))


def _title(name: str, values: np.ndarray, position: tuple[int, ...] | None, coordinates: list[np.ndarray],
           axis_names: list[str]) -> str:
    if position is None:
        return name
    where = ", ".join(f"{a}={c[i]:.4g}" for a, c, i in zip(axis_names, coordinates, position))
    return f"{name}\nmax |{name}| = {abs(float(values[position])):.4g} at {where}"


@dataclass
class Style:
    """How pictures look: `--plot-dpi`, `--plot-title`, `--plot-cmap`."""

    dpi: int = DPI
    title: str | None = None
    cmap: str | None = None  # every heatmap's map; None: viridis, or RdBu_r centred at zero for a signed column


def signed(values: np.ndarray) -> bool:
    """Whether a column takes both signs (a residual, a mixed partial, an attribution): drawn on a diverging map."""
    finite = values[np.isfinite(values)]
    return bool(finite.size) and finite.min() < 0 < finite.max()


def heatmap_columns(count: int) -> int:
    """Panels across for `count` heatmaps of one result: one row up to 3, then as square as can be, 4 at most
    (4 panels are 2 x 2, 6 are 3 x 2, 12 are 4 x 3)."""
    return count if count <= 3 else min(4, math.ceil(math.sqrt(count)))


def build_figure(results: Sequence[PlotData], views: Sequence[View], style: Style | None = None) -> Any:
    """The matplotlib figure: per result a column of panels, one per value column.

    1-D views: curves against the drawn axis, x shared down the column (points, not a grid: markers).
    2-D views: `pcolormesh` heatmaps on the grid's coordinates, with axis names and a
    colorbar; a column of both signs on a diverging map centred at zero. Marked columns show
    their largest |value| (a red x, never clipped at the edge, and the value and point in the
    panel's title). Matplotlib's constrained layout keeps every label clear of the others.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    style = style or Style()
    heatmap = any(len(view.drawn) == 2 for view in views)
    count = max(len(result.values) for result in results)
    # One result's heatmaps lie side by side, as square as can be; curves and several results stack by column.
    wrapped = (heatmap or any(result.scatter for result in results)) and len(results) == 1
    # Images of many points (attribute's first 16): four points across, each its column of panels, in bands.
    banded = len(results) > IMAGES_ACROSS and all(result.image for result in results)
    across = heatmap_columns(count) if wrapped else IMAGES_ACROSS if banded else len(results)
    rows = -(-count // across) if wrapped else count * -(-len(results) // IMAGES_ACROSS) if banded else count
    figure = Figure(figsize=((5.0 if heatmap else 4.4) * across, (3.8 if heatmap else 3.0 if wrapped else 2.5) * rows + 0.5),
                    dpi=style.dpi, layout="constrained")
    figure.get_layout_engine().set(w_pad=0.08, h_pad=0.08, wspace=0.06, hspace=0.06)
    grid = figure.subplots(rows, across, squeeze=False, sharex="col" if not (heatmap or wrapped) else False)
    panels = [[grid[i // across][i % across] if wrapped
               else grid[(column // across) * count + i][column % across] if banded else grid[i][column]
               for i in range(count)] for column in range(len(results))]
    used = {id(p) for column, result in enumerate(results) for p in panels[column][:len(result.values)]}
    for panel in grid.flat:
        if id(panel) not in used:
            panel.set_visible(False)
    for column, (result, view) in enumerate(zip(results, views)):
        axis_names = [result.axes[i][0] for i in view.drawn]
        coordinates = [result.axes[i][1] for i in view.drawn]
        last_row = len(result.values) - 1
        for row, panel in enumerate(panels[column][:len(result.values)]):
            name, array = list(result.values.items())[row]
            values = view.slice(np.asarray(array, dtype=np.float64))
            mark = worst(values) if name in result.marked else None
            if len(view.drawn) == 1:
                if result.scatter:
                    panel.plot(coordinates[0], values, ".", markersize=3)
                else:
                    panel.plot(coordinates[0], values, linewidth=1.2)
                if mark is not None:
                    panel.plot([coordinates[0][mark[0]]], [values[mark]], "x", color="red", markersize=8,
                               clip_on=False, zorder=5)
                panel.grid(alpha=0.3)
                panel.locator_params(axis="x", nbins=6)  # -1.00 ... 1.00 in nine ticks would touch
                if row == last_row or wrapped:
                    panel.set_xlabel(axis_names[0])
            elif values.ndim == 3:  # an RGB image, (columns, rows, 3): its colours, stretched to its own range
                finite = values[np.isfinite(values)]
                low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
                panel.imshow(np.clip((values.transpose(1, 0, 2) - low) / max(high - low, 1e-300), 0, 1),
                             interpolation="nearest")  # row 0 at the top, square pixels
                panel.set_xlabel(axis_names[0])
                panel.set_ylabel(axis_names[1])
            else:
                colours: dict[str, Any] = {"cmap": style.cmap or "viridis"}
                if name in result.centred or (style.cmap is None and signed(values)):
                    finite = np.abs(values[np.isfinite(values)])
                    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
                    colours = {"cmap": style.cmap or "RdBu_r", "vmin": -bound, "vmax": bound}
                mesh = panel.pcolormesh(coordinates[0], coordinates[1], values.T, shading="nearest", **colours)
                figure.colorbar(mesh, ax=panel)  # the panel's title names the column
                panel.set_xlabel(axis_names[0])
                panel.set_ylabel(axis_names[1])
                if result.image:
                    panel.invert_yaxis()
                    panel.set_aspect("equal")
                if mark is not None:
                    panel.plot([coordinates[0][mark[0]]], [coordinates[1][mark[1]]], "x", color="red", markersize=10,
                               markeredgewidth=2, clip_on=False, zorder=5)
            title = _title(name, values, mark, coordinates, axis_names)
            panel.set_title(f"{result.label}\n{title}" if result.label and row == 0 else title, fontsize=9,
                            pad=10 if mark is not None else 6)  # clear of a worst point marked on the top edge
    notes = [f"{result.label + ' ' if result.label else ''}at {view.note}" for result, view in zip(results, views) if view.note]
    heading = [style.title] if style.title else []
    if notes:
        heading.append("    ".join(notes))
    if heading:
        figure.suptitle("\n".join(heading), fontsize=11 if style.title else 9)
    return figure


def save_figure(figure: Any, path: str) -> None:
    """Writes the figure atomically, with no timestamp or random id in the file (same data, same bytes)."""
    import matplotlib

    suffix = Path(path).suffix.lower()
    metadata = {".png": {"Software": None}, ".svg": {"Date": None}, ".pdf": {"CreationDate": None}}[suffix]
    target = AtomicFile(path)
    try:
        with matplotlib.rc_context({"svg.hashsalt": "derivcli", "pdf.compression": 6}):
            figure.savefig(target.temporary, format=suffix[1:], metadata=metadata)
        target.commit()
    except BaseException:
        target.discard()
        raise


def check_style(style: Style) -> None:
    """Refuses a colour map matplotlib does not know, with some that it does."""
    if style.cmap is None:
        return
    from matplotlib import colormaps

    if style.cmap not in colormaps:
        close = [name for name in sorted(colormaps) if name.lower().startswith(style.cmap.lower()[:3])][:6]
        raise UsageError(f"--plot-cmap {style.cmap!r}: not a matplotlib colour map; for example "
                         f"{', '.join(close or ['viridis', 'magma', 'cividis', 'RdBu_r', 'coolwarm'])}")


def check_plot_path(path: str, option: str = "--plot") -> None:
    if path != "-" and Path(path).suffix.lower() not in PICTURE_FORMATS:
        raise UsageError(f"{option} {path}: name a .png, .svg or .pdf file, or - for the terminal")


def check_plot_request(options: Any) -> None:
    """`--plot` is for `--grid` points or image inputs, unsharded, into a picture file or the terminal."""
    from derivcli.writers import refuse_overwriting_inputs

    check_plot_path(options.plot)
    check_style(Style(*options.plot_style))
    if options.shard:
        raise UsageError("--plot with --shard: merge the shard files (-o merged.npz), then derivcli plot merged.npz")
    if options.plot != "-":
        if options.output not in (None, "-") and Path(options.output).resolve() == Path(options.plot).resolve():
            raise UsageError(f"--plot {options.plot} is also -o: give the picture its own file")
        refuse_overwriting_inputs(options.plot, [("model", options.model),
                                                 *(("--custom-objects", p) for p in options.custom_objects)])


class PlotWriter(Writer):
    """Collects a grid run's coordinates and values; at `close()`, draws them.

    `--plot FILE` writes the picture (atomically); `--plot -` hands the data to
    `terminal` (the command line draws it on the terminal).
    """

    def __init__(self, layout: Layout, options: Any, first_gated: int,
                 terminal: Callable[[PlotData], None] | None, axes: Sequence[Any]) -> None:
        super().__init__(layout, None)
        assert layout.grid_shape is not None and layout.grid_axes is not None
        total = math.prod(layout.grid_shape)
        cells = total * (len(layout.coordinate_names) + len(layout.value_names))
        if cells > MAX_PLOT_CELLS:
            raise UsageError(f"--plot holds the grid in memory: {total:,} points x {len(layout.value_names)} column(s) "
                             f"is more than {MAX_PLOT_CELLS:,} numbers; draw a coarser grid")
        self.options, self.terminal = options, terminal
        self.marked = list(layout.value_names[first_gated:]) if options.max_abs is not None else []
        self.block = np.empty((total, len(layout.coordinate_names) + len(layout.value_names)), np.float64)
        self.rows = 0
        # The view is checked before any work, on the grid's axes (`GridSource.axes`): a bad
        # --plot-axes is a usage error, not a lost run.
        defined = PlotData([(name, np.linspace(a.start, a.stop, a.num)) for name, a in zip(layout.grid_axes, axes)], {})
        self.view = choose_view(defined, options.plot_axes, options.plot_at)

    def _data(self) -> PlotData:
        names = self.layout.coordinate_names + self.layout.value_names
        columns = {name: self.block[:, j].reshape(self.layout.grid_shape) for j, name in enumerate(names)}
        return PlotData.from_columns(columns, self.layout.grid_axes, self.layout.value_names, self.marked)

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        rows = len(coordinates)
        self.block[self.rows:self.rows + rows, :coordinates.shape[1]] = coordinates
        self.block[self.rows:self.rows + rows, coordinates.shape[1]:] = values
        self.rows += rows

    def close(self) -> None:
        data = self._data()
        if self.options.plot == "-":
            if self.terminal is not None:
                self.terminal(data)
            return
        save_figure(build_figure([data], [self.view], Style(*self.options.plot_style)), self.options.plot)

    def abort(self) -> None:
        self.block = np.empty((0, 0))


def points_data(columns: dict[str, np.ndarray], values: Sequence[str], axes: Sequence[str] | None,
                marked: Sequence[str] = (), label: str = "") -> tuple[PlotData, View]:
    """Points that are not a grid, as a picture: each value column against the row (`point`), against one column
    (`--plot-axes x0`: a scatter), or as a heatmap over two columns whose rows make a whole grid.

    Raises:
        UsageError: an unknown axis, more than two, or two whose rows are not a grid.
    """
    names = list(columns)
    rows = len(next(iter(columns.values()))) if columns else 0
    if axes:
        unknown = [a for a in axes if a not in columns]
        if unknown or len(axes) > 2 or len(set(axes)) != len(axes):
            problem = f"{unknown[0]!r} is not a column" if unknown else "give one or two different columns"
            raise UsageError(f"--plot-axes {','.join(axes)}: {problem} (columns: {', '.join(names)})")
    shown = [name for name in values if not axes or name not in axes]
    if not axes:
        return PlotData([("point", np.arange(1, rows + 1, dtype=np.float64))], {n: columns[n] for n in shown},
                        list(marked), label, scatter=True), View([0], {}, "")
    if len(axes) == 1:
        return PlotData([(axes[0], np.asarray(columns[axes[0]], np.float64))], {n: columns[n] for n in shown},
                        list(marked), label, scatter=True), View([0], {}, "")
    first, second = (np.asarray(columns[a], np.float64) for a in axes)
    along_first, at_first = np.unique(first, return_inverse=True)
    along_second, at_second = np.unique(second, return_inverse=True)
    cells = at_first * len(along_second) + at_second
    if rows != len(along_first) * len(along_second) or len(np.unique(cells)) != rows:
        raise UsageError(f"--plot-axes {','.join(axes)}: the points are not a whole grid over {axes[0]} and {axes[1]} "
                         f"({rows:,} rows for {len(along_first):,} x {len(along_second):,} values); give one axis for "
                         "a scatter")
    gridded = {}
    for name in shown:
        grid = np.full(len(along_first) * len(along_second), np.nan)
        grid[cells] = np.asarray(columns[name], np.float64)
        gridded[name] = grid.reshape(len(along_first), len(along_second))
    return PlotData([(axes[0], along_first), (axes[1], along_second)], gridded, list(marked), label), View([0, 1], {}, "")


class PointsPlotWriter(Writer):
    """`--plot` for points that are not a grid (`--at`, `--csv`, `--npz`): every value column against the row, or
    against `--plot-axes` (one input: a scatter; two whose points make a whole grid: heatmaps). The points are held
    in memory (at most MAX_PLOT_CELLS numbers)."""

    def __init__(self, layout: Layout, options: Any, first_gated: int,
                 terminal: Callable[[list[tuple[PlotData, View]]], None] | None) -> None:
        super().__init__(layout, None)
        names = layout.coordinate_names + layout.value_names
        if options.plot_at:
            raise UsageError("--plot-at pins a grid's axes; these points are not a grid")
        unknown = [a for a in options.plot_axes or [] if a not in names]
        if unknown:
            raise UsageError(f"--plot-axes {','.join(options.plot_axes)}: {unknown[0]!r} is not an input or a result "
                             f"column (inputs: {', '.join(layout.coordinate_names)})")
        self.options, self.terminal = options, terminal
        self.marked = list(layout.value_names[first_gated:]) if options.max_abs is not None else []
        self.parts: list[np.ndarray] = []
        self.cells = 0

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        block = np.concatenate([coordinates, values], axis=1).astype(np.float64)
        self.cells += block.size
        if self.cells > MAX_PLOT_CELLS:
            raise RunError(f"--plot holds the points in memory: more than {MAX_PLOT_CELLS:,} numbers; write a file "
                           "(-o FILE.npz) and plot part of it")
        self.parts.append(block)

    def close(self) -> None:
        names = self.layout.coordinate_names + self.layout.value_names
        block = np.concatenate(self.parts) if self.parts else np.empty((0, len(names)))
        columns = {name: block[:, j] for j, name in enumerate(names)}
        drawn = [points_data(columns, self.layout.value_names, self.options.plot_axes, self.marked)]
        if self.options.plot == "-":
            if self.terminal is not None:
                self.terminal(drawn)
            return
        save_figure(build_figure([drawn[0][0]], [drawn[0][1]], Style(*self.options.plot_style)), self.options.plot)

    def abort(self) -> None:
        self.parts = []


# --plot of an image model draws its first points: the input and its derivative arrays, one column of panels each;
# attribute's, the input and its attribution only, draws more, four across in bands.
IMAGE_POINTS = 4
ATTRIBUTION_POINTS = 16
IMAGES_ACROSS = 4
# At most this many derivative arrays per point (a 1,000-class Jacobian has 1,000).
IMAGE_PANELS = 6


def image_input(layout: Layout) -> bool:
    """Whether the points have an image or sequence input (rank 2 or 3) that `ImagePlotWriter` draws."""
    dimension = len(layout.coordinate_names)
    return any(max(a.columns) < dimension and len(a.shape) in (2, 3) for a in layout.shaped)


class ImagePlotWriter(Writer):
    """`--plot` for a model whose input is an image (or a sequence): for the first points, the input and each
    derivative of an output with respect to it, as heatmaps in the image's own rows and columns.

    An RGB input is shown in its colours, other channels as their mean; derivatives are summed over the channels,
    on a diverging map centred at zero.
    """

    def __init__(self, layout: Layout, options: Any, terminal: Callable[[list[tuple[PlotData, View]]], None] | None) -> None:
        super().__init__(layout, None)
        dimension = len(layout.coordinate_names)
        images = [a for a in layout.shaped if max(a.columns) < dimension and len(a.shape) in (2, 3)]
        if not images:
            raise UsageError("ImagePlotWriter: the points have no image or sequence input")  # `image_input` says first
        if options.plot_axes or options.plot_at:
            raise UsageError("--plot-axes and --plot-at choose a grid's axes; an image is drawn by its rows and columns")
        self.image = images[0]
        self.derivatives = [a for a in layout.shaped if a.shape == self.image.shape and min(a.columns) >= dimension
                            and a.name.endswith(("/d" + self.image.name, ")/" + self.image.name))]  # dy/dx, attr(y)/x
        self.left_out = max(0, len(self.derivatives) - IMAGE_PANELS)
        self.derivatives = self.derivatives[:IMAGE_PANELS]
        self.target = dimension + layout.value_names.index("target") if "target" in layout.value_names else None
        self.delta = dimension + layout.value_names.index("delta(y)") if "delta(y)" in layout.value_names else None
        self.options, self.terminal = options, terminal
        self.block = np.empty((0, dimension + len(layout.value_names)))
        attributions = self.derivatives and all(a.name.startswith("attr(") for a in self.derivatives)
        self.points = ATTRIBUTION_POINTS if attributions else IMAGE_POINTS

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        wanted = self.points - len(self.block)
        if wanted > 0:
            rows = np.concatenate([coordinates[:wanted], values[:wanted]], axis=1).astype(np.float64)
            self.block = np.concatenate([self.block, rows])

    def panels(self) -> list[tuple[PlotData, View]]:
        """One result per point: its image and derivative arrays."""
        shape = self.image.shape
        height, width = shape[0], shape[1]
        axes = [("column", np.arange(width, dtype=np.float64)), ("row", np.arange(height, dtype=np.float64))]
        channels = f" (sum of {shape[2]} channels)" if len(shape) == 3 and shape[2] > 1 else ""
        results = []
        for number, row in enumerate(self.block, 1):
            def picture(array: Any, reduce: Callable[..., np.ndarray], row: np.ndarray = row) -> np.ndarray:
                values = row[list(array.columns)].reshape(shape)
                return (reduce(values, axis=2) if len(shape) == 3 else values).T  # (columns, rows)

            if len(shape) == 3 and shape[2] == 3:  # RGB, as it is seen
                values = {f"{self.image.name} (RGB)": row[list(self.image.columns)].reshape(shape).transpose(1, 0, 2)}
            else:
                values = {f"{self.image.name}{' (channel mean)' if channels else ''}": picture(self.image, np.mean)}
            values.update({f"{a.name}{channels}": picture(a, np.sum) for a in self.derivatives})
            label = f"point {number}" + (f", target {row[self.target]:.0f}" if self.target is not None else "") \
                + (f", delta {row[self.delta]:.2g}" if self.delta is not None else "")
            results.append(PlotData(axes, values, label=label, image=True, centred=list(values)[1:]))
        return [(result, View([0, 1], {}, "")) for result in results]

    def close(self) -> None:
        drawn = self.panels()
        if not drawn:
            return
        if self.options.plot == "-":
            if self.terminal is not None:
                self.terminal(drawn)
            return
        figure = build_figure([result for result, _ in drawn], [view for _, view in drawn],
                              Style(*self.options.plot_style))
        if self.left_out:
            figure.suptitle(f"the first {IMAGE_PANELS} derivative arrays of {IMAGE_PANELS + self.left_out} "
                            "(choose with --outputs or --target)", fontsize=9)
        save_figure(figure, self.options.plot)

    def abort(self) -> None:
        self.block = np.empty((0, 0))


class Tee(PassingWriter):
    """The output writer and the plot, fed the same batches; the plot is drawn after the output is complete."""

    def __init__(self, main: Writer, plot: PlotWriter | ImagePlotWriter | PointsPlotWriter) -> None:
        super().__init__(main)
        self.plot = plot

    def write(self, coordinates: np.ndarray, passthrough: list[list[str]], values: np.ndarray) -> None:
        self.main.write(coordinates, passthrough, values)
        self.plot.write(coordinates, passthrough, values)

    def close(self) -> None:
        self.main.close()
        self.plot.close()

    def abort(self) -> None:
        self.main.abort()
        self.plot.abort()


RESULT_SUFFIXES = (".npz", ".h5", ".hdf5", ".csv", ".tsv", ".json", ".jsonl")


def load_result(path: str, columns: Sequence[str] | None, mark: bool, axes: Sequence[str] | None = None,
                at: Sequence[AtPoint] = ()) -> tuple[PlotData, View]:
    """A result saved by derivcli, with the columns to plot and the view: a grid result (NPZ/HDF5 with
    `grid_axes`) on its grid; any other (CSV, TSV, JSON, JSONL, or NPZ/HDF5 of points) by `points_data`.

    Raises:
        RunError: not readable, or no number columns.
        UsageError: an unknown column in `columns`, a bad view.
    """
    from derivcli.writers import GRID_SHAPE_KEY, SHARD_KEY, SHARD_RECORD_KEY

    suffix = Path(path).suffix.lower()
    if suffix not in RESULT_SUFFIXES:
        raise UsageError(f"plot {path}: give a result saved as {', '.join(RESULT_SUFFIXES)}")
    if not Path(path).is_file():
        raise RunError(f"plot: cannot read {path}: no such file")
    arrays = _read_result(path, suffix)
    if SHARD_KEY in arrays or SHARD_RECORD_KEY in arrays or Path(path + ".shard").is_file():
        raise RunError(f"plot: {path} is one shard of a run: merge the shards first (derivcli merge ... -o merged.npz)")
    grid_axes = [str(name) for name in np.ravel(arrays["grid_axes"])] if "grid_axes" in arrays else []
    shape = np.asarray(arrays[grid_axes[0]]).shape if grid_axes and grid_axes[0] in arrays else None
    if shape is None:  # points, not a grid: every 1-D number column of the points' length
        lengths = [len(a) for a in arrays.values() if np.asarray(a).ndim == 1 and np.asarray(a).dtype.kind in "fiub"]
        shape = (max(set(lengths), key=lengths.count),) if lengths else None
    numeric = [name for name, array in arrays.items()
               if name not in (*grid_axes, "grid_axes", GRID_SHAPE_KEY) and np.asarray(array).dtype.kind in "fiub"
               and np.asarray(array).shape == shape]
    if columns:
        unknown = [c for c in columns if c not in numeric]
        if unknown:
            raise UsageError(f"--columns {','.join(columns)}: {unknown[0]!r} is not a column of {path} "
                             f"(columns: {', '.join(numeric)})")
        numeric = list(columns)
    if not numeric:
        raise RunError(f"plot: {path} holds no number columns to draw")
    if grid_axes:
        data = PlotData.from_columns(arrays, grid_axes, numeric, numeric if mark else [], label="")
        return data, choose_view(data, axes, at)
    if at:
        raise UsageError(f"--plot-at pins a grid's axes; {path} holds points, not a grid")
    everything = {name: np.asarray(arrays[name], dtype=np.float64) for name in arrays
                  if np.asarray(arrays[name]).dtype.kind in "fiub" and np.asarray(arrays[name]).shape == shape}
    shown = [name for name in numeric if not axes or name not in axes]
    return points_data(everything, shown, axes, shown if mark else [])


def _read_result(path: str, suffix: str) -> dict[str, np.ndarray]:
    """A result file's columns: NPZ/HDF5 arrays, or the columns of a CSV, TSV, JSON or JSONL table."""
    import zipfile

    from derivcli.writers import read_columns

    if suffix == ".npz" and not zipfile.is_zipfile(path):
        raise RunError(f"plot: cannot read {path}: not a zip archive (.npz results are written by derivcli -o FILE.npz)")
    try:
        if suffix in (".npz", ".h5", ".hdf5"):
            return read_columns(path)
        if suffix in (".csv", ".tsv"):
            import pyarrow.csv as arrow_csv

            table = arrow_csv.read_csv(path, parse_options=arrow_csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                                       convert_options=arrow_csv.ConvertOptions(null_values=["nan", "NaN", ""]))
            return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        import json

        text = Path(path).read_text(encoding="utf-8")
        rows = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
        names = list(rows[0]) if rows else []
        return {name: np.array([np.nan if row.get(name) is None else row.get(name) for row in rows]) for name in names}
    except ValueError as error:
        if "object arrays" in str(error).lower():  # Python objects: loading them would unpickle, which derivcli never does
            raise RunError(f"plot: {path} holds arrays of Python objects, not a derivcli result") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"plot: cannot read {path}: {reason}") from None
    except Exception as error:  # a damaged archive or table: zip, HDF5, Arrow and NumPy each raise their own
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"plot: cannot read {path}: {reason}") from None


def plot_results(paths: Sequence[str], output: str, columns: Sequence[str] | None, axes: Sequence[str] | None,
                 at: Sequence[AtPoint], mark: bool, style: Style | None = None) -> list[tuple[PlotData, View]]:
    """`derivcli plot`: the figure of one or more saved results, side by side; written unless `output` is -."""
    drawn = [load_result(path, columns, mark, axes, at) for path in paths]
    if len(drawn) > 1:
        for (result, _), path in zip(drawn, paths):
            result.label = Path(path).name
    check_style(style or Style())
    if output != "-":
        save_figure(build_figure([r for r, _ in drawn], [v for _, v in drawn], style), output)
    return drawn


# Terminal pictures ------------------------------------------------------------------------

SHADES = " ░▒▓█"
BRAILLE_BASE = 0x2800
# The dot of each (column, row) within a Braille cell of 2 x 4 dots.
BRAILLE_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def terminal_size(stream: IO[str] | None) -> tuple[int, int]:
    """Columns and lines of the terminal behind `stream`, else COLUMNS/LINES, else 80 x 24."""
    try:
        size = os.get_terminal_size(stream.fileno())  # type: ignore[union-attr]
        if size.columns > 0 and size.lines > 0:  # `script` and some CI runners report 0 x 0
            return size.columns, size.lines
        raise OSError("a terminal of no size")
    except (AttributeError, OSError, ValueError):
        import shutil

        size = shutil.get_terminal_size((80, 24))
        return size.columns, size.lines


def render_terminal(data: PlotData | Sequence[tuple[PlotData, View]], stream: IO[str] | None,
                    view: View | None = None, size: tuple[int, int] | None = None) -> str:
    """The panels drawn with Unicode characters, sized to the terminal (`size`: columns, lines).

    Curves: the value axis on the left (its range), the drawn axis below. Heatmaps: the second axis
    on the left (its values at the top and bottom rows), the first below, and a legend of the shades.
    """
    pairs = [(data, view or choose_view(data, None, []))] if isinstance(data, PlotData) else list(data)
    columns, lines = size or terminal_size(stream)
    panels = sum(len(result.values) for result, _ in pairs)
    # Each panel: a title line, its plot rows, an axis line (and a legend line for a heatmap); the whole fits
    # the terminal's height.
    overhead = 3 if any(len(chosen.drawn) == 2 for _, chosen in pairs) else 2
    height = max(3, (lines - 1) // max(panels, 1) - overhead)
    out: list[str] = []
    label_width = 10
    width = max(8, columns - label_width - 1)
    for result, chosen in pairs:
        axis_names = [result.axes[i][0] for i in chosen.drawn]
        coordinates = [np.asarray(result.axes[i][1], dtype=np.float64) for i in chosen.drawn]
        for name, array in result.values.items():
            values = chosen.slice(np.asarray(array, dtype=np.float64))
            if values.ndim == 3:  # an RGB image: its brightness
                values = values.mean(axis=2)
            title = " ".join(filter(None, [result.label, name, f"at {chosen.note}" if chosen.note else ""]))
            finite = values[np.isfinite(values)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            out.append(f"{title}: {low:.4g} to {high:.4g}"[:columns])
            if len(chosen.drawn) == 1:
                if result.scatter:
                    canvas = _braille_points(coordinates[0], values, width, height, low, high)
                else:
                    canvas = _braille_curve(values, width, height, low, high)
                left = {0: f"{high:.3g}", len(canvas) - 1: f"{low:.3g}"}
                finite_x = coordinates[0][np.isfinite(coordinates[0])]
                start, stop = (finite_x.min(), finite_x.max()) if result.scatter and finite_x.size else \
                    (coordinates[0][0], coordinates[0][-1])
                below = f"{axis_names[0]} {start:.4g} .. {stop:.4g} (across)"
                legend = None
            else:
                rows_up = coordinates[1]
                if result.image:  # row 0 at the top: the rows run down the screen
                    values, rows_up = values[:, ::-1], rows_up[::-1]
                canvas = _shade_map(values, width, height, low, high)
                left = {0: f"{axis_names[1]}={rows_up[-1]:.3g}", len(canvas) - 1: f"{axis_names[1]}={rows_up[0]:.3g}"}
                below = f"{axis_names[0]} {coordinates[0][0]:.4g} .. {coordinates[0][-1]:.4g} (across)"
                steps = np.linspace(low, high, len(SHADES))
                legend = "shades: " + " ".join(f"{shade if shade.strip() else repr(shade)}={value:.3g}"
                                               for shade, value in zip(SHADES, steps))
            for row, text in enumerate(canvas):
                out.append(f"{left.get(row, '')[:label_width]:>{label_width}} {text}")
            out.append(f"{'':>{label_width}} {below}"[:columns])
            if legend:
                out.append(f"{'':>{label_width}} {legend}"[:columns])
    return "\n".join(out) + "\n"


def _braille_points(x: np.ndarray, values: np.ndarray, width: int, height: int, low: float, high: float) -> list[str]:
    """Points (not a curve) at their x, on a `width` x `height` grid of Braille cells (2 x 4 dots each)."""
    cells = np.zeros((height, width), dtype=np.int64)
    keep = np.isfinite(x) & np.isfinite(values)
    if keep.any():
        x, values = x[keep], values[keep]
        left, right = float(x.min()), float(x.max())
        across = np.round((x - left) / (right - left if right > left else 1.0) * (2 * width - 1)).astype(int)
        up = np.round((values - low) / (high - low if high > low else 1.0) * (4 * height - 1)).astype(int)
        for dot_x, dot_y in zip(across, up):
            cells[height - 1 - dot_y // 4, dot_x // 2] |= BRAILLE_DOTS[dot_x % 2][3 - dot_y % 4]
    return ["".join(chr(BRAILLE_BASE + int(c)) for c in row) for row in cells]


def _braille_curve(values: np.ndarray, width: int, height: int, low: float, high: float) -> list[str]:
    """A curve on a `width` x `height` grid of Braille cells (2 x 4 dots each), x resampled to the dots."""
    dots_x, dots_y = 2 * width, 4 * height
    cells = np.zeros((height, width), dtype=np.int64)
    if values.size == 0:
        return [chr(BRAILLE_BASE) * width] * height
    samples = values[np.linspace(0, len(values) - 1, dots_x).round().astype(int)]
    span = high - low if high > low else 1.0
    level = np.where(np.isfinite(samples), np.round((samples - low) / span * (dots_y - 1)), -1).astype(int)
    previous = None
    for x, y in enumerate(level):
        if y < 0:
            previous = None
            continue
        low_y, high_y = (y, y) if previous is None else (min(y, previous), max(y, previous))
        for dot in range(low_y, high_y + 1):  # a vertical run joins the curve's steps
            row = height - 1 - dot // 4
            cells[row, x // 2] |= BRAILLE_DOTS[x % 2][3 - dot % 4]
        previous = y
    return ["".join(chr(BRAILLE_BASE + int(c)) for c in row) for row in cells]


def _shade_map(values: np.ndarray, width: int, height: int, low: float, high: float) -> list[str]:
    """A heatmap of shade blocks: first axis across, second axis up."""
    nx, ny = values.shape
    xs = np.linspace(0, nx - 1, width).round().astype(int)
    ys = np.linspace(ny - 1, 0, height).round().astype(int)
    sampled = values[np.ix_(xs, ys)].T  # rows: the second axis, top row its largest value
    span = high - low if high > low else 1.0
    levels = np.clip(np.round((sampled - low) / span * (len(SHADES) - 1)), 0, len(SHADES) - 1)
    return ["".join("?" if not np.isfinite(v) else SHADES[int(level)] for v, level in zip(row_values, row))
            for row_values, row in zip(sampled, levels)]
