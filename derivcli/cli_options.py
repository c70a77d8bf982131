"""The command line's options: defined once, validated at the edge, before TensorFlow is imported.

Options shared by every computing command are declared in `SHARED_OPTIONS` and
added to a command by `with_shared_options` (sqlite-utils' `output_options`
idea); `_common` turns them into one validated `RunOptions`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from derivcli.command import RunOptions
from derivcli.errors import UsageError
from derivcli.shards import parse_shard_option
from derivcli.specs import parse_at, parse_grid, parse_names

# Options shared by several commands, defined once.
ModelArgument = Annotated[str, typer.Argument(metavar="MODEL", help="A .keras or .h5 file, or a SavedModel directory.", show_default=False)]
CustomObjectsOption = Annotated[
    list[str] | None,
    typer.Option("--custom-objects", metavar="FILE.py", help="A Python file defining the model's custom classes (repeatable).", show_default=False, rich_help_panel="Model"),
]
UnsafeOption = Annotated[bool, typer.Option("--unsafe", metavar="", help="Allow Lambda layers (runs the file's Python code).", rich_help_panel="Model")]
NamesOption = Annotated[str | None, typer.Option("--names", metavar="NAME[,NAME...]", help="Rename the inputs: a,b,... (count must match).", show_default=False, rich_help_panel="Model")]
OutputNamesOption = Annotated[str | None, typer.Option("--output-names", metavar="NAME[,NAME...]", help="Rename the outputs: u,v,...", show_default=False, rich_help_panel="Model")]
AtOption = Annotated[list[str] | None, typer.Option("--at", metavar="POINT", help="One point: 0.5, 1,2 or x=1,y=2 (repeatable).", show_default=False, rich_help_panel="Points")]
GridOption = Annotated[
    list[str] | None,
    typer.Option("--grid", metavar="[NAME=]START:STOP:NUM", help="NAME=START:STOP:NUM for one input, or START:STOP:NUM for the rest (repeatable).", show_default=False, rich_help_panel="Points"),
]
CsvOption = Annotated[str | None, typer.Option("--csv", metavar="FILE", help="A CSV file with a header row; - reads standard input.", show_default=False, rich_help_panel="Points")]
ColumnsOption = Annotated[str | None, typer.Option("--columns", metavar="NAME[,NAME...]", help="CSV columns to take as the inputs, in order.", show_default=False, rich_help_panel="Points")]
DelimiterOption = Annotated[
    str, typer.Option("--delimiter", metavar="CHAR", help="The --csv file's delimiter: one character, or tab "
                      "(for a ;-separated file: --delimiter ';').", rich_help_panel="Points")
]
NpzOption = Annotated[str | None, typer.Option("--npz", metavar="FILE", help="An .npz with one array per input in its shape, (N, *shape), or one array x of shape (N, d).", show_default=False, rich_help_panel="Points")]
Hdf5Option = Annotated[str | None, typer.Option("--hdf5", metavar="FILE", help="An HDF5 file with one dataset per input at its root, as --npz takes arrays.", show_default=False, rich_help_panel="Points")]
def _formats() -> list[str]:
    """The --format values, for shell completion (the writers, numpy with them, load only when asked)."""
    from derivcli.writers import FORMATS

    return list(FORMATS)


FormatOption = Annotated[
    str | None,
    typer.Option("--format", "-f", metavar="FORMAT", autocompletion=_formats, help="table, csv, tsv, json, jsonl, npz or hdf5 [default: table on a terminal, else csv, or from -o].", show_default=False, rich_help_panel="Output"),
]
OutputOption = Annotated[str | None, typer.Option("--output", "-o", metavar="FILE", help="Write to FILE (atomically); the extension picks the format.", show_default=False, rich_help_panel="Output")]
BatchSizeOption = Annotated[
    str | None,
    typer.Option("--batch-size", metavar="N|auto", help="Points per compiled batch, or auto (from the model size and free memory) [default: auto].", show_default=False, rich_help_panel="Computation"),
]
DtypeOption = Annotated[str, typer.Option("--dtype", metavar="float32|float64", autocompletion=lambda: ["float32", "float64"], help="float32, or float64 to evaluate in double precision.", rich_help_panel="Computation")]
DeviceOption = Annotated[str, typer.Option("--device", metavar="auto|cpu|gpu", autocompletion=lambda: ["auto", "cpu", "gpu"], help="auto, cpu or gpu.", rich_help_panel="Computation")]
XlaOption = Annotated[str, typer.Option("--xla", metavar="auto|on|off", autocompletion=lambda: ["auto", "on", "off"], help="Compile kernels with XLA: auto (where the compile pays for itself: long runs of small networks; never on large networks, whose compile takes minutes), on or off.", rich_help_panel="Computation")]
EngineOption = Annotated[
    str, typer.Option("--engine", metavar="auto|taylor|tape", autocompletion=lambda: ["auto", "taylor", "tape"], help="auto (Taylor series where the model's ops are covered, in runs of order >= 3 or with a Laplacian: pure and --direction derivatives of order >= 2, Laplacians, and mixed partials of order >= 6 in float64), taylor (also every mixed partial of order >= 3, by interpolation: it loses digits in float32) or tape (nested reverse mode only).", rich_help_panel="Computation")
]
WrtOption = Annotated[str | None, typer.Option("--wrt", metavar="NAME[,NAME...]", help="Differentiate with respect to these inputs only: x,y.", show_default=False, rich_help_panel="Derivatives")]
OutputsOption = Annotated[str | None, typer.Option("--outputs", metavar="NAME[,NAME...]", help="Report these outputs only: y0,y2.", show_default=False, rich_help_panel="Derivatives")]
TargetOption = Annotated[
    str | None,
    typer.Option("--target", metavar="top|NAME|INDEX",
                 help="Differentiate one output element per point: top (the largest, a classifier's prediction), "
                      "NAME (the index in a column or array of the points, such as labels) or INDEX (a fixed one); "
                      "the result is y, with its index in a column target.", show_default=False, rich_help_panel="Model"),
]
LogitsOption = Annotated[
    bool, typer.Option("--logits", metavar="", help="Leave out a final softmax or sigmoid (a classifier's logits: "
                                                     "a saturated softmax has vanishing gradients).", rich_help_panel="Model")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="Silence warnings.", rich_help_panel="Output")]
InputsOption = Annotated[bool | None, typer.Option("--inputs/--no-inputs", help="Text formats: write every input's coordinates (--inputs), or none (--no-inputs). Default: all but a tensor input's elements (an image's pixels), with a note.", show_default=False, rich_help_panel="Output")]
SummaryOption = Annotated[bool, typer.Option(
    "--summary", metavar="", rich_help_panel="Output",
    help="Instead of a row per point, a row per value column: count, nan, mean, std, mean_abs, rms, min, max, in "
         "constant memory; merge joins --summary shards.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", metavar="", help="Also print information that is not a "
                                                                          "warning (a passing gate's margin), as a "
                                                                          "terminal shows it without asking.", rich_help_panel="Output")]
MaxAbsOption = Annotated[
    str | None,
    typer.Option("--max-abs", metavar="X", help="Exit 3 if any derivative or operator column exceeds X in absolute value (or is NaN/Inf).", show_default=False, rich_help_panel="Gates"),
]
StrictOption = Annotated[bool, typer.Option("--strict", metavar="", help="Exit 3 if any derivative or operator value is NaN or Inf (check: also when a column is unresolved).", rich_help_panel="Gates")]
ShardOption = Annotated[
    str | None,
    typer.Option("--shard", metavar="K/N|auto[/N]", help="K/N: only the K-th of N balanced slices of the points, for array jobs; auto takes K and N "
                 "from Slurm, Kubernetes or AWS Batch (auto/N gives N). Join the shard files with merge.", show_default=False, rich_help_panel="Computation"),
]
TracebackOption = Annotated[bool, typer.Option("--traceback", metavar="", help="Show the Python traceback of an error.", rich_help_panel="Output")]
PlotOption = Annotated[
    str | None,
    typer.Option("--plot", metavar="FILE", help="Also draw every value and derivative column: curves on a 1-D grid, "
                 "heatmaps on a 2-D one, the first images and their gradients for an image model, else a scatter "
                 "against the row or --plot-axes: FILE.png, .svg or .pdf, or - for the terminal.", show_default=False,
                 rich_help_panel="Pictures"),
]
PlotAxesOption = Annotated[
    str | None,
    typer.Option("--plot-axes", metavar="A[,B]", help="The grid axes to draw (one: curves, two: heatmaps) when the grid "
                 "varies along more than two; for other points, the column to draw against (a scatter), or two whose "
                 "points make a whole grid (heatmaps) [default: the row].", show_default=False,
                 rich_help_panel="Pictures"),
]
PlotAtOption = Annotated[
    list[str] | None,
    typer.Option("--plot-at", metavar="NAME=VALUE", help="Where the axes not drawn are taken (the nearest grid value) "
                 "[default: their first value]; repeatable.", show_default=False, rich_help_panel="Pictures"),
]
PlotDpiOption = Annotated[
    int, typer.Option("--plot-dpi", metavar="N", min=10, max=1200, help="Pixels per inch of a PNG picture.",
                      rich_help_panel="Pictures")]
PlotTitleOption = Annotated[
    str | None, typer.Option("--plot-title", metavar="TEXT", help="A title above the picture's panels.",
                             show_default=False, rich_help_panel="Pictures")]
PlotCmapOption = Annotated[
    str | None, typer.Option("--plot-cmap", metavar="NAME", help="The heatmaps' colour map (a matplotlib name: viridis, "
                             "magma, RdBu_r...) [default: viridis, or RdBu_r centred at zero for a column of both "
                             "signs].", show_default=False, rich_help_panel="Pictures")]
TimingsOption = Annotated[
    bool, typer.Option("--timings", metavar="", help="Print on standard error where the time went: model load, first batch (tracing), the rest and its points per second.", rich_help_panel="Output")
]


# The validated options every computing command shares: the library's `RunOptions`.
CommonOptions = RunOptions


# (name, annotation, default) of the options shared by every computing command,
# in the order --help lists them after the command's own options.
SHARED_OPTIONS: list[tuple[str, Any, Any]] = [
    ("at", AtOption, None),
    ("grid", GridOption, None),
    ("csv", CsvOption, None),
    ("columns", ColumnsOption, None),
    ("delimiter", DelimiterOption, ","),
    ("npz", NpzOption, None),
    ("hdf5", Hdf5Option, None),
    ("format", FormatOption, None),
    ("output", OutputOption, None),
    ("inputs", InputsOption, None),
    ("names", NamesOption, None),
    ("output_names", OutputNamesOption, None),
    ("target", TargetOption, None),
    ("logits", LogitsOption, False),
    ("custom_objects", CustomObjectsOption, None),
    ("unsafe", UnsafeOption, False),
    ("batch_size", BatchSizeOption, None),
    ("shard", ShardOption, None),
    ("dtype", DtypeOption, "float32"),
    ("device", DeviceOption, "auto"),
    ("engine", EngineOption, "auto"),
    ("xla", XlaOption, "auto"),
    ("max_abs", MaxAbsOption, None),
    ("strict", StrictOption, False),
    ("quiet", QuietOption, False),
    ("verbose", VerboseOption, False),
    ("summary", SummaryOption, False),
    ("timings", TimingsOption, False),
    ("plot", PlotOption, None),
    ("plot_axes", PlotAxesOption, None),
    ("plot_at", PlotAtOption, None),
    ("plot_dpi", PlotDpiOption, 100),
    ("plot_title", PlotTitleOption, None),
    ("plot_cmap", PlotCmapOption, None),
    ("traceback", TracebackOption, False),
]


def with_shared_options(command: Callable[..., None]) -> Callable[..., None]:
    """Adds the shared options to a command (sqlite-utils' `output_options` idea).

    The command declares `model`, its own options and `options: CommonOptions`;
    it receives the shared options validated, as one `CommonOptions`.
    """
    own = inspect.signature(command, eval_str=True)
    own_parameters = [p for p in own.parameters.values() if p.name != "options"]
    shared_parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
        for name, annotation, default in SHARED_OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(**values: Any) -> None:
        shared = {name: values.pop(name) for name, _, _ in SHARED_OPTIONS}
        shared.pop("traceback")
        command(options=_common(model=values["model"], **shared), **values)

    parameters = own_parameters + shared_parameters
    wrapper.__signature__ = own.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def _choice(value: str, option: str, choices: Sequence[str]) -> str:
    if value.lower() not in choices:
        raise UsageError(f"{option} {value!r}: choose one of {', '.join(choices)}")
    return value.lower()


def _batch_size(text: str | None) -> int | None:
    if text is None or text.strip().lower() == "auto":
        return None
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise UsageError(f"--batch-size {text!r}: give a positive whole number or auto")
    return int(text)


def _delimiter(text: str) -> str:
    """`--delimiter`: one character; `tab` or a typed \\t for a tab."""
    chosen = "\t" if text.lower() in ("tab", "\\t") else text
    if len(chosen) != 1 or chosen in ('"', "\n", "\r"):
        raise UsageError(f"--delimiter {text!r}: give one character (for example ';' or tab), not a quote or line break")
    return chosen


def _number(text: str | None, option: str, example: str) -> float | None:
    """A number option (--max-abs, --rtol, --atol), refused in the one-line style of every usage error."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: give a number, for example {option} {example}") from None
    if not value >= 0:
        raise UsageError(f"{option} {text!r}: give a number of at least 0, for example {option} {example}")
    return value


