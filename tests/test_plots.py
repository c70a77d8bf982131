"""`--plot` and `derivcli plot`: picture files, the data they draw, usage errors, terminal pictures."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from derivcli.writers import read_columns

from conftest import ROOT, SAMPLES, read_csv, run_in_pty
from test_errors import assert_one_line_error

TANH = SAMPLES / "square_tanh.keras"
SOFTPLUS = SAMPLES / "softplus_2d.keras"
PINN = SAMPLES / "heat_pinn.keras"
MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".svg": b"<?xml", ".pdf": b"%PDF-"}


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_each_format_is_a_valid_reproducible_file_beside_the_normal_output(cli, tmp_path, suffix):
    pictures = []
    for attempt in range(2):
        picture = tmp_path / f"p{attempt}{suffix}"
        result = cli("deriv", TANH, "--grid", "-1:1:41", "-p", "x", "-p", "x^2", "--plot", picture, "--format", "csv")
        assert result.exit_code == 0, result.stderr
        assert len(read_csv(result.stdout)["d2y/dx^2"]) == 41  # the table still goes to standard output
        pictures.append(picture.read_bytes())
    assert pictures[0].startswith(MAGIC[suffix])
    assert 5_000 < len(pictures[0]) < 500_000
    assert pictures[0] == pictures[1]  # no timestamps, no random ids
    if suffix == ".svg":
        assert b"</svg>" in pictures[0] and b"d2y/dx^2" in pictures[0]
    assert not list(tmp_path.glob(".*part"))  # written atomically: no temporary left


def test_curves_hold_the_computed_columns(cli, tmp_path):
    from derivcli.plots import PlotData, build_figure, choose_view

    result = tmp_path / "r.npz"
    assert cli("deriv", TANH, "--grid", "-1:1:41", "-p", "x", "-p", "x^2", "-o", result).exit_code == 0
    columns = read_columns(str(result))
    data = PlotData.from_columns(columns, ["x"], ["y", "dy/dx", "d2y/dx^2"])
    figure = build_figure([data], [choose_view(data, None, [])])
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert [p.get_title() for p in panels] == ["y", "dy/dx", "d2y/dx^2"]
    for panel, name in zip(panels, ["y", "dy/dx", "d2y/dx^2"]):
        line = panel.get_lines()[0]
        np.testing.assert_array_equal(line.get_xdata(), columns["x"])
        np.testing.assert_array_equal(line.get_ydata(), columns[name].astype(np.float64))
    assert panels[-1].get_xlabel() == "x"


def test_heatmaps_hold_the_grid_with_axes_colorbars_and_the_worst_point(tmp_path, cli):
    from derivcli.plots import PlotData, build_figure, choose_view

    result = tmp_path / "r.npz"
    run = cli("op", PINN, "--output-names", "u", "--grid", "t=0:1:11", "--grid", "x=-1:1:21",
              "--expr", "res=u_t - 0.1*u_xx", "--max-abs", "1", "-o", result)
    assert run.exit_code == 0, run.stderr
    columns = read_columns(str(result))
    data = PlotData.from_columns(columns, ["t", "x"], ["u", "res"], marked=["res"])
    figure = build_figure([data], [choose_view(data, None, [])])
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>" and axis.get_visible()]
    colorbars = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
    assert len(colorbars) == 2 and [p.get_title().split("\n")[0] for p in panels] == ["u", "res"]
    for panel, name in zip(panels, ["u", "res"]):
        assert (panel.get_xlabel(), panel.get_ylabel()) == ("t", "x")
        mesh = panel.collections[0]
        np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(21, 11), columns[name].T)
        # Both columns take both signs: a diverging map, centred at zero.
        bound = np.abs(columns[name]).max()
        assert mesh.get_cmap().name == "RdBu_r" and mesh.get_clim() == pytest.approx((-bound, bound))
    worst = np.unravel_index(np.argmax(np.abs(columns["res"])), (11, 21))
    marker = panels[1].get_lines()[0]
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (columns["t"][worst], columns["x"][worst])
    assert not marker.get_clip_on()  # a worst point on the edge is drawn whole
    assert f"max |res| = {np.abs(columns['res']).max():.4g}" in panels[1].get_title()
    assert not panels[0].get_lines()  # u is not gated: not marked


def test_three_axes_need_plot_axes_and_pin_the_others(cli, tmp_path, model_factory):
    _, path = model_factory("tanh", 3, 1)
    grid = ["--grid", "x0=-1:1:5", "--grid", "x1=0:1:4", "--grid", "x2=2:3:3"]
    assert_one_line_error(cli("eval", path, *grid, "--plot", tmp_path / "p.png"), 2, "varies along 3 axes", "--plot-axes")
    assert not (tmp_path / "p.png").exists()
    assert_one_line_error(cli("eval", path, *grid, "--plot", tmp_path / "p.png", "--plot-axes", "x0,q"), 2,
                          "'q' is not a grid axis")
    assert_one_line_error(cli("eval", path, *grid, "--plot", tmp_path / "p.png", "--plot-axes", "x0",
                              "--plot-at", "x0=1"), 2, "x0 is drawn")
    from derivcli.plots import PlotData, choose_view
    from derivcli.specs import parse_at

    result = tmp_path / "r.npz"
    assert cli("eval", path, *grid, "-o", result, "--plot", tmp_path / "p.png", "--plot-axes", "x0,x2",
               "--plot-at", "x1=0.7").exit_code == 0
    assert (tmp_path / "p.png").read_bytes().startswith(MAGIC[".png"])
    columns = read_columns(str(result))
    data = PlotData.from_columns(columns, ["x0", "x1", "x2"], ["y"])
    view = choose_view(data, ["x0", "x2"], [parse_at("x1=0.7")])
    assert view.note == "x1=0.666667"  # the nearest grid value
    np.testing.assert_array_equal(view.slice(columns["y"]), columns["y"][:, 2, :])
    assert choose_view(data, ["x2", "x0"], []).note == "x1=0 (its first value)"
    np.testing.assert_array_equal(choose_view(data, ["x2", "x0"], []).slice(columns["y"]), columns["y"][:, 0, :].T)


@pytest.mark.parametrize(("args", "status", "fragment"), [
    (["--at", "0.5", "--plot", "p.png", "--plot-at", "x=1"], 2, "--plot-at pins a grid's axes"),
    (["--at", "0.5", "--plot", "p.png", "--plot-axes", "q"], 2, "'q' is not an input or a result column"),
    (["--grid", "-1:1:5", "--plot", "p.txt"], 2, "name a .png, .svg or .pdf file"),
    (["--grid", "-1:1:5", "--plot", "p.png", "--shard", "0/2", "-o", "s.csv"], 2, "merge the shard files"),
    (["--grid", "0:0:1", "--plot", "p.png"], 2, "single point: nothing to plot"),
    (["--grid", "-1:1:5", "--plot", "p.png", "--plot-at", "0.5"], 2, "give NAME=VALUE"),
])
def test_plot_usage_errors(cli, tmp_path, monkeypatch, args, status, fragment):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("grad", TANH, *args), status, fragment)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the table's file


def test_plot_command_draws_saved_results_side_by_side(cli, tmp_path):
    from derivcli.plots import plot_results

    for name, model in (("relu", SAMPLES / "square_relu.keras"), ("tanh", TANH)):
        assert cli("deriv", model, "--grid", "-1:1:21", "-p", "x^2", "-q", "-o", tmp_path / f"{name}.npz").exit_code == 0
    picture = tmp_path / "both.svg"
    result = cli("plot", tmp_path / "relu.npz", tmp_path / "tanh.npz", "-o", picture, "--columns", "d2y/dx^2")
    assert result.exit_code == 0, result.stderr
    assert picture.read_bytes().startswith(MAGIC[".svg"])
    drawn = plot_results([str(tmp_path / "relu.npz"), str(tmp_path / "tanh.npz")], "-", ["d2y/dx^2"], None, [], False)
    assert [d.label for d, _ in drawn] == ["relu.npz", "tanh.npz"]
    np.testing.assert_array_equal(drawn[0][0].values["d2y/dx^2"], np.zeros(21, np.float32))  # ReLU: flat


def test_plot_command_errors(cli, tmp_path):
    assert cli("grad", TANH, "--at", "0.5", "-o", tmp_path / "points.npz").exit_code == 0
    assert cli("plot", tmp_path / "points.npz", "-o", tmp_path / "p.png").exit_code == 0  # points: a scatter
    (tmp_path / "p.png").unlink()
    assert cli("grad", TANH, "--grid", "-1:1:5", "--shard", "0/2", "-o", tmp_path / "s.npz").exit_code == 0
    assert_one_line_error(cli("plot", tmp_path / "s.npz", "-o", tmp_path / "p.png"), 1, "merge the shards first")
    assert cli("grad", TANH, "--grid", "-1:1:5", "-o", tmp_path / "g.npz").exit_code == 0
    assert_one_line_error(cli("plot", tmp_path / "g.npz", "-o", tmp_path / "p.png", "--columns", "dy/dq"), 2,
                          "'dy/dq' is not a column", "dy/dx")
    assert_one_line_error(cli("plot", tmp_path / "g.txt", "-o", tmp_path / "p.png"), 2, "saved as .npz, .h5")
    assert_one_line_error(cli("plot", tmp_path / "missing.npz", "-o", tmp_path / "p.png"), 1, "no such file")
    assert_one_line_error(cli("plot", tmp_path / "g.npz", "-o", tmp_path / "g.npz"), 2, "name a .png, .svg or .pdf")
    (tmp_path / "bad.npz").write_text("not a zip")
    result = cli("plot", tmp_path / "bad.npz", "-o", tmp_path / "p.png")
    assert_one_line_error(result, 1, "not a zip archive")
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object), grid_axes=np.array(["x"]))
    result = cli("plot", tmp_path / "objects.npz", "-o", tmp_path / "p.png")
    assert_one_line_error(result, 1, "holds arrays of Python objects")
    assert "allow_pickle" not in result.stderr
    assert_one_line_error(cli("eval", TANH, "--grid", "-1:1:5", "--plot-axes", "x"), 2, "add --plot FILE.png")
    assert not (tmp_path / "p.png").exists()


def test_terminal_plot_fits_the_terminal_on_standard_error(tmp_path):
    """`--plot -` with the table on a pipe: the picture goes to the terminal (standard error)."""
    status, shown, piped = run_in_pty("deriv", str(TANH), "--grid", "-1:1:101", "-p", "x^2", "--plot", "-",
                                      "--format", "csv", columns=60, lines=20, stdout_pipe=True)
    assert status == 0, shown
    assert len(read_csv(piped)["d2y/dx^2"]) == 101
    rows = [line for line in shown.replace("\r", "").split("\n") if line]
    assert rows[0].startswith("y: ") and any(line.startswith("d2y/dx^2: ") for line in rows)
    assert max(len(line) for line in rows) <= 60
    assert len(rows) <= 20
    assert any(ch in "".join(rows) for ch in "⠁⠂⠄⡀⣀⠉")  # Braille dots draw the curves


def test_terminal_plot_of_a_heatmap_on_standard_output_with_o(tmp_path):
    status, shown, _ = run_in_pty("op", str(PINN), "--output-names", "u", "--grid", "t=0:1:11", "--grid", "x=-1:1:21",
                                  "--expr", "res=u_t - 0.1*u_xx", "-o", str(tmp_path / "r.csv"), "--plot", "-",
                                  columns=50, lines=30)
    assert status == 0, shown
    rows = [line for line in shown.replace("\r", "").split("\n") if line]
    assert max(len(line) for line in rows) <= 50 and len(rows) <= 30
    assert any(set(line[11:]) <= set(" ░▒▓█") and line[11:].strip() for line in rows)
    assert "t 0 .. 1 (across)" in shown and " x=1 " in shown and " x=-1 " in shown  # both axes, by name


def test_plot_command_to_the_terminal(cli, tmp_path):
    assert cli("eval", SOFTPLUS, "--grid", "x0=-1:1:5", "--grid", "x1=0:1:4", "-o", tmp_path / "g.h5").exit_code == 0
    result = cli("plot", tmp_path / "g.h5", "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("y: ") and "x0 -1 .. 1 (across)" in result.stdout
    assert "      x1=1 " in result.stdout and "      x1=0 " in result.stdout


def test_matplotlib_is_imported_only_to_draw(tmp_path):
    code = ("import sys; from typer.testing import CliRunner; from derivcli.cli import app; "
            f"r = CliRunner().invoke(app, ['grad', {str(TANH)!r}, '--grid', '-1:1:5']); "
            "print(r.exit_code, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split() == ["0", "False"], result.stderr


def drawn_texts(figure):
    """(text, bounding box in pixels) of every text matplotlib's Agg renderer draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    drawn, original = [], Text.draw

    def draw(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip() and (self.axes is None or self.axes.get_visible()):
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    Text.draw = draw
    try:
        FigureCanvasAgg(figure).draw()
    finally:
        Text.draw = original
    return drawn


def overlapping(figure, gap: float = 2.0):
    """The pairs of drawn texts closer than `gap` pixels."""
    texts = drawn_texts(figure)
    return [(a, b) for i, (a, box_a) in enumerate(texts) for b, box_b in texts[i + 1:]
            if box_a.x0 < box_b.x1 + gap and box_b.x0 < box_a.x1 + gap
            and box_a.y0 < box_b.y1 + gap and box_b.y0 < box_a.y1 + gap]


@pytest.mark.parametrize("count", range(1, 13))
def test_no_text_overlaps_another_from_1_to_12_panels(count):
    """Heatmaps (signed and not, one marked, long titles), curves and scatters: matplotlib's renderer
    draws no two texts (titles, axis labels, tick labels, colorbar ticks) within 2 pixels of each other."""
    from derivcli.plots import PlotData, Style, View, build_figure, heatmap_columns

    t, x = np.linspace(0, 1, 21), np.linspace(-1, 1, 31)
    names = [f"d{k}y/dt^{k}" if k else "u" for k in range(count)]
    fields = {name: np.outer(np.sin(3 * t * (k + 1)), np.cos(x)) * 10.0 ** (k - 4) + (k % 2)
              for k, name in enumerate(names)}
    heatmaps = PlotData([("t", t), ("x", x)], fields, marked=names[-1:])
    figure = build_figure([heatmaps], [View([0, 1], {}, "")], Style(title="a title above every panel"))
    assert overlapping(figure) == []
    shown = [axis for axis in figure.axes if axis.get_visible() and axis.get_label() != "<colorbar>"]
    across = len({round(axis.get_position().x0, 3) for axis in shown})
    assert across == heatmap_columns(count) and len(shown) == count
    along = np.linspace(-1, 1, 401)  # ticks every 0.25 (-1.00 ... 1.00), as the README's relu_vs_tanh has
    curves = PlotData([("x", along)], {name: np.sin(along * (k + 1)) * 10.0 ** (k - 4) for k, name in enumerate(names)},
                      marked=names[:1])
    assert overlapping(build_figure([curves], [View([0], {}, "")])) == []
    assert overlapping(build_figure([curves, curves], [View([0], {}, "")] * 2)) == []  # two results side by side
    scatter = PlotData([("point", np.arange(21.0))], {name: field[:, 0] for name, field in fields.items()},
                       scatter=True)
    assert overlapping(build_figure([scatter], [View([0], {}, "")])) == []


def test_a_hessian_s_four_panels_are_two_by_two(cli, tmp_path):
    result = tmp_path / "h.npz"
    assert cli("hessian", SOFTPLUS, "--grid", "-1:1:9", "-o", result, "-q").exit_code == 0
    from derivcli.plots import build_figure, plot_results

    drawn = plot_results([str(result)], str(tmp_path / "h.png"), None, None, [], False)
    figure = build_figure([d for d, _ in drawn], [v for _, v in drawn])
    shown = [axis for axis in figure.axes if axis.get_visible() and axis.get_label() != "<colorbar>"]
    assert len(shown) == 4 and len({round(a.get_position().x0, 3) for a in shown}) == 2
    assert not [axis for axis in figure.axes if not axis.get_visible()]  # no empty slot


def test_dpi_title_and_colour_map_options(cli, tmp_path):
    from PIL import Image

    base = ["eval", SOFTPLUS, "--grid", "-1:1:9", "-q", "-o", tmp_path / "v.csv"]
    for dpi in (50, 100):
        assert cli(*base, "--plot", tmp_path / f"d{dpi}.png", "--plot-dpi", str(dpi)).exit_code == 0
    small, large = (Image.open(tmp_path / f"d{dpi}.png").size for dpi in (50, 100))
    assert large[0] == pytest.approx(2 * small[0], abs=2)
    titled = cli(*base, "--plot", tmp_path / "t.svg", "--plot-title", "Softplus net on [-1, 1]^2",
                 "--plot-cmap", "magma")
    assert titled.exit_code == 0, titled.stderr
    svg = (tmp_path / "t.svg").read_text()
    assert "Softplus net on [-1, 1]^2" in svg
    assert_one_line_error(cli(*base, "--plot", tmp_path / "x.png", "--plot-cmap", "viridiss"), 2,
                          "--plot-cmap 'viridiss': not a matplotlib colour map; for example viridis")
    assert_one_line_error(cli(*base, "--plot-title", "t"), 2, "--plot-title chooses what --plot draws")


def test_points_that_are_not_a_grid_have_pictures_too(cli, tmp_path):
    """--plot with --at, --csv and --npz points; derivcli plot of CSV, TSV, JSON, JSONL and NPZ results."""
    from derivcli.plots import load_result

    points = np.random.default_rng(3).uniform(-1, 1, (40, 2))
    np.savez(tmp_path / "points.npz", x=points)
    run = cli("grad", SOFTPLUS, "--npz", tmp_path / "points.npz", "-o", tmp_path / "g.npz",
              "--plot", tmp_path / "g.png", "--plot-axes", "x0")
    assert run.exit_code == 0, run.stderr and (tmp_path / "g.png").read_bytes().startswith(MAGIC[".png"])
    table = read_columns(str(tmp_path / "g.npz"))
    for suffix in (".csv", ".tsv", ".json", ".jsonl"):
        assert cli("grad", SOFTPLUS, "--npz", tmp_path / "points.npz", "-o", tmp_path / f"g{suffix}").exit_code == 0
        data, view = load_result(str(tmp_path / f"g{suffix}"), ["y", "dy/dx1"], False, ["x0"])
        assert data.scatter and view.drawn == [0] and list(data.values) == ["y", "dy/dx1"]
        np.testing.assert_allclose(data.axes[0][1], table["x0"], rtol=1e-7)
        np.testing.assert_allclose(data.values["dy/dx1"], table["dy/dx1"], rtol=1e-7)
        drawn = cli("plot", tmp_path / f"g{suffix}", "-o", tmp_path / f"p{suffix}.png")
        assert drawn.exit_code == 0, drawn.stderr
    # A grid written as CSV: two columns whose rows make a whole grid are heatmaps again.
    assert cli("eval", SOFTPLUS, "--grid", "x0=-1:1:5", "--grid", "x1=0:1:3", "-o", tmp_path / "grid.csv").exit_code == 0
    data, view = load_result(str(tmp_path / "grid.csv"), ["y"], False, ["x0", "x1"])
    assert view.drawn == [0, 1] and data.values["y"].shape == (5, 3)
    np.testing.assert_allclose(data.axes[1][1], [0, 0.5, 1])
    assert_one_line_error(cli("plot", tmp_path / "g.csv", "-o", tmp_path / "q.png", "--plot-axes", "x0,x1"), 2,
                          "the points are not a whole grid over x0 and x1")
    at = cli("eval", SOFTPLUS, "--at", "0,0", "--at", "0.5,0.5", "--plot", tmp_path / "at.png")
    assert at.exit_code == 0 and (tmp_path / "at.png").is_file()
    assert_one_line_error(cli("plot", tmp_path / "g.npz"), 2, "standard output is not a terminal: give -o FILE.png")


def test_plot_without_output_draws_on_the_terminal(cli, tmp_path):
    assert cli("eval", SOFTPLUS, "--grid", "-1:1:9", "-o", tmp_path / "v.npz").exit_code == 0
    status, shown, _ = run_in_pty("plot", str(tmp_path / "v.npz"), columns=80, lines=30)
    assert status == 0, shown
    lines = shown.replace("\r", "").splitlines()
    assert lines[0].startswith("y: ")
    assert lines[1].strip().startswith("x1=1 ") and any(line.strip().startswith("x1=-1 ") for line in lines)
    assert any("x0 -1 .. 1 (across)" in line for line in lines)
    assert any(line.strip().startswith("shades: ' '=") for line in lines)


def test_a_terminal_that_reports_0x0_gets_an_80x24_picture():
    """`script`, some CI runners and containers report 0 x 0: taken as 80 x 24, not as 8 x 3 characters."""
    status, shown, _ = run_in_pty("deriv", str(TANH), "--grid", "-1:1:101", "-p", "x^2", "--plot", "-", "-q",
                                  "--format", "csv", "-o", "/dev/null", columns=0, lines=0, env={"COLUMNS": "", "LINES": ""})
    assert status == 0, shown
    rows = [line for line in shown.replace("\r", "").split("\n") if line]
    assert max(len(line) for line in rows) == 80 and 18 <= len(rows) <= 24


def test_an_rgb_input_is_drawn_in_its_colours(cli, tmp_path):
    """On main at 755183a an RGB image was drawn as its channel mean on viridis. An image whose top half is pure
    green must show pure green pixels, which no colour map here (viridis, RdBu_r) has."""
    import keras
    from matplotlib.image import imread

    image = keras.Input((8, 8, 3), name="image")
    keras.Model(image, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(image))).save(tmp_path / "rgb.keras")
    pixels = np.zeros((1, 8, 8, 3), np.float32)
    pixels[:, :4, :, 1] = 1.0  # the top half green, the bottom half black
    np.savez(tmp_path / "image.npz", image=pixels)
    result = cli("grad", tmp_path / "rgb.keras", "--npz", tmp_path / "image.npz", "-o", tmp_path / "out.npz",
                 "--plot", tmp_path / "picture.png")
    assert result.exit_code == 0, result.stderr
    picture = imread(tmp_path / "picture.png")[..., :3]
    green = (picture[..., 1] > 0.9) & (picture[..., 0] < 0.1) & (picture[..., 2] < 0.1)
    assert green.sum() > 100
    terminal = cli("grad", tmp_path / "rgb.keras", "--npz", tmp_path / "image.npz", "-o", tmp_path / "again.npz",
                   "--plot", "-")
    assert terminal.exit_code == 0 and "x (RGB)" in terminal.stdout  # drawn by its brightness on a terminal
