"""`--summary`: the statistics of every value column, against NumPy over the full rows; merged shards."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLES, read_csv
from test_errors import assert_one_line_error

SOFTPLUS = SAMPLES / "softplus_2d.keras"


def numpy_summary(column: np.ndarray) -> list[float]:
    """count, nan, mean, std (ddof = 1, as pandas), mean_abs, rms, min, max, NaN left out."""
    kept = column[~np.isnan(column)]
    return [len(kept), int(np.isnan(column).sum()), kept.mean(), kept.std(ddof=1), np.abs(kept).mean(),
            np.sqrt((kept ** 2).mean()), kept.min(), kept.max()]


@pytest.mark.parametrize("command", [["grad"], ["hessian"], ["op", "--expr", "res=D(y, x0) - D(y, x1, x1)"],
                                      ["attribute", "--method", "input-x-gradient"]])
def test_the_summary_is_numpy_s_over_the_full_rows(cli, command):
    args = [command[0], SOFTPLUS, "--grid", "-1:1:37", *command[1:], "--batch-size", "100"]
    rows = read_csv(cli(*args, "-f", "csv").stdout)
    summary = cli(*args, "--summary", "-f", "csv")
    assert summary.exit_code == 0, summary.stderr
    table = read_csv(summary.stdout)
    names = [name for name in rows if name not in ("x0", "x1")]
    assert table["column"] == names
    for k, name in enumerate(names):
        got = [table[stat][k] for stat in ("count", "nan", "mean", "std", "mean_abs", "rms", "min", "max")]
        # The rows in CSV are float32's shortest spellings: read back to float32, they are the values summarized.
        exact = rows[name].astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(got, numpy_summary(exact), rtol=1e-12, atol=1e-15)


def test_nan_is_counted_and_left_out(cli, tmp_path):
    from derivcli.summary import Moments

    values = np.array([[1.0, np.nan], [2.0, 3.0], [np.nan, 5.0], [4.0, np.nan]])
    moments = Moments(["a", "b"])
    moments.update(values[:1])
    moments.update(values[1:])
    table = moments.table()
    np.testing.assert_allclose(table[0], numpy_summary(values[:, 0]), rtol=1e-15)
    np.testing.assert_allclose(table[1], numpy_summary(values[:, 1]), rtol=1e-15)
    assert table[0][1] == 1 and table[1][1] == 2
    one = Moments(["c"])
    one.update(np.array([[7.0]]))
    assert one.table()[0][0] == 1 and np.isnan(one.table()[0][3])  # std of one value: NaN, as pandas


@pytest.mark.parametrize("suffix", [".csv", ".json", ".npz", ".h5"])
def test_merged_summary_shards_are_the_whole_run_s_summary(cli, tmp_path, suffix):
    base = ["grad", SOFTPLUS, "--grid", "-1:1:41", "--summary", "--batch-size", "64"]
    assert cli(*base, "-o", tmp_path / f"whole{suffix}").exit_code == 0
    for k in range(3):
        assert cli(*base, "--shard", f"{k}/3", "-o", tmp_path / f"part{k}{suffix}").exit_code == 0
    merged = cli("merge", *[tmp_path / f"part{k}{suffix}" for k in (2, 0, 1)], "-o", tmp_path / f"merged{suffix}")
    assert merged.exit_code == 0, merged.stderr
    from derivcli.plots import _read_result

    whole, joined = (_read_result(str(tmp_path / f"{name}{suffix}"), suffix) for name in ("whole", "merged"))
    assert list(whole["column"]) == list(joined["column"]) == ["y", "dy/dx0", "dy/dx1"]
    for stat in ("count", "nan", "mean", "std", "mean_abs", "rms", "min", "max"):
        # Chan's update folds the shards in another grouping than the batches: round-off apart.
        np.testing.assert_allclose(np.asarray(joined[stat], float), np.asarray(whole[stat], float), rtol=1e-13)
    assert_one_line_error(cli("merge", tmp_path / f"part0{suffix}", tmp_path / f"part1{suffix}",
                              "-o", tmp_path / f"short{suffix}"), 1, "1 shard(s) missing (2/3)")


def test_summary_plot_is_a_bar_chart_of_mean_absolute_derivatives(cli, tmp_path):
    """--summary --plot FILE: per output, a bar per input of mean |dy/dx_i|, largest at the top, the std as a line."""
    from derivcli.summary import Moments, bar_chart

    args = ["grad", SOFTPLUS, "--grid", "-1:1:21", "--summary", "-f", "csv"]
    drawn = cli(*args, "--plot", tmp_path / "bars.png", "-q")
    assert drawn.exit_code == 0, drawn.stderr
    assert (tmp_path / "bars.png").read_bytes().startswith(b"\x89PNG")
    table = read_csv(drawn.stdout)
    moments = Moments(table["column"])
    rows = read_csv(cli("grad", SOFTPLUS, "--grid", "-1:1:21", "-f", "csv").stdout)
    moments.update(np.stack([rows[name].astype(np.float32).astype(np.float64) for name in table["column"]], 1))
    from derivcli.plots import Style

    figure = bar_chart(moments, [(1, "y", "x0"), (2, "y", "x1")], Style())
    (panel,) = figure.axes
    widths = [patch.get_width() for patch in panel.patches]
    labels = [tick.get_text() for tick in panel.get_yticklabels()]
    expected = {"x0": table["mean_abs"][1], "x1": table["mean_abs"][2]}
    assert widths == sorted(widths)  # barh draws bottom up: the largest is on top
    np.testing.assert_allclose(widths, [expected[label] for label in labels], rtol=1e-12)
    assert_one_line_error(cli(*args, "--plot", "-"), 2, "--summary --plot draws a bar chart into a file")


def test_index_columns_are_not_summarized(cli):
    """On main at 755183a `--target top --summary` averaged the class index `target`."""
    args = ["grad", SAMPLES / "bars_cnn.keras", "--npz", SAMPLES / "bars.npz", "--target", "top", "-f", "csv"]
    rows = read_csv(cli(*args).stdout)
    summary = cli(*args, "--summary")
    assert summary.exit_code == 0, summary.stderr
    table = read_csv(summary.stdout)
    assert "target" not in table["column"] and table["column"][0] == "y"
    np.testing.assert_allclose(table["mean"][0], np.mean(rows["y"].astype(np.float32)), rtol=1e-6)