def _names_or_none(text: str | None, option: str) -> list[str] | None:
    return parse_names(text, option) if text else None


def _common(
    model: str, custom_objects: list[str] | None, unsafe: bool, names: str | None,
    output_names: str | None, at: list[str] | None, grid: list[str] | None, csv: str | None,
    columns: str | None, delimiter: str, npz: str | None, format: str | None, output: str | None,
    batch_size: str | None, shard: str | None, dtype: str, device: str, engine: str, quiet: bool,
    max_abs: str | None, strict: bool, timings: bool = False, plot: str | None = None,
    plot_axes: str | None = None, plot_at: list[str] | None = None, target: str | None = None, logits: bool = False,
    hdf5: str | None = None, verbose: bool = False, plot_dpi: int = 100, plot_title: str | None = None,
    plot_cmap: str | None = None, summary: bool = False, xla: str = "auto", inputs: bool | None = None,
) -> CommonOptions:
    """Validates the shared options at the edge, before TensorFlow is imported."""
    from derivcli.points import check_one_source
    from derivcli.writers import choose_format, refuse_overwriting_inputs

    check_one_source([o for o, v in (("--at", at), ("--grid", grid), ("--csv", csv), ("--npz", npz), ("--hdf5", hdf5))
                      if v])
    if summary and plot == "-":
        raise UsageError("--summary --plot draws a bar chart into a file: give --plot FILE.png")
    if plot is None and (plot_axes or plot_at or plot_title or plot_cmap):
        given = "--plot-axes" if plot_axes else "--plot-at" if plot_at else "--plot-title" if plot_title else "--plot-cmap"
        raise UsageError(f"{given} chooses what --plot draws: add --plot FILE.png or --plot -")
    refuse_overwriting_inputs(output, [("model", model), ("--csv", csv), ("--npz", npz), ("--hdf5", hdf5),
                                       *(("--custom-objects", path) for path in custom_objects or [])])
    return CommonOptions(
        model=model,
        custom_objects=list(custom_objects or []),
        unsafe=unsafe,
        names=_names_or_none(names, "--names"),
        output_names=_names_or_none(output_names, "--output-names"),
        at=[parse_at(a) for a in at or []],
        grid=[parse_grid(g) for g in grid or []],
        csv=csv,
        columns=_names_or_none(columns, "--columns"),
        delimiter=_delimiter(delimiter),
        npz=npz,
        hdf5=hdf5,
        format=choose_format(format, output, sys.stdout is not None and sys.stdout.isatty()),
        output=output,
        batch_size=_batch_size(batch_size),
        dtype=_choice(dtype, "--dtype", ("float32", "float64")),
        device=_choice(device, "--device", ("auto", "cpu", "gpu")),
        engine=_choice(engine, "--engine", ("auto", "taylor", "tape")),
        xla=_choice(xla, "--xla", ("auto", "on", "off")),
        inputs=inputs,
        quiet=quiet,
        verbose=verbose,
        summary=summary,
        max_abs=_number(max_abs, "--max-abs", "0.01"),
        strict=strict,
        shard=parse_shard_option(shard) if shard else None,
        timings=timings,
        plot=plot,
        plot_axes=_names_or_none(plot_axes, "--plot-axes"),
        plot_at=[parse_at(a) for a in plot_at or []],
        plot_style=(plot_dpi, plot_title, plot_cmap),
        target=parse_target(target),
        logits=logits,
    )


