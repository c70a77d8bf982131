"""The command line: parse, validate, choose a format, call the library.

TensorFlow is imported only inside the commands that compute, so `--help`
and `--version` answer at once. Every failure reaches `DerivcliGroup.main`,
the one place that turns exceptions into one line on standard error and an
exit status.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from derivcli.cli_options import (
    AtolOption,
    AtOption,
    ColumnsOption,
    CommonOptions,
    CsvOption,
    CustomObjectsOption,
    DelimiterOption,
    DirectionOption,
    ExprOption,
    GridOption,
    Hdf5Option,
    LogitsOption,
    ModelArgument,
    NamesOption,
    NpzOption,
    OrderOption,
    OutputNamesOption,
    OutputOption,
    OutputsOption,
    PartialOption,
    PlotAtOption,
    PlotAxesOption,
    PlotCmapOption,
    PlotDpiOption,
    PlotTitleOption,
    RtolOption,
    TargetOption,
    TracebackOption,
    UnsafeOption,
    WrtOption,
    _choice,
    _delimiter,
    _names_or_none,
    _number,
    parse_target,
    with_shared_options,
)
from derivcli.errors import CheckFailed, DerivcliError, ExitStatus, Terminated, UsageError, printable, styled
from derivcli.naming import split_names
from derivcli.specs import (
    parse_at,
    parse_direction,
    parse_grid,
    parse_partial,
)


def _fail_line(message: str) -> None:
    sys.stderr.write(f"{styled('derivcli: error:', 'error', sys.stderr)} {printable(message)}\n")
    sys.stderr.flush()


def _raise_terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


def _silence_stdout() -> None:
    """Points standard output at /dev/null so the final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _spaced_point(arguments: Sequence[str], message: str) -> str | None:
    """`--at 0.5 1`: the point's values written apart, which the parser takes for an extra argument; the fix."""
    if "unexpected extra argument" not in message and "No such option" not in message:
        return None
    for position, argument in enumerate(arguments[:-2]):
        if argument == "--at":
            values = [arguments[position + 1]]
            for following in arguments[position + 2:]:
                if following.startswith("-") and not following[1:2].isdigit() and following[1:2] != ".":
                    break
                values.append(following)
            if len(values) > 1 and all(NUMBER_LIKE.fullmatch(value) for value in values[1:]):
                return (f"--at {' '.join(values)}: a point's values are separated by commas, not spaces: "
                        f"--at {','.join(values)}")
    return None


