"""`--shard K/N` and `derivcli merge`: the merged shards are exactly the unsharded output."""

from __future__ import annotations

import numpy as np
import pytest

from derivcli.writers import read_columns

from test_errors import assert_one_line_error

MODEL = "sample_models/softplus_2d.keras"


def run_sharded(cli, tmp_path, suffix, source_args, shards=3):
    whole = tmp_path / f"whole{suffix}"
    base = ["hessian", MODEL, *source_args, "--batch-size", "7"]
    assert cli(*base, "-o", whole).exit_code == 0
    parts = []
    for k in range(shards):
        part = tmp_path / f"part{k}{suffix}"
        result = cli(*base, "--shard", f"{k}/{shards}", "-o", part)
        assert result.exit_code == 0, result.stderr
        parts.append(part)
    merged = tmp_path / f"merged{suffix}"
    result = cli("merge", *parts, "-o", merged)
    assert result.exit_code == 0, result.stderr
    return whole, merged


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
@pytest.mark.parametrize("source", ["grid", "csv"])
def test_merged_text_shards_are_byte_identical(cli, tmp_path, suffix, source):
    if source == "grid":
        args = ["--grid", "x0=-1:1:5", "--grid", "x1=0:1:11"]
    else:
        data = tmp_path / "points.csv"
        # Blank lines too: they must neither shift nor drop rows between shards.
        data.write_text("id,x0,x1\n" + "".join(f"r{i},{i / 10},{-i / 7}\n" + "\n" * (i % 9 == 0) for i in range(40)))
        args = ["--csv", data]
    whole, merged = run_sharded(cli, tmp_path, suffix, args)
    assert merged.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_merged_binary_shards_equal_the_grid_output(cli, tmp_path, suffix):
    whole, merged = run_sharded(cli, tmp_path, suffix, ["--grid", "x0=-1:1:5", "--grid", "x1=0:1:11"], shards=4)
    expected, actual = read_columns(str(whole)), read_columns(str(merged))
    assert list(actual) == list(expected)
    for name, array in expected.items():
        assert actual[name].shape == array.shape == ((5, 11) if name != "grid_axes" else (2,))
        np.testing.assert_array_equal(actual[name], array)


def test_more_shards_than_batches_gives_empty_shards(cli, tmp_path):
    whole, merged = run_sharded(cli, tmp_path, ".csv", ["--at", "1,2", "--at", "3,4"], shards=3)
    assert merged.read_bytes() == whole.read_bytes()


def test_shard_errors(cli, tmp_path):
    assert_one_line_error(cli("grad", MODEL, "--at", "1,2", "--shard", "3/3"), 2, "0 <= K < N")
    assert_one_line_error(cli("grad", MODEL, "--csv", "-", "--shard", "0/2", input="x0,x1\n1,2\n"), 2, "not standard input")
    parts = []
    for k in (0, 2):
        part = tmp_path / f"p{k}.npz"
        cli("grad", MODEL, "--grid", "-1:1:9", "--batch-size", "10", "--shard", f"{k}/3", "-o", part)
        parts.append(part)
    assert_one_line_error(cli("merge", *parts, "-o", tmp_path / "m.npz"), 1, "give all of 0/3 to 2/3")
    assert not (tmp_path / "m.npz").exists()
    assert_one_line_error(cli("merge", parts[0], tmp_path / "x.csv"), 2, "share one extension")


def test_a_batch_that_runs_out_of_memory_is_split_not_lost():
    import tensorflow as tf

    from derivcli.run import run_in_halves

    calls = []

    def kernel(points):
        calls.append(len(points))
        if len(points) > 3:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM")
        return points * 2

    points = np.arange(10.0)[:, None]
    np.testing.assert_array_equal(run_in_halves(kernel, points), points * 2)
    assert max(n for n in calls if n <= 3) <= 3 and sum(n for n in calls if n <= 3) == 10


def test_batch_size_auto_and_bad_values(cli):
    auto = cli("grad", MODEL, "--grid", "-1:1:5", "--batch-size", "auto")
    fixed = cli("grad", MODEL, "--grid", "-1:1:5", "--batch-size", "3")
    assert auto.exit_code == fixed.exit_code == 0
    assert auto.stdout.splitlines()[0] == fixed.stdout.splitlines()[0]
    assert_one_line_error(cli("grad", MODEL, "--at", "1,2", "--batch-size", "0"), 2, "--batch-size '0'")
    assert_one_line_error(cli("grad", MODEL, "--at", "1,2", "--batch-size", "lots"), 2, "positive whole number or auto")