def parse_target(text: str | None) -> str | int | None:
    """`--target top`, `--target INDEX` or `--target NAME` (a column or array of labels)."""
    if text is None or text.strip() == "top":
        return None if text is None else "top"
    if text.strip().isdigit():
        return int(text)
    if text.strip().isidentifier():
        return text.strip()
    raise UsageError(f"--target {text!r}: give top (the largest output element at each point), an output index "
                     "such as 3, or the name of a column or array of labels")


PartialOption = Annotated[
    list[str] | None,
    typer.Option("--partial", "-p", metavar="SPEC", help="x (dy/dx), x^8, or x,y^2 (d3y/dxdy^2); repeatable.", show_default=False, rich_help_panel="Derivatives"),
]
DirectionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--direction", "-v", metavar="V[^N]",
        help="A derivative along a vector: 1,1 (d/dv, v in input order), x=1,t=2 (others 0), 1,1^3 (order 3); "
             "repeatable.",
        show_default=False,
    rich_help_panel="Derivatives"),
]
OrderOption = Annotated[
    int | None, typer.Option("--order", metavar="N", min=1, help="Every mixed partial of total order N over --wrt.", show_default=False, rich_help_panel="Derivatives")
]


ExprOption = Annotated[
    list[str],
    typer.Option(
        "--expr", "-e", metavar="[NAME=]EXPR",
        help="[NAME=]EXPR, e.g. \"res=u_t + u*u_x - 0.01/pi*u_xx\" or \"D(y, x0) + D(y, x1^2)\"; repeatable.",
        show_default=False,
    rich_help_panel="Derivatives"),
]


RtolOption = Annotated[
    str | None, typer.Option("--rtol", metavar="R", help="Relative tolerance [default: 1e-4 in float32, 1e-8 in float64].", show_default=False, rich_help_panel="Gates")
]
AtolOption = Annotated[
    str | None, typer.Option("--atol", metavar="A", help="Absolute tolerance [default: 0, so the tolerance follows each column's scale].", show_default=False, rich_help_panel="Gates")
]