# A value on the command line that reads as a number (`1`, `-0.5`, `2e-3`).
NUMBER_LIKE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class DerivcliGroup(TyperGroup):
    """The command group; its `main` maps every exception to one line and a status."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command with its whole first sentence, not cut at 45 characters."""
        rows = [(name, (command.help or "").strip().split("\n")[0]) for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        from derivcli.run import PipeClosed

        if sys.stderr is None:  # started with standard error closed (2>&-): messages go nowhere, the run goes on
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        warnings.simplefilter("ignore")  # no raw Python warning reaches standard error: derivcli says what matters
        arguments = list(sys.argv[1:] if args is None else args)
        if "_DERIVCLI_COMPLETE" in os.environ:  # a shell asks for completions: Typer's classes for bash, zsh, fish
            from typer._completion_classes import completion_init

            completion_init()
        for flag in ("--show-completion", "--install-completion"):  # the shell is optional: this one by default
            if flag in arguments and (arguments.index(flag) + 1 == len(arguments)
                                      or arguments[arguments.index(flag) + 1].startswith("-")):
                arguments.insert(arguments.index(flag) + 1, "this")
        show_traceback = "--traceback" in arguments
        extra.pop("standalone_mode", None)
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread
            previous = None
        try:
            status = super().main(
                args=arguments, prog_name="derivcli", standalone_mode=False, **extra
            )
            if status == ExitStatus.INTERRUPTED:
                _fail_line("interrupted")
            status = status if isinstance(status, int) else ExitStatus.SUCCESS
        except DerivcliError as error:
            if show_traceback:
                traceback.print_exc()
            _fail_line(error.message)
            status = error.status
        except typer.TyperException as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # bare `derivcli`: the help is the answer
                sys.stdout.write(error.ctx.get_help() + "\n")
                status = ExitStatus.SUCCESS
            else:
                # The help of the command whose line was wrong: the group's for an unknown command.
                context = getattr(error, "ctx", None)
                named = arguments[0] if arguments and arguments[0] in self.commands else None
                where = context.command_path if context is not None else f"derivcli {named}" if named else "derivcli"
                _fail_line(_spaced_point(arguments, error.format_message())
                           or f"{error.format_message()} (see '{where} --help')".replace("\n", " "))
                status = getattr(error, "exit_code", ExitStatus.USAGE)
        except (typer.Abort, KeyboardInterrupt):
            _fail_line("interrupted")
            status = ExitStatus.INTERRUPTED
        except Terminated:
            _fail_line("terminated")
            status = ExitStatus.TERMINATED
        except PipeClosed:
            _silence_stdout()
            status = ExitStatus.SUCCESS
        except MemoryError:
            _fail_line("out of memory; lower --batch-size")
            status = ExitStatus.ERROR
        except OSError as error:  # the machine refused a read or write: a full disk, a file-size limit
            if show_traceback:
                traceback.print_exc()
            code = errno.errorcode.get(error.errno or 0, "")
            where = f"{error.filename}: " if error.filename else ""
            _fail_line(f"{where}{error.strerror or error}{f' ({code})' if code else ''}")
            status = ExitStatus.ERROR
        except Exception as error:  # the one place that catches everything
            if show_traceback:
                traceback.print_exc()
            _fail_line(
                f"internal error: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''} "
                "(rerun with --traceback and report it)"
            )
            status = ExitStatus.ERROR
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(int(status))


class DerivcliCommand(TyperCommand):
    """A command whose help names arguments plainly (MODEL, SHARD...) and ends with examples."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """Arguments, then the options in panels (each option's `rich_help_panel`), in `HELP_PANELS` order."""
        arguments = [(p.metavar or p.name.upper(), p.help or "") for p in self.get_params(ctx)
                     if p.param_type_name == "argument"]
        panels: dict[str, list[tuple[str, str]]] = {"Arguments": arguments}
        for param in self.get_params(ctx):
            if param.param_type_name == "option" and (row := param.get_help_record(ctx)):
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(row)
        for title in sorted(panels, key=lambda t: HELP_PANELS.index(t) if t in HELP_PANELS else len(HELP_PANELS)):
            if panels[title]:
                with formatter.section(title):
                    formatter.write_dl(panels[title])


# The order of the panels of a command's --help.
HELP_PANELS = ["Arguments", "Points", "Derivatives", "Model", "Output", "Computation", "Gates", "Pictures", "Options"]


def examples(*lines: str) -> str:
    """An "Examples" epilog: commands that run as they are, on the shipped sample models."""
    return "Examples (from the project folder, on its sample models):\n\n\b\n" + "\n".join(f"  $ {line}" for line in lines)


app = typer.Typer(
    cls=DerivcliGroup,
    help="Derivatives of saved Keras models, from the shell.",
    epilog=examples("derivcli grad sample_models/shifted_square.h5 --at 0.5",
                    "derivcli deriv sample_models/square_tanh.keras --grid -1:1:5 -p x -p x^2",
                    "derivcli COMMAND --help   (each command's options and examples)"),
    add_completion=False,  # derivcli's own --show-completion/--install-completion take the shell as a value
    rich_markup_mode=None,  # plain help: option text such as [default: ...] is shown as written
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


# The examples at the end of each command's --help; a test runs every one of them.
EXAMPLES = {
    "info": examples("derivcli info sample_models/square_relu.keras",
                     "derivcli info sample_models/heat_pinn.keras --format json"),
    "eval": examples("derivcli eval sample_models/square_tanh.keras --grid -2:2:5",
                     "derivcli eval sample_models/softplus_2d.keras --at 0.3,0.7 --format json"),
    "grad": examples("derivcli grad sample_models/shifted_square.h5 --at 0.5",
                     "derivcli grad sample_models/softplus_2d.keras --grid -1:1:101 -o grad.npz"),
    "hessian": examples("derivcli hessian sample_models/softplus_2d.keras --at 0.3,0.7",
                        "derivcli hessian sample_models/softplus_2d.keras --at 0.3,0.7 --dtype float64"),
    "laplacian": examples("derivcli laplacian sample_models/heat_pinn.keras --grid t=0:1:3 --grid x=-1:1:5 --wrt x"),
    "deriv": examples("derivcli deriv sample_models/square_tanh.keras --grid -1:1:5 -p x -p x^2",
                      "derivcli deriv sample_models/softplus_2d.keras --at 0.3,0.7 --order 3",
                      "derivcli deriv sample_models/softplus_2d.keras --at 0.3,0.7 --direction 1,1^2"),
    "op": examples('derivcli op sample_models/heat_pinn.keras --output-names u --grid t=0:1:101 --grid x=-1:1:201 '
                   '--expr "res=u_t - 0.1*u_xx" --max-abs 0.2 -o residual.npz'),
    "attribute": examples("derivcli attribute sample_models/bars_cnn.keras --npz sample_models/bars.npz --target top "
                          "--logits -o attributions.npz",
                          "derivcli attribute sample_models/softplus_2d.keras --at 0.3,0.7 --method saliency"),
    "check": examples("derivcli check sample_models/softplus_2d.keras --grid -1:1:5",
                      "derivcli check sample_models/square_tanh.keras --at 0.5 -p x^3"),
    "doctor": examples("derivcli doctor sample_models/square_relu.keras",
                       "derivcli doctor sample_models/heat_pinn.keras --grid t=0:1:5 --grid x=-1:1:5"),
    "merge": examples("derivcli grad sample_models/softplus_2d.keras --grid -1:1:101 --shard 0/2 -o part0.csv",
                      "derivcli grad sample_models/softplus_2d.keras --grid -1:1:101 --shard 1/2 -o part1.csv",
                      "derivcli merge part0.csv part1.csv -o grad.csv"),
    "plot": examples("derivcli deriv sample_models/square_relu.keras --grid -1:1:201 -p x -p x^2 -o relu.npz",
                     "derivcli plot relu.npz -o relu.png",
                     "derivcli plot relu.npz -o -"),
}


def _version(value: bool) -> None:
    if value:
        from derivcli.system import versions

        typer.echo("\n".join(versions()))
        raise typer.Exit()


COMPLETION_SHELLS = ("bash", "zsh", "fish")


def _completion(install: bool) -> Callable[[Any, Any, str | None], None]:
    """`--show-completion SHELL` and `--install-completion SHELL`: the completion script of bash, zsh or fish
    (without SHELL: the shell derivcli runs under), printed or installed."""

    def callback(ctx: Any, param: Any, value: str | None) -> None:
        if value is None or ctx.resilient_parsing:
            return
        from typer._completion_shared import _get_shell_name, get_completion_script
        from typer._completion_shared import install as install_script

        shell = (_get_shell_name() or "") if value == "this" else value
        if shell not in COMPLETION_SHELLS:
            given = f"{param.opts[0]}: this shell ({shell or 'unknown'}) is not" if value == "this" \
                else f"{param.opts[0]} {value}: not"
            raise UsageError(f"{given} bash, zsh or fish; give one of them")
        if install:
            _, path = install_script(shell=shell, prog_name="derivcli", complete_var="_DERIVCLI_COMPLETE")
            typer.echo(f"{shell} completion installed in {path}; it takes effect in a new shell")
        else:
            typer.echo(get_completion_script(prog_name="derivcli", complete_var="_DERIVCLI_COMPLETE", shell=shell))
        raise typer.Exit()

    return callback


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Print the versions of derivcli, Python, TensorFlow, Keras and NumPy, and exit (derivcli version --devices adds the devices TensorFlow sees).")
    ] = False,
    show_completion: Annotated[str | None, typer.Option(
        "--show-completion", metavar="[bash|zsh|fish]", callback=_completion(install=False),
        is_eager=True, expose_value=False, autocompletion=lambda: list(COMPLETION_SHELLS),
        help="Print the completion script of bash, zsh or fish (without a value: this shell's), and exit.")] = None,
    install_completion: Annotated[str | None, typer.Option(
        "--install-completion", metavar="[bash|zsh|fish]", callback=_completion(install=True),
        is_eager=True, expose_value=False, autocompletion=lambda: list(COMPLETION_SHELLS),
        help="Install completion for bash, zsh or fish (without a value: this shell), and exit.")] = None,
) -> None:
    """Derivatives of saved Keras models, from the shell.

    Load a .keras, .h5 or SavedModel, give points (--at, --grid, --csv, --npz),
    and get values, gradients, Hessians, Laplacians or any partial derivative
    as a table, CSV, TSV, JSON, NPZ or HDF5.
    """


def _warn(options: CommonOptions, message: str) -> None:
    if not options.quiet:
        sys.stderr.write(f"{styled('derivcli: warning:', 'warning', sys.stderr)} {printable(message)}\n")


def _inform(options: CommonOptions, message: str) -> None:
    """Information, not a warning: printed on a terminal, or with --verbose; never with --quiet."""
    if not options.quiet and (options.verbose or sys.stderr.isatty()):
        sys.stderr.write(f"derivcli: {printable(message)}\n")


def _progress(total: int | None, batch_size: int, quiet: bool) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """A progress bar on standard error for long runs on a terminal, else nothing."""
    long_run = total is None or total > 8 * batch_size
    if quiet or not long_run or not sys.stderr.isatty():
        return None, lambda: None
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(console=Console(stderr=True), transient=True)
    task = bar.add_task("points", total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar.stop


def _run_request(options: CommonOptions, request: Any) -> Any:
    """Runs one computing command through the library, presenting its warnings, progress and timings."""
    from derivcli.command import run_command

    summary = run_command(
        options, request, warn=lambda message: _warn(options, message),
        # Rows streaming onto the terminal are the progress; a bar would tear them.
        progress=lambda total, batch_size: _progress(
            total, batch_size, options.quiet or (options.output in (None, "-") and _stdout_is_terminal())),
        terminal_plot=_terminal_plot(options),
        inform=lambda message: _inform(options, message),
    )
    if options.timings:
        sys.stderr.write(f"derivcli: timings: {summary.timings.line()}\n")
    return summary


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except ValueError:
        return False


def _terminal_plot(options: CommonOptions) -> Callable[[Any], None]:
    """`--plot -`: the figure in Unicode, on standard error when standard output carries the data."""

    def draw(data: Any) -> None:
        from derivcli.plots import render_terminal

        stream = sys.stdout if options.output not in (None, "-") else sys.stderr
        stream.write(render_terminal(data, stream))
        stream.flush()

    return draw


@app.command("info", cls=DerivcliCommand, epilog=EXAMPLES["info"])
def info_command(
    model: ModelArgument,
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT", help="table or json.")] = "table",
    names: NamesOption = None,
    output_names: OutputNamesOption = None,
    custom_objects: CustomObjectsOption = None,
    unsafe: UnsafeOption = False,
    traceback: TracebackOption = False,
) -> None:
    """Inputs, outputs, layers, activations, parameter count and smoothness verdict."""
    from derivcli.info import describe, render_info
    from derivcli.models import load_model

    chosen = _choice(format, "--format", ("table", "json"))
    loaded = load_model(
        model, list(custom_objects or []), unsafe, "float32",
        _names_or_none(names, "--names"), _names_or_none(output_names, "--output-names"),
    )
    description = describe(loaded)
    if chosen == "json":
        sys.stdout.write(json.dumps(description, indent=2) + "\n")
    else:
        render_info(description)


@app.command("eval", cls=DerivcliCommand, epilog=EXAMPLES["eval"])
@with_shared_options
def eval_command(model: ModelArgument, outputs: OutputsOption = None, *, options: CommonOptions) -> None:
    """The model's outputs at the points."""
    from derivcli.run import DerivativeRequest

    _run_request(options, DerivativeRequest(outputs=_names_or_none(outputs, "--outputs")))


def _register_whole_derivative_command(name: str, summary: str, request_flag: str) -> None:
    """Registers grad, hessian or laplacian: one request flag, plus --wrt and --outputs."""

    def command(
        model: ModelArgument, wrt: WrtOption = None, outputs: OutputsOption = None, *, options: CommonOptions
    ) -> None:
        from derivcli.run import DerivativeRequest

        _run_request(options, DerivativeRequest(
            wrt=_names_or_none(wrt, "--wrt"), outputs=_names_or_none(outputs, "--outputs"), **{request_flag: True}))

    command.__doc__ = summary
    command.__name__ = command.__qualname__ = f"{name}_command"
    app.command(name, cls=DerivcliCommand, epilog=EXAMPLES[name])(with_shared_options(command))


_register_whole_derivative_command(
    "grad", "All first derivatives (the Jacobian) of each output with respect to each input.", "jacobian")
_register_whole_derivative_command(
    "hessian", "All second derivatives: the upper triangle of the Hessian, diagonal included.", "hessian")
_register_whole_derivative_command(
    "laplacian", "The Laplacian of each output, summed over the --wrt inputs (default: all).", "laplacian")


@app.command("deriv", cls=DerivcliCommand, epilog=EXAMPLES["deriv"])
@with_shared_options
def deriv_command(
    model: ModelArgument,
    partial: PartialOption = None,
    order: OrderOption = None,
    direction: DirectionOption = None,
    wrt: WrtOption = None,
    outputs: OutputsOption = None,
    *,
    options: CommonOptions,
) -> None:
    """Arbitrary partial derivatives of any order: --partial SPEC ..., --order N, or along vectors: --direction V^N."""
    from derivcli.run import DerivativeRequest

    if not partial and order is None and not direction:
        raise UsageError("deriv needs --partial SPEC (for example --partial x^2), --order N or --direction V^N")
    _run_request(options, DerivativeRequest(
        partials=[parse_partial(p) for p in partial or []], order=order,
        directions=[parse_direction(d) for d in direction or []],
        wrt=_names_or_none(wrt, "--wrt"), outputs=_names_or_none(outputs, "--outputs")))


@app.command("op", cls=DerivcliCommand, epilog=EXAMPLES["op"])
@with_shared_options
def op_command(
    model: ModelArgument, expr: ExprOption, wrt: WrtOption = None, *, options: CommonOptions
) -> None:
    """Differential-operator expressions (PDE residuals) of the outputs and inputs.

    Expressions use numbers, + - * / **, pi, e, sin cos tan exp log sqrt tanh
    abs, input names, output names, D(u, x), D(u, x^2), D(u, x, t), lap(u)
    (over --wrt), and u_t, u_xx when every input name is one letter.
    """
    from derivcli.run import DerivativeRequest

    _run_request(options, DerivativeRequest(expressions=list(expr), wrt=_names_or_none(wrt, "--wrt")))


def _attribution_choices(which: str) -> list[str]:
    """`--method` or `--rule` values, for shell completion (the attribution module loads only when asked)."""
    from derivcli import attribution

    return list(getattr(attribution, which))


@app.command("attribute", cls=DerivcliCommand, epilog=EXAMPLES["attribute"])
@with_shared_options
def attribute_command(
    model: ModelArgument,
    method: Annotated[str, typer.Option(
        "--method", metavar="METHOD", autocompletion=lambda: _attribution_choices("METHODS"), rich_help_panel="Derivatives",
        help="integrated-gradients, saliency (|dy/dx|), input-x-gradient (x*dy/dx), smoothgrad (the mean gradient over "
             "noisy copies) or expected-gradients (baselines drawn from --baseline FILE).")] = "integrated-gradients",
    baseline: Annotated[str, typer.Option(
        "--baseline", metavar="zero|FILE", rich_help_panel="Derivatives",
        help="The path's start: zero, or a points file (NPZ, HDF5, CSV) with one baseline for all points or one per "
             "point; expected-gradients draws from it.")] = "zero",
    steps: Annotated[str, typer.Option(
        "--steps", metavar="N|auto", rich_help_panel="Derivatives",
        help="Integration steps of integrated-gradients; auto doubles them per point from 16 (to 4096) until "
             "|delta| is within --max-delta (default: 0.1% of |y(x) - y(baseline)|).")] = "50",
    rule: Annotated[str, typer.Option(
        "--rule", metavar="RULE", autocompletion=lambda: _attribution_choices("RULES"), rich_help_panel="Derivatives",
        help="gauss-legendre, riemann-left, riemann-right, riemann-middle or riemann-trapezoid.")] = "gauss-legendre",
    samples: Annotated[int, typer.Option(
        "--samples", metavar="N", rich_help_panel="Derivatives",
        help="Noisy copies (smoothgrad) or drawn baselines (expected-gradients) per point.")] = 50,
    noise: Annotated[float, typer.Option(
        "--noise", metavar="SIGMA", rich_help_panel="Derivatives",
        help="smoothgrad's noise: a standard deviation, as a fraction of each point's range (max - min).")] = 0.15,
    seed: Annotated[int, typer.Option(
        "--seed", metavar="N", rich_help_panel="Derivatives",
        help="The draws' seed; each point draws from it and its row number, the same in any batch or shard.")] = 0,
    max_delta: Annotated[str | None, typer.Option(
        "--max-delta", metavar="TOL", rich_help_panel="Gates", show_default=False,
        help="Exit 3 when any |delta(y)| (sum of attributions - (y(x) - y(baseline))) exceeds TOL.")] = None,
    layer: Annotated[str | None, typer.Option(
        "--layer", metavar="NAME", rich_help_panel="Derivatives", show_default=False,
        help="Attribute to this layer's output instead of the inputs (integrated gradients from zero at the layer); "
             "an Embedding's is summed over its last axis, one attribution per token: the answer for token ids.")] = None,
    wrt: WrtOption = None,
    outputs: OutputsOption = None,
    *,
    options: CommonOptions,
) -> None:
    """Attributions: how much each input coordinate moves an output (saliency, Integrated Gradients, SmoothGrad...)."""
    from derivcli.attribution import AttributionRequest, parse_steps

    request = AttributionRequest(
        method=method.strip(), baseline=baseline, steps=parse_steps(steps), rule=rule.strip(), samples=samples,
        noise=noise, seed=seed, max_delta=_number(max_delta, "--max-delta", "0.001") if max_delta else None,
        wrt=_names_or_none(wrt, "--wrt"), outputs=_names_or_none(outputs, "--outputs"), layer=layer)
    request.check()
    _run_request(options, request)


@app.command("check", cls=DerivcliCommand, epilog=EXAMPLES["check"])
@with_shared_options
def check_command(
    model: ModelArgument,
    partial: PartialOption = None,
    order: OrderOption = None,
    wrt: WrtOption = None,
    outputs: OutputsOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = None,
    *,
    options: CommonOptions,
) -> None:
    """Automatic derivatives against float64 finite differences, with the error per column.

    Default: every first and second derivative. Exit status 3 when a column
    is off by more than --rtol/--atol beyond the finite-difference error estimate.
    A column the finite differences cannot resolve (their error estimate as large
    as the column) is `unresolved`, never `ok`; with --strict it fails too.
    """
    from derivcli.check import run_check
    from derivcli.run import DerivativeRequest

    if options.plot is not None:
        raise UsageError("--plot draws eval, grad, hessian, laplacian, deriv and op results; check writes a table "
                         "of errors per column")
    request = DerivativeRequest(
        partials=[parse_partial(p) for p in partial or []], order=order,
        jacobian=not partial and order is None, hessian=not partial and order is None,
        wrt=_names_or_none(wrt, "--wrt"), outputs=_names_or_none(outputs, "--outputs"),
    )
    run_check(options, request, _number(rtol, "--rtol", "1e-4"), _number(atol, "--atol", "0"),
              warn=lambda message: _warn(options, message))


@app.command("doctor", cls=DerivcliCommand, epilog=EXAMPLES["doctor"])
def doctor_command(
    model: ModelArgument,
    at: AtOption = None,
    grid: GridOption = None,
    csv: CsvOption = None,
    columns: ColumnsOption = None,
    delimiter: DelimiterOption = ",",
    npz: NpzOption = None,
    hdf5: Hdf5Option = None,
    order: Annotated[int | None, typer.Option("--order", metavar="N", min=1, max=8, help="Highest order compared in float32 and float64 [default: 4; 2 on networks of more than 500 ops].", show_default=False)] = None,
    wrt: WrtOption = None,
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT", help="text or json.")] = "text",
    names: NamesOption = None,
    output_names: OutputNamesOption = None,
    target: TargetOption = None,
    logits: LogitsOption = False,
    custom_objects: CustomObjectsOption = None,
    unsafe: UnsafeOption = False,
    traceback: TracebackOption = False,
) -> None:
    """Diagnostics: dead higher orders, disconnected weights, NaN/Inf and where they start, batch dependence, float32 risk.

    Without points, 32 random points in [-1, 1]^d. The derivative checks take every continuous
    coordinate, --wrt's, or on a model with many (an image) a seeded sample of 16, named in a
    finding. Exit status 3 when a finding is an error.
    """
    from derivcli.command import RunOptions
    from derivcli.doctor import diagnose_file

    chosen = _choice(format, "--format", ("text", "json"))
    given = [o for o, v in (("--at", at), ("--grid", grid), ("--csv", csv), ("--npz", npz), ("--hdf5", hdf5)) if v]
    if len(given) > 1:
        from derivcli.points import check_one_source

        check_one_source(given)
    where, findings = diagnose_file(RunOptions(
        model, custom_objects=list(custom_objects or []), unsafe=unsafe, names=_names_or_none(names, "--names"),
        output_names=_names_or_none(output_names, "--output-names"), at=[parse_at(a) for a in at or []],
        grid=[parse_grid(g) for g in grid or []], csv=csv, columns=_names_or_none(columns, "--columns"),
        delimiter=_delimiter(delimiter), npz=npz, hdf5=hdf5, target=parse_target(target), logits=logits,
    ), order, _names_or_none(wrt, "--wrt"))
    if chosen == "json":
        sys.stdout.write(json.dumps({"model": model, "points": where, "findings": [f.as_dict() for f in findings]}, indent=2) + "\n")
    else:
        sys.stdout.write(f"derivcli doctor {model}: {where}\n")
        width = max(len(f.check) for f in findings)
        for finding in findings:
            sys.stdout.write(f"{finding.severity:7s} {finding.check:{width}s}  {finding.message}\n")
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise CheckFailed(f"doctor found {len(errors)} error(s) ({', '.join(f.check for f in errors)}); each finding "
                          "is on standard output")  # said once there, not again here


@app.command("version", cls=DerivcliCommand, epilog=examples("derivcli version", "derivcli version --devices"))
def version_command(
    devices: Annotated[bool, typer.Option("--devices", metavar="", help="Also the devices TensorFlow sees and its "
                                          "CUDA build (imports TensorFlow: a few seconds).")] = False,
) -> None:
    """Versions of derivcli, Python and its packages, for bug reports; with --devices, what TensorFlow sees."""
    from derivcli import system

    sys.stdout.write("\n".join(system.versions() + (system.devices() if devices else [])) + "\n")


@app.command("merge", cls=DerivcliCommand, epilog=EXAMPLES["merge"])
def merge_command(
    shards: Annotated[list[str], typer.Argument(metavar="SHARD...", help="The shard files of one run, all N of them, in any order (merge orders them by K).", show_default=False)],
    output: OutputOption = None,
    traceback: TracebackOption = False,
) -> None:
    """Join the outputs of --shard K/N runs into exactly what the unsharded run writes.

    Each shard file's record (inside NPZ/HDF5, in FILE.shard beside text files) is checked first:
    a missing or doubled shard, a shard of another run, or a text shard changed since it was
    written is refused.
    """
    from derivcli.merge import merge
    from derivcli.writers import refuse_overwriting_inputs

    refuse_overwriting_inputs(output, [("shard", shard) for shard in shards])
    merge(shards, output)


@app.command("plot", cls=DerivcliCommand, epilog=EXAMPLES["plot"])
def plot_command(
    results: Annotated[list[str], typer.Argument(metavar="RESULT...", help="Results saved by derivcli: .npz or .h5 "
                                                 "(a grid's keep its shape), .csv, .tsv, .json or .jsonl; several are "
                                                 "drawn side by side.", show_default=False)],
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FILE", help="FILE.png, .svg or .pdf, or - to "
                                               "draw in the terminal [default: the terminal, when standard output is "
                                               "one].", show_default=False, rich_help_panel="Output")] = None,
    columns: Annotated[str | None, typer.Option("--columns", metavar="NAME[,NAME...]", help="The columns to draw "
                                                "[default: every value column].", show_default=False,
                                                rich_help_panel="Pictures")] = None,
    plot_axes: PlotAxesOption = None,
    plot_at: PlotAtOption = None,
    plot_dpi: PlotDpiOption = 100,
    plot_title: PlotTitleOption = None,
    plot_cmap: PlotCmapOption = None,
    mark_max: Annotated[bool, typer.Option("--mark-max", metavar="", help="Mark each column's largest |value| and give it in the "
                                           "panel's title.", rich_help_panel="Pictures")] = False,
    traceback: TracebackOption = False,
) -> None:
    """Pictures of saved results: curves and heatmaps of grids, scatters of other points."""
    from derivcli.plots import Style, check_plot_path, plot_results, render_terminal

    if output is None:
        if not _stdout_is_terminal():
            raise UsageError("plot: standard output is not a terminal: give -o FILE.png (.svg, .pdf), or -o - to draw "
                             "the picture as text")
        output = "-"
    check_plot_path(output, "-o")
    from derivcli.writers import refuse_overwriting_inputs

    refuse_overwriting_inputs(output, [("RESULT", path) for path in results])
    chosen = [name.strip() for name in split_names(columns) if name.strip()] if columns else None  # d2y/dx^2 is no identifier
    drawn = plot_results(results, output, chosen, _names_or_none(plot_axes, "--plot-axes"),
                         [parse_at(a) for a in plot_at or []], mark_max, Style(plot_dpi, plot_title, plot_cmap))
    if output == "-":
        sys.stdout.write(render_terminal(drawn, sys.stdout))


def run() -> None:
    """The installed command (and `python -m derivcli`): `app`, then an immediate exit once TensorFlow is loaded.

    Tearing down the interpreter after TensorFlow takes a second (its threads,
    modules and atexit hooks) after the answer is out. Every output is complete
    by then: files are committed, standard output and error are flushed here,
    so the process ends at once with the run's status. That skips TensorFlow's
    `atexit` clean-up of its temporary files: the run keeps them in a folder of
    its own (`derivcli.scratch`), removed here however the run ended.
    """
    from derivcli.scratch import ScratchFolder

    scratch = ScratchFolder()
    try:
        app()
    except SystemExit as done:
        scratch.remove()
        if "tensorflow" not in sys.modules:
            raise
        code = done.code
        status = code if isinstance(code, int) else 0 if code is None else ExitStatus.ERROR
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):  # a closed pipe: nothing more to say
                stream.flush()
        os._exit(int(status))
    finally:  # an interrupt before the command's own handling began
        scratch.remove()
