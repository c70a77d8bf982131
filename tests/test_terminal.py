"""What a person sees on a terminal: streamed tables, panels, colour, progress, help, completion, messages."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SAMPLES, derivcli_executable, read_csv, run_in_pty, run_installed
from test_errors import assert_one_line_error

TANH = str(SAMPLES / "square_tanh.keras")
SOFTPLUS = str(SAMPLES / "softplus_2d.keras")


def visible(text: str) -> list[str]:
    """The lines a terminal shows, without colour codes."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text.replace("\r", ""))
    return [line for line in plain.split("\n") if line.strip()]


def test_table_rows_appear_while_the_input_is_still_coming():
    """A slow producer: the first row is computed and shown before the producer sends the next
    (the input pauses for more than STALL_SECONDS with a whole row waiting)."""
    import fcntl
    import select
    import struct
    import termios

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen([derivcli_executable(), "grad", TANH, "--csv", "-"], stdin=subprocess.PIPE,
                               stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    process.stdin.write(b"x\n0.5\n")
    process.stdin.flush()
    shown = b""
    deadline = time.monotonic() + 120
    while b"0.94787" not in shown and time.monotonic() < deadline:  # dy/dx at 0.5, as the README's table
        if select.select([leader], [], [], 1)[0]:
            shown += os.read(leader, 4096)
    assert b"0.94787" in shown, shown  # shown while standard input is still open
    assert b"1.5" not in shown
    process.stdin.write(b"1.5\n")
    process.stdin.close()
    while True:
        try:
            data = os.read(leader, 4096) if select.select([leader], [], [], 30)[0] else b""
        except OSError:
            data = b""
        if not data:
            break
        shown += data
    os.close(leader)
    assert process.wait(timeout=60) == 0
    lines = visible(shown.decode())
    assert lines[0].split() == ["x", "y", "dy/dx"]  # one header: widths fixed from the first batch
    assert [line.split()[0] for line in lines[1:]] == ["0.5", "1.5"]


def test_a_slow_producer_on_a_pipe_gets_its_rows_at_once(tmp_path):
    process = subprocess.Popen([derivcli_executable(), "grad", TANH, "--csv", "-"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    process.stdin.write(b"x\n0.5\n")
    process.stdin.flush()
    header = process.stdout.readline()
    first = process.stdout.readline()  # blocks until derivcli writes it: before 1.5 is even sent
    assert header == b"x,y,dy/dx\n" and first.startswith(b"0.5,")
    process.stdin.write(b"1.5\n")
    process.stdin.close()
    assert process.stdout.read().startswith(b"1.5,")
    assert process.wait(timeout=60) == 0


@pytest.mark.parametrize("columns", [0, 40, 80, 200])
def test_a_wide_table_is_a_block_per_point_that_fits_the_terminal(model_factory, columns):
    """A 4-input Hessian (4 + 1 + 10 columns, 167 characters): one table where it fits; else one block of
    name/value pairs per point, every column once and in order, no line wider than the terminal, and a note.
    A terminal that reports 0 x 0 (`script`, some CI runners) is taken as 80 wide."""
    _, path = model_factory("tanh", 4, 1)
    status, shown, _ = run_in_pty("hessian", str(path), "--at", "0.1,0.2,0.3,0.4", "--at", "1,2,3,4",
                                  columns=columns, lines=0 if columns == 0 else 24, env={"COLUMNS": ""})
    assert status == 0, shown
    lines = visible(shown)
    notes = [line for line in lines if line.startswith("derivcli: note: ")]
    table = [line for line in lines if not line.startswith("derivcli: note: ")]
    width = columns or 80
    assert max(map(len, table)) <= width
    expected = ["x0", "x1", "x2", "x3", "y"] + [f"d2y/dx{i}^2" if i == j else f"d2y/dx{i}dx{j}"
                                                 for i in range(4) for j in range(i, 4)]
    if columns == 200:
        assert not notes and table[0].split() == expected and len(table) == 3
        return
    assert len(notes) == 1 and f"the terminal has {width}" in notes[0] and "--format csv" in notes[0]
    starts = [k for k, line in enumerate(table) if line.split() == ["point", "1"] or line.split() == ["point", "2"]]
    assert len(starts) == 2
    for first, last in ((starts[0], starts[1]), (starts[1], len(table))):
        words = [word for line in table[first + 1:last] for word in line.split()]
        assert words[0::2] == expected  # name, value, name, value ...
    assert [float(w) for w in " ".join(table[starts[1] + 1:]).split()[1:8:2]] == [1, 2, 3, 4]


def test_a_long_stream_keeps_one_width_and_one_notation_per_column(tmp_path):
    """Widths and notations are fixed from the first batch: every line of the table has the same length,
    and a column is positional or scientific throughout (a later number that does not fit is rounded to fit)."""
    from derivcli.writers import Layout, TableWriter

    layout = Layout(["x"], [], ["small", "big"], np.dtype(np.float64))
    out = tmp_path / "t.txt"
    writer = TableWriter(layout, str(out))
    rng = np.random.default_rng(0)
    for batch in range(20):
        x = rng.uniform(-1, 1, (50, 1)) * (10.0 ** (batch % 5))
        values = np.column_stack([rng.uniform(-1, 1, 50) * 1e-7 * 10.0 ** (batch % 3), rng.uniform(0, 1, 50) * 3.0])
        writer.write(x, [], values)
    writer.close()
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 1000 and len({len(line) for line in lines[1:]}) == 1
    small = [line.split()[1] for line in lines[1:]]
    assert all("e-" in cell for cell in small)  # never 0.0000056 beside 8.3e-07
    assert not any("e" in line.split()[2] for line in lines[1:])


def test_one_point_is_a_vertical_list(cli):
    result = cli("grad", SOFTPLUS, "--at", "0.3,0.7", "--format", "table")
    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == ["x0", "x1", "y", "dy/dx0", "dy/dx1"]
    assert rows[0][1] == "0.3" and float(rows[2][1]) == pytest.approx(0.5673471, rel=1e-5)


def test_a_big_table_streams_with_flat_memory(cli, tmp_path):
    """90,000 rows as a table: written batch by batch (the writer keeps no rows), as CSV is."""
    from derivcli.writers import Layout, TableWriter

    layout = Layout(["x"], [], ["y"], np.dtype(np.float32))
    out = tmp_path / "t.txt"
    writer = TableWriter(layout, str(out))
    for start in range(0, 90_000, 4096):
        block = np.arange(start, min(start + 4096, 90_000), dtype=np.float64)[:, None]
        writer.write(block, [], block * 2)
        assert not hasattr(writer, "rows") or not isinstance(writer.rows, list)
    writer.close()
    lines = out.read_text().splitlines()
    assert len(lines) == 90_001 and lines[-1].split() == ["89999", "179998"]


def test_errors_and_warnings_are_coloured_on_a_terminal_only():
    status, shown, _ = run_in_pty("grad", TANH, "--at", "1", "--max-abs", "0.5")
    assert status == 3
    assert "\x1b[1;31mderivcli: error:\x1b[0m max |dy/dx|" in shown
    status, shown, _ = run_in_pty("grad", TANH, "--at", "1", "--max-abs", "0.5", env={"NO_COLOR": "1"})
    assert status == 3 and "\x1b[" not in shown and "derivcli: error: max |dy/dx|" in shown
    done = run_installed("deriv", "sample_models/square_relu.keras", "--at", "1", "-p", "x^2")
    assert done.stderr.decode().startswith("derivcli: warning: ")  # a pipe: no colour


def test_progress_bar_on_the_terminal_for_a_long_run_to_a_file_not_for_a_table(tmp_path):
    args = ["eval", SOFTPLUS, "--grid", "-1:1:400", "--batch-size", "1000"]
    status, shown, _ = run_in_pty(*args, "-o", str(tmp_path / "out.csv"))
    assert status == 0
    assert "points" in shown and "━" in shown
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 160_001
    status, shown, _ = run_in_pty(*args, "-q", "--grid", "x1=0:0:1", "--grid", "x0=-1:1:20000")
    assert status == 0 and "━" not in shown  # the rows streaming on the terminal are the progress


def test_help_shows_defaults_metavars_and_examples(cli):
    text = cli("grad", "--help").stdout
    for shown in ("Usage: derivcli grad [OPTIONS] MODEL", "--batch-size N|auto", "[default: float32]",
                  "--shard K/N|auto[/N]", "--wrt NAME[,NAME...]", "[default: table", "Examples",
                  "$ derivcli grad sample_models/shifted_square.h5 --at 0.5"):
        assert shown in " ".join(text.split()), shown  # wherever the help's columns wrap it
    for hidden in ("<str>", "<list[str]>", "<bool>", "{MODEL}", "<float>"):
        assert hidden not in text
    merge = cli("merge", "--help").stdout
    assert "Usage: derivcli merge [OPTIONS] SHARD..." in merge and "{" not in merge


def test_every_help_example_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from derivcli.cli import EXAMPLES, app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_models").symlink_to(SAMPLES)
    runner = CliRunner()
    for command, text in EXAMPLES.items():
        for line in text.splitlines():
            if not line.strip().startswith("$ derivcli "):
                continue
            args = shlex.split(line.strip()[len("$ derivcli "):])
            if command == "plot" and args[-1] == "-":
                args = args  # to the terminal: standard output under the runner
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (line, result.stderr)


def test_bare_command_prints_help_and_succeeds(cli):
    result = cli()
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: derivcli [OPTIONS] COMMAND") and "Examples" in result.stdout
    assert result.stderr == ""


def test_usage_errors_point_at_the_right_help(cli):
    assert_one_line_error(cli("grda"), 2, "No such command 'grda'", "Did you mean 'grad'?", "(see 'derivcli --help')")
    assert_one_line_error(cli("grad", TANH, "--at"), 2, "(see 'derivcli grad --help')")


def test_shell_completion_for_bash_zsh_and_fish():
    def complete(variables: dict[str, str]) -> str:
        done = subprocess.run([derivcli_executable()], capture_output=True, text=True, cwd=ROOT, timeout=60,
                              env={**os.environ, **variables})
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert complete({"_DERIVCLI_COMPLETE": "complete_bash", "COMP_WORDS": "derivcli gr", "COMP_CWORD": "1"}).split() == ["grad"]
    assert "--plot-axes" in complete({"_DERIVCLI_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "derivcli grad --plot"})
    assert complete({"_DERIVCLI_COMPLETE": "complete_fish", "_TYPER_COMPLETE_ARGS": "derivcli he",
                     "_TYPER_COMPLETE_FISH_ACTION": "get-args"}).startswith("hessian")
    # The values of --format, --dtype and --engine, in each shell's protocol.
    assert complete({"_DERIVCLI_COMPLETE": "complete_bash", "COMP_WORDS": "derivcli grad --format ",
                     "COMP_CWORD": "3"}).split() == ["table", "csv", "tsv", "json", "jsonl", "npz", "hdf5"]
    assert complete({"_DERIVCLI_COMPLETE": "complete_fish", "_TYPER_COMPLETE_ARGS": "derivcli grad --dtype ",
                     "_TYPER_COMPLETE_FISH_ACTION": "get-args"}).split() == ["float32", "float64"]
    methods = complete({"_DERIVCLI_COMPLETE": "complete_bash", "COMP_WORDS": "derivcli attribute --method s",
                        "COMP_CWORD": "3"}).split()
    assert methods == ["saliency", "smoothgrad"]
    engines = complete({"_DERIVCLI_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "derivcli op --engine t"})
    assert '"taylor"' in engines and '"tape"' in engines and '"auto"' not in engines
    # Each shell's own script, with the shell as a value (`--show-completion zsh` or `=zsh`).
    marks = {"bash": "complete -o default -F _derivcli_completion derivcli", "zsh": "#compdef derivcli",
             "fish": "complete --command derivcli"}
    for shell, mark in marks.items():
        for args in (["--show-completion", shell], [f"--show-completion={shell}"]):
            script = subprocess.run([derivcli_executable(), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert script.returncode == 0 and mark in script.stdout, (args, script.stderr)
            assert all(other not in script.stdout for name, other in marks.items() if name != shell)
    assert_one_line_error(cli_runner("--show-completion", "tcsh"), 2, "--show-completion tcsh: not bash, zsh or fish")


def cli_runner(*args: str):
    from typer.testing import CliRunner

    from derivcli.cli import app

    return CliRunner().invoke(app, list(args))


def test_help_groups_options_in_panels(cli):
    text = cli("grad", "--help").stdout
    panels = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert panels == ["Arguments", "Points", "Derivatives", "Model", "Output", "Computation", "Gates", "Pictures",
                      "Options"]
    section = {}
    current = None
    for line in text.splitlines():
        if line[:-1] in panels:
            current = line[:-1]
        elif current and line.startswith("  -"):
            section[line.split()[0].rstrip(",")] = current
    assert section["--at"] == section["--hdf5"] == "Points" and section["--wrt"] == "Derivatives"
    assert section["--target"] == "Model" and section["-f"] == "Output" and section["--engine"] == "Computation"
    assert section["--max-abs"] == "Gates" and section["--plot"] == "Pictures" and section["-h"] == "Options"


def test_version_names_python_tensorflow_keras_numpy_without_importing_them():
    code = ("import sys; from typer.testing import CliRunner; from derivcli.cli import app; "
            "r = CliRunner().invoke(app, ['--version']); print(r.stdout); print('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("derivcli ") and lines[1].startswith("Python 3.")
    for package in ("tensorflow ", "keras ", "numpy "):
        assert package in lines[2]
    assert lines[-1] == "False"


def test_version_devices_lists_what_tensorflow_sees(cli):
    result = cli("version", "--devices")
    assert result.exit_code == 0
    assert "device /physical_device:CPU:0 (CPU)" in result.stdout and "built with CUDA" in result.stdout


def test_the_library_runs_exactly_what_the_command_runs(cli, tmp_path):
    from derivcli.command import RunOptions, run_command
    from derivcli.run import DerivativeRequest
    from derivcli.specs import parse_grid

    assert cli("hessian", SOFTPLUS, "--grid", "-1:1:7", "-o", tmp_path / "cli.csv").exit_code == 0
    warnings = []
    summary = run_command(RunOptions(SOFTPLUS, grid=[parse_grid("-1:1:7")], output=str(tmp_path / "lib.csv")),
                          DerivativeRequest(hessian=True), warn=warnings.append)
    assert (tmp_path / "lib.csv").read_bytes() == (tmp_path / "cli.csv").read_bytes()
    assert summary.rows == 49 and warnings == [] and summary.timings.rows == 49


# Messages that say what to do ------------------------------------------------------------------


def test_relu_warning_names_the_activation_and_the_right_layers(tmp_path, cli):
    import keras

    inputs = keras.Input((1,))
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    hidden = keras.layers.Dense(4, activation="relu")(hidden)
    keras.Model(inputs, keras.layers.Dense(1)(hidden)).save(tmp_path / "relu.keras")
    names = [layer.name for layer in keras.models.load_model(tmp_path / "relu.keras").layers[1:3]]
    result = cli("deriv", tmp_path / "relu.keras", "--at", "0.5", "-p", "x^2")
    assert f"layers {names[0]}, {names[1]} use relu, which is piecewise linear" in result.stderr
    inputs = keras.Input((1,))
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    hidden = keras.layers.Dense(4, activation="tanh")(hidden)
    mixed = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    mixed.save(tmp_path / "mixed.keras")
    relu_layer = keras.models.load_model(tmp_path / "mixed.keras").layers[1].name
    info = cli("info", tmp_path / "mixed.keras").stdout
    assert f"layer {relu_layer} uses relu" in info


@pytest.mark.parametrize(("args", "status", "fragments"), [
    (["grad", TANH, "--at", "0.5", "--custom-objects", "README.md"], 2, ["expected a Python file (.py)"]),
    (["grad", TANH, "--npz", "README.md"], 1, ["not a zip archive"]),
    (["deriv", SOFTPLUS, "--at", "1,2", "-p", "x0^"], 2, ["no power after ^ of x0"]),
    (["op", TANH, "--at", "1", "--expr", "u_x + u"], 2, ["unknown name 'u_x'", "add --output-names u"]),
    (["grad", TANH, "--at", "1", "--max-abs", "abc"], 2, ["--max-abs 'abc': give a number"]),
    (["check", TANH, "--at", "1", "--rtol", "x"], 2, ["--rtol 'x': give a number"]),
    (["grad", TANH, "--at", "1", "--delimiter", ";"], 2, ["--delimiter applies to --csv only"]),
])
def test_messages_say_what_to_do(cli, args, status, fragments):
    result = cli(*args)
    assert_one_line_error(result, status, *fragments)
    assert "allow_pickle" not in result.stderr


@pytest.mark.parametrize(("delimiter", "option"), [(";", ";"), ("\t", "tab"), ("|", "|")])
def test_a_csv_with_another_delimiter_is_recognised_and_read_with_delimiter(cli, tmp_path, delimiter, option):
    path = tmp_path / "p.csv"
    path.write_text(f"x0{delimiter}x1\n1{delimiter}2\n")
    shown = "\\t" if delimiter == "\t" else delimiter
    assert_one_line_error(cli("grad", SOFTPLUS, "--csv", path), 2, f"pass --delimiter '{shown}'")
    result = cli("grad", SOFTPLUS, "--csv", path, "--delimiter", option)
    assert result.exit_code == 0, result.stderr
    assert read_csv(result.stdout)["dy/dx1"][0] == pytest.approx(1.8633269, rel=1e-5)
    shard = cli("grad", SOFTPLUS, "--csv", path, "--delimiter", option, "--shard", "0/1", "-o", tmp_path / "s.csv")
    assert shard.exit_code == 0 and (tmp_path / "s.csv").read_text().count("\n") == 2


def test_weights_only_h5_and_a_lambda_that_keras_cannot_rebuild(tmp_path, cli):
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)])
    model.save_weights(tmp_path / "w.weights.h5")
    (tmp_path / "w.h5").write_bytes((tmp_path / "w.weights.h5").read_bytes())
    assert_one_line_error(cli("info", tmp_path / "w.h5"), 1, "holds weights only", "model.save('model.keras')")
    (tmp_path / "lambda_model.py").write_text(
        "import keras\nSCALE = 3.0\ninputs = keras.Input((1,))\n"
        "keras.Model(inputs, keras.layers.Lambda(lambda t: t * SCALE)(inputs)).save('lam.keras')\n")
    subprocess.run([sys.executable, "lambda_model.py"], cwd=tmp_path, check=True, capture_output=True)
    assert_one_line_error(cli("info", tmp_path / "lam.keras", "--unsafe"), 1, "specify the `output_shape`")
    assert_one_line_error(cli("info", tmp_path / "lam.keras"), 1, "pass --unsafe")


def test_doctor_names_the_layer_with_nan_weights_and_how_to_give_a_weight_a_gradient(tmp_path, cli):
    import keras

    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(keras.layers.Dense(3, name="hidden")(inputs)))
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel[0, 1] = np.nan
    model.get_layer("hidden").set_weights([kernel, bias])
    model.save(tmp_path / "nan.keras")
    result = cli("doctor", tmp_path / "nan.keras")
    assert result.exit_code == 3
    assert "layer hidden, weight kernel: 1 NaN/Inf value(s) in the weights" in result.stdout
    bump = cli("doctor", "sample_models/bump_condition_only.keras", "--custom-objects", "sample_models/bump_layer.py")
    assert "a smooth gate such as sigmoid" in bump.stdout
    smooth = cli("doctor", "sample_models/bump.keras", "--custom-objects", "sample_models/bump_layer.py").stdout
    assert "ok      smoothness  smooth: derivatives of every order are in general non-zero wherever" in smooth


def test_info_offers_the_output_layers_names(tmp_path, cli):
    import keras

    keras.Sequential([keras.Input((1,)), keras.layers.Dense(3, activation="tanh"),
                      keras.layers.Dense(1, name="u")]).save(tmp_path / "s.keras")
    text = cli("info", tmp_path / "s.keras").stdout
    assert "output  u " in text and "keras_tensor" not in text
    assert "hint: --output-names u" in text
    described = cli("info", tmp_path / "s.keras", "--format", "json").stdout
    assert '"suggested_output_names": [\n    "u"\n  ]' in described


def test_the_fast_exit_loses_no_output_and_keeps_the_status(tmp_path):
    """The installed command ends with os._exit once TensorFlow is loaded: everything is flushed first."""
    done = run_installed("eval", "sample_models/softplus_2d.keras", "--grid", "-1:1:400")
    assert done.returncode == 0
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 160_001 and lines[-1].startswith("1,1,")
    target = tmp_path / "g.csv"
    done = run_installed("grad", "sample_models/square_tanh.keras", "--grid", "-1:1:50", "--max-abs", "0.5",
                         "-o", str(target))
    assert done.returncode == 3 and done.stderr.decode().startswith("derivcli: error: max |dy/dx|")
    assert len(target.read_text().splitlines()) == 51
    done = subprocess.run([sys.executable, "-m", "derivcli", "grad", "sample_models/square_tanh.keras", "--at", "0.5"],
                          capture_output=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.decode().splitlines()[1].startswith("0.5,")
