"""`--shard K/N` and `derivcli merge`: the merged shards are exactly the unsharded output."""

from __future__ import annotations

import os

import numpy as np
import pytest

from derivcli.errors import RunError
from derivcli.writers import read_columns

from conftest import read_csv
from test_errors import assert_one_line_error

MODEL = "sample_models/softplus_2d.keras"


GRID = ["--grid", "x0=-1:1:5", "--grid", "x1=0:1:11"]  # 55 points


def run_sharded(cli, tmp_path, suffix, source_args, shards=3, batch_size=7, command="hessian"):
    whole = tmp_path / f"whole{suffix}"
    base = [command, MODEL, *source_args, "--batch-size", batch_size]
    assert cli(*base, "-o", whole).exit_code == 0
    parts = []
    for k in range(shards):
        part = tmp_path / f"part{k}{suffix}"
        result = cli(*base, "--shard", f"{k}/{shards}", "-o", part)
        assert result.exit_code == 0, result.stderr
        parts.append(part)
    merged = tmp_path / f"merged{suffix}"
    result = cli("merge", *reversed(parts), "-o", merged)  # any order: merge puts them in K order
    assert result.exit_code == 0, result.stderr
    return whole, merged, parts


def points_csv(tmp_path, rows=40):
    data = tmp_path / "points.csv"
    # Blank lines too: they must neither shift nor drop rows between shards.
    data.write_text("id,x0,x1\n" + "".join(f"r{i},{i / 10},{-i / 7}\n" + "\n" * (i % 9 == 0) for i in range(rows)))
    return data


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
@pytest.mark.parametrize("source", ["grid", "csv"])
def test_merged_text_shards_are_byte_identical_when_batches_align(cli, tmp_path, suffix, source):
    # Every shard boundary K*M/N is a multiple of the batch size: each batch is the unsharded run's.
    if source == "grid":
        args, shards, batch = GRID, 5, 11  # boundaries 0, 11, 22, 33, 44
    else:
        args, shards, batch = ["--csv", points_csv(tmp_path)], 4, 10  # 0, 10, 20, 30
    whole, merged, _ = run_sharded(cli, tmp_path, suffix, args, shards, batch)
    assert merged.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("source", ["grid", "csv"])
def test_a_long_run_under_xla_is_the_same_bits_every_time_and_its_shards_merge_to_it(cli, tmp_path, monkeypatch, source):
    """A long run compiles XLA (`run.make_kernel`): a grid's Hessian from its second batch, a CSV
    (whose size is not known in advance) from its batch past the threshold. Which
    batches use it depends only on their place in the whole run, so two runs write the same bytes,
    and shards cut at batch boundaries merge to those bytes too."""
    from derivcli import run
    from derivcli.engine.tape import DerivativeKernel

    # Hessians of 20 points and more count as long runs: the grid's 55 from batch 1, the CSV's 40 from batch 2.
    monkeypatch.setattr(run, "XLA_POINTS_TIMES_ORDER", 40)
    compiled = []
    original = DerivativeKernel.__call__

    def spy(self, coordinates, batch_index=None):
        values = original(self, coordinates, batch_index)
        compiled.append((batch_index, self.xla is not None))
        return values

    monkeypatch.setattr(DerivativeKernel, "__call__", spy)
    args, shards, batch = (GRID, 5, 11) if source == "grid" else (["--csv", points_csv(tmp_path)], 4, 10)
    whole, merged, _ = run_sharded(cli, tmp_path, ".csv", args, shards, batch)
    first_xla = 1 if source == "grid" else 2
    assert all(used == (index >= first_xla) for index, used in compiled), compiled
    again = tmp_path / "again.csv"
    assert cli("hessian", MODEL, *args, "--batch-size", batch, "-o", again).exit_code == 0
    assert merged.read_bytes() == whole.read_bytes() == again.read_bytes()
    monkeypatch.setattr(run, "XLA_POINTS_TIMES_ORDER", 10**12)  # the same run without XLA
    plain = tmp_path / "plain.csv"
    assert cli("hessian", MODEL, *args, "--batch-size", batch, "-o", plain).exit_code == 0
    expected, actual = read_csv(plain.read_text()), read_csv(whole.read_text())
    for name in ("y", "d2y/dx0^2", "d2y/dx0dx1", "d2y/dx1^2"):  # float32 round-off, as between batch sizes
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6 * np.abs(expected[name]).max())


def test_a_kernel_xla_cannot_compile_runs_its_plain_graph(monkeypatch):
    """XLA refuses some kernels (it cannot differentiate its own gradients: an LSTM's fourth
    derivatives by tapes reach an XlaDynamicUpdateSlice). The run goes on with the plain graph,
    and does not try XLA again."""
    import tensorflow as tf

    from derivcli.engine.tape import DerivativeKernel
    from derivcli.models import load_model
    from derivcli.run import DerivativeRequest, make_kernel, plan

    attempts = []

    def refuse(self):
        attempts.append(1)
        raise tf.errors.InvalidArgumentError(None, None, "Detected unsupported operations when trying to compile")

    model = load_model(MODEL)
    points = np.random.default_rng(0).uniform(-1, 1, (8, 2)).astype(np.float32)
    planned = plan(model, DerivativeRequest(hessian=True))
    plain = make_kernel(model, planned)(points)
    kernel = make_kernel(model, planned, points=10**9, batch_size=8)
    monkeypatch.setattr(DerivativeKernel, "_compiled_xla", refuse)
    for index in range(4):
        np.testing.assert_array_equal(kernel(points, index), plain)
    assert len(attempts) == 1 and kernel.xla is False


@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("source", ["grid", "csv", "npz"])
def test_merged_shards_are_the_whole_runs_bits_when_batches_do_not_align(cli, tmp_path, monkeypatch, source, xla):
    """A shard's first and last batch are parts of the unsharded run's batches (here down to one point).
    They are computed at their places in a batch of the unsharded run's size (`run.in_the_runs_batch`),
    under XLA where the unsharded run's batch is, so the merged file is the unsharded file, byte for byte."""
    from derivcli import run

    if xla:  # Hessians of 20 points and more count as long runs: XLA from the grid's batch 1, the CSV's batch 3
        monkeypatch.setattr(run, "XLA_POINTS_TIMES_ORDER", 40)
    if source == "grid":
        args = GRID
    elif source == "csv":
        args = ["--csv", points_csv(tmp_path)]
    else:
        np.savez(tmp_path / "points.npz", x=np.random.default_rng(0).uniform(-1, 1, (55, 2)))
        args = ["--npz", tmp_path / "points.npz"]
    whole, merged, _ = run_sharded(cli, tmp_path, ".csv", args, shards=3, batch_size=7)
    assert merged.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_merged_binary_shards_equal_the_grid_output(cli, tmp_path, suffix):
    whole, merged, _ = run_sharded(cli, tmp_path, suffix, GRID, shards=5, batch_size=11)
    expected, actual = read_columns(str(whole)), read_columns(str(merged))
    assert list(actual) == list(expected)
    for name, array in expected.items():
        assert actual[name].shape == array.shape == ((5, 11) if name != "grid_axes" else (2,))
        np.testing.assert_array_equal(actual[name], array)


@pytest.mark.parametrize(("total", "count"), [(m, n) for m in (0, 1, 2, 7, 49, 55, 2001, 4097) for n in (1, 2, 3, 8, 50, 64)])
def test_shards_are_balanced_and_cover_every_point_once(total, count):
    from derivcli.points import AtSource, ShardSource
    from derivcli.specs import AtPoint

    source = AtSource([AtPoint((float(i), 0.0), None) for i in range(total)], ["x0", "x1"])
    seen = []
    for k in range(count):
        shard = ShardSource(source, (k, count), 4)
        rows = np.concatenate([b.coordinates[:, 0] for b in shard.batches(4)] or [np.zeros(0)])
        assert len(rows) == shard.total in (total // count, -(-total // count))
        seen.extend(rows)
    assert seen == list(range(total))


def test_the_readme_example_gives_every_shard_its_share(cli, tmp_path):
    # The README's own: 2001 points in 8 shards used to give all of them to shard 7.
    sizes = []
    for k in range(3):
        result = cli("eval", MODEL, "--grid", "x0=-3:3:49", "--grid", "x1=0:0:1", "--shard", f"{k}/3", "-o", tmp_path / f"p{k}.csv")
        assert result.exit_code == 0, result.stderr
        sizes.append(len((tmp_path / f"p{k}.csv").read_text().splitlines()) - 1)
    assert sizes == [16, 16, 17]


def test_more_shards_than_points_gives_empty_shards(cli, tmp_path):
    whole, merged, parts = run_sharded(cli, tmp_path, ".csv", ["--at", "1,2", "--at", "3,4"], shards=3, batch_size=1)
    assert merged.read_bytes() == whole.read_bytes()
    assert [len(p.read_text().splitlines()) - 1 for p in parts] == [0, 1, 1]


def test_a_shard_of_a_grid_starts_at_its_points(monkeypatch):
    """Index arithmetic: the last shard of 10^10 points never makes the points before it."""
    from derivcli.points import GridSource, ShardSource
    from derivcli.specs import parse_grid

    def refuse(*args):
        raise AssertionError("a shard iterated the whole grid")

    monkeypatch.setattr(GridSource, "batches", refuse)
    grid = GridSource([parse_grid("-1:1:100000")], ["x0", "x1"])
    shard = ShardSource(grid, (999, 1000), 4096)
    first = next(iter(shard.batches(4096)))
    start = 999 * 10**10 // 1000
    assert len(first.coordinates) == 4096 - start % 4096  # ends where the unsharded run's batch ends
    np.testing.assert_array_equal(first.coordinates[0], [np.linspace(-1, 1, 100000)[start // 100000],
                                                         np.linspace(-1, 1, 100000)[start % 100000]])


def test_a_shard_of_an_npz_reads_only_its_rows(tmp_path):
    from derivcli.points import NpzSource, ShardSource

    points = np.random.default_rng(1).uniform(-1, 1, (200_000, 2))
    np.savez(tmp_path / "p.npz", x=points)
    source = NpzSource(str(tmp_path / "p.npz"), ["x0", "x1"])
    read = []
    handle = source.archive.fp
    original = handle.read

    def counting(size=-1):
        data = original(size)
        read.append(len(data))
        return data

    handle.read = counting
    shard = ShardSource(source, (9, 10), 4096)
    rows = np.concatenate([b.coordinates for b in shard.batches(4096)])
    np.testing.assert_array_equal(rows, points[180_000:])
    assert sum(read) <= 20_000 * 16 + 30 * len(read)  # its rows, and a zip header per read


def test_a_shard_of_an_npz_of_columns_and_of_compressed_or_fortran_arrays(tmp_path):
    from derivcli.points import NpzSource, ShardSource

    points = np.random.default_rng(2).uniform(-1, 1, (1000, 2))
    np.savez_compressed(tmp_path / "c.npz", x0=points[:, 0].astype(np.float32), x1=points[:, 1])
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(points))
    for name, expected in (("c.npz", np.stack([points[:, 0].astype(np.float32), points[:, 1]], 1)), ("f.npz", points)):
        shard = ShardSource(NpzSource(str(tmp_path / name), ["x0", "x1"]), (2, 3), 100)
        np.testing.assert_array_equal(np.concatenate([b.coordinates for b in shard.batches(100)]), expected[666:])


def test_a_shard_of_a_csv_parses_only_its_rows(tmp_path, monkeypatch):
    """One byte scan finds the shard's first row; only its rows are parsed, and errors name the
    file's real line numbers. A bad row in another shard is not this shard's business."""
    from derivcli.points import CsvSource, open_source

    path = tmp_path / "p.csv"
    lines = ["x0,x1"] + [f"{i},{-i}" for i in range(30_000)]
    lines[20_001] = "oops,1"  # data row 20000, in shard 2 of 3 (line 20002 of the file)
    lines.insert(5, "")  # a blank line and a line of blank cells move the lines, not the rows
    lines.insert(9, " , ")
    path.write_text("\n".join(lines) + "\n")
    parsed = []
    original = CsvSource._parse_plain

    def counting(self, chunk, first_line, count):
        batch = original(self, chunk, first_line, count)
        parsed.append(0 if batch is None else len(batch.coordinates))
        return batch

    monkeypatch.setattr(CsvSource, "_parse_plain", counting)
    shard = open_source(["x0", "x1"], csv_path=str(path), shard=(1, 3), batch_size=4096)
    rows = np.concatenate([b.coordinates for b in shard.batches(4096)])
    np.testing.assert_array_equal(rows[:, 0], np.arange(10_000, 20_000))
    assert sum(parsed) == 10_000
    shard = open_source(["x0", "x1"], csv_path=str(path), shard=(2, 3), batch_size=4096)
    with pytest.raises(RunError, match=r"row 20004, column 'x0': 'oops' is not a number"):
        list(shard.batches(4096))


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_a_shard_of_a_quoted_or_odd_csv_falls_back_to_reading_from_the_start(tmp_path, shards):
    from derivcli.points import open_source

    path = tmp_path / "q.csv"
    # A quoted cell with a line break, non-ASCII blanks, CRLF line ends and a BOM.
    body = ["\ufeffid,x0,x1", '"a\nb",1,2'] + [f"r{i},{i},{i}" for i in range(2, 40)] + ["\u00a0,\u2028,", "z,40,40"]
    path.write_bytes("\r\n".join(body).encode())
    seen = []
    for k in range(shards):
        source = open_source(["x0", "x1"], csv_path=str(path), shard=(k, shards), batch_size=4)
        seen += [cell for b in source.batches(4) for cell in b.passthrough[0]]
    assert seen == ["a\nb"] + [f"r{i}" for i in range(2, 40)] + ["z"]
    plain = tmp_path / "n.csv"
    plain.write_bytes("\r\n".join(b.replace('"a\nb"', "a") for b in body).encode())
    for k in range(shards):
        source = open_source(["x0", "x1"], csv_path=str(plain), shard=(k, shards), batch_size=4)
        assert source.source.row_index is not None  # no quotes: the byte scan
        seen[k:k] = []
    got = [cell for k in range(shards)
           for b in open_source(["x0", "x1"], csv_path=str(plain), shard=(k, shards), batch_size=4).batches(4)
           for cell in b.passthrough[0]]
    assert got == ["a"] + [f"r{i}" for i in range(2, 40)] + ["z"]


def test_shard_of_a_pipe_is_refused(cli, tmp_path):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    assert_one_line_error(cli("grad", MODEL, "--csv", fifo, "--shard", "1/4"), 2, "regular file", "pipe")


@pytest.mark.parametrize(("environment", "given", "expected"), [
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, "auto", (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "17"}, "auto", (2, 8)),
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "12",
      "SLURM_ARRAY_TASK_STEP": "4"}, "auto", (2, 4)),
    ({"JOB_COMPLETION_INDEX": "5"}, "auto/6", (5, 6)),
    ({"JOB_COMPLETION_INDEX": "5", "DERIVCLI_SHARD_COUNT": "6"}, "auto", (5, 6)),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "2"}, "auto", (0, 2)),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "1"}, "AUTO/2", (1, 2)),
])
def test_shard_auto_reads_the_scheduler(environment, given, expected):
    from derivcli.shards import parse_shard_option

    assert parse_shard_option(given, environment) == expected


@pytest.mark.parametrize(("environment", "given", "fragment"), [
    ({}, "auto", "not in an array job"),
    ({"JOB_COMPLETION_INDEX": "5"}, "auto", "gives K but not N"),
    ({"JOB_COMPLETION_INDEX": "5"}, "auto/5", "not below the 5 tasks"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, "auto/4", "runs 8 tasks"),
    ({"SLURM_ARRAY_TASK_ID": "x"}, "auto", "not a whole number"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MAX": "12", "SLURM_ARRAY_TASK_STEP": "4"}, "auto", "not on the array's range"),
    ({}, "auto/0", "auto/N with N >= 1"),
])
def test_shard_auto_errors(environment, given, fragment):
    from derivcli.errors import UsageError
    from derivcli.shards import parse_shard_option

    with pytest.raises(UsageError, match=fragment):
        parse_shard_option(given, environment)


def test_shard_auto_on_the_command_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    result = cli("eval", MODEL, "--grid", "-1:1:3", "--shard", "auto", "-o", tmp_path / "p1.csv")
    assert result.exit_code == 0, result.stderr
    assert len((tmp_path / "p1.csv").read_text().splitlines()) == 1 + 3
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name)
    assert_one_line_error(cli("eval", MODEL, "--grid", "-1:1:3", "--shard", "auto"), 2, "SLURM_ARRAY_TASK_ID")


SUFFIXES = [".csv", ".tsv", ".json", ".jsonl", ".npz", ".h5"]


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """Shards 0-3 of 4 in every format, and shard 1/4 of another run."""
    from typer.testing import CliRunner

    from derivcli.cli import app

    folder = tmp_path_factory.mktemp("shards")
    runner = CliRunner()
    for suffix in SUFFIXES:
        for k in range(4):
            # 25 points: shard boundaries 0, 6, 12, 18 fall on batch boundaries, so shards merge bit for bit.
            result = runner.invoke(app, ["grad", MODEL, "--grid", "-1:1:5", "--batch-size", "6", "--shard", f"{k}/4",
                                         "-o", str(folder / f"part{k}{suffix}")])
            assert result.exit_code == 0, result.stderr
        runner.invoke(app, ["grad", MODEL, "--grid", "-1:1:6", "--shard", "1/4", "-o", str(folder / f"other1{suffix}")])
        runner.invoke(app, ["grad", MODEL, "--grid", "-1:1:5", "--shard", "1/5", "-o", str(folder / f"five1{suffix}")])
        runner.invoke(app, ["grad", MODEL, "--grid", "-1:1:5", "--batch-size", "6", "--shard", "1/4", "--dtype",
                            "float64", "-o", str(folder / f"float64{suffix}")])
    return folder


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("names", "fragments"), [
    (["part0", "part1", "part3"], ["1 shard(s) missing (2/4)", "give all of 0/4 to 3/4"]),
    (["part0"], ["3 shard(s) missing (1/4, 2/4, 3/4)"]),
    (["part0", "part1", "part1", "part2", "part3"], ["shard 1/4 is given twice"]),
    (["part0", "other1", "part2", "part3"], ["from another run", ": other points;"]),
    (["part0", "float64", "part2", "part3"], ["from another run", ": another --dtype;"]),
    (["part0", "five1", "part2", "part3"], ["share N"]),
])
def test_merge_refuses_a_bad_set_in_every_format(cli, shard_sets, tmp_path, suffix, names, fragments):
    paths = [shard_sets / f"{name}{suffix}" for name in names]
    target = tmp_path / f"merged{suffix}"
    assert_one_line_error(cli("merge", *paths, "-o", target), 1, *fragments)
    assert not target.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_merge_orders_the_shards_itself(cli, shard_sets, tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    assert cli("grad", MODEL, "--grid", "-1:1:5", "--batch-size", "6", "-o", whole).exit_code == 0
    merged = tmp_path / f"merged{suffix}"
    parts = [shard_sets / f"part{k}{suffix}" for k in (2, 0, 3, 1)]
    assert cli("merge", *parts, "-o", merged).exit_code == 0
    if suffix in (".npz", ".h5"):
        expected, actual = read_columns(str(whole)), read_columns(str(merged))
        assert list(actual) == list(expected)
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name])
    else:
        assert merged.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_merge_refuses_a_text_shard_without_its_record_or_changed_since(cli, shard_sets, tmp_path, suffix):
    import shutil

    for k in range(4):
        shutil.copy(shard_sets / f"part{k}{suffix}", tmp_path / f"part{k}{suffix}")
        shutil.copy(shard_sets / f"part{k}{suffix}.shard", tmp_path / f"part{k}{suffix}.shard")
    parts = [tmp_path / f"part{k}{suffix}" for k in range(4)]
    with open(parts[2], "a") as handle:
        handle.write(handle.name and "\n")
    assert_one_line_error(cli("merge", *parts), 1, f"part2{suffix} is not the file shard 2/4 wrote")
    (tmp_path / f"part2{suffix}.shard").unlink()
    assert_one_line_error(cli("merge", *parts), 1, f"part2{suffix}.shard is missing")


def test_merge_of_shards_globbed_past_ten(cli, tmp_path):
    """A shell glob puts part10 before part2; merge restores K order."""
    for k in range(12):
        assert cli("eval", MODEL, "--grid", "-1:1:5", "--shard", f"{k}/12", "-o", tmp_path / f"part{k}.csv").exit_code == 0
    globbed = sorted(tmp_path.glob("part*.csv"))
    assert globbed[2].name == "part10.csv"
    merged = cli("merge", *globbed)
    whole = cli("eval", MODEL, "--grid", "-1:1:5", "--format", "csv")
    assert [line.split(",")[:2] for line in merged.stdout.splitlines()] == [line.split(",")[:2] for line in whole.stdout.splitlines()]


def test_shard_errors(cli, tmp_path):
    assert_one_line_error(cli("grad", MODEL, "--at", "1,2", "--shard", "3/3"), 2, "0 <= K < N")
    assert_one_line_error(cli("grad", MODEL, "--csv", "-", "--shard", "0/2", input="x0,x1\n1,2\n"), 2, "not standard input")
    assert_one_line_error(cli("merge", tmp_path / "p.npz", tmp_path / "x.csv"), 2, "share one extension")
    for k in range(2):
        assert cli("grad", MODEL, "--grid", "-1:1:3", "--shard", f"{k}/2", "-o", tmp_path / f"p{k}.csv").exit_code == 0
    assert_one_line_error(cli("merge", tmp_path / "p0.csv", tmp_path / "p1.csv", "-o", tmp_path / "mix.npz"), 2,
                          "the shards are CSV, and -o", "write -o", "mix.csv")
    result = cli("grad", MODEL, "--at", "1,2", "--shard", "0/2", "--format", "csv")
    assert result.exit_code == 0 and "write each shard with -o FILE" in result.stderr


def test_a_batch_that_runs_out_of_memory_is_split_not_lost():
    import tensorflow as tf

    from derivcli.run import run_in_halves

    calls = []

    def kernel(points, batch_index):
        calls.append(len(points))
        if len(points) > 3:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM")
        return points * 2

    points = np.arange(10.0)[:, None]
    np.testing.assert_array_equal(run_in_halves(kernel, points, 0), points * 2)
    assert max(n for n in calls if n <= 3) <= 3 and sum(n for n in calls if n <= 3) == 10


def test_batch_size_auto_and_bad_values(cli):
    auto = cli("grad", MODEL, "--grid", "-1:1:5", "--batch-size", "auto")
    fixed = cli("grad", MODEL, "--grid", "-1:1:5", "--batch-size", "3")
    assert auto.exit_code == fixed.exit_code == 0
    assert auto.stdout.splitlines()[0] == fixed.stdout.splitlines()[0]
    assert_one_line_error(cli("grad", MODEL, "--at", "1,2", "--batch-size", "0"), 2, "--batch-size '0'")
    assert_one_line_error(cli("grad", MODEL, "--at", "1,2", "--batch-size", "lots"), 2, "positive whole number or auto")


def test_the_automatic_batch_size_does_not_follow_every_change_of_free_memory(monkeypatch):
    """The batch size decides how BLAS blocks its sums: one that followed the memory available to the
    byte would change a result's last bits between two runs of one command. It is a power of two."""
    from derivcli import run
    from derivcli.models import load_model

    model = load_model(MODEL)
    planned = run.plan(model, run.DerivativeRequest(hessian=True))
    sizes = []
    for available in (3.0e9, 3.1e9, 3.3e9, 50e9, 0.1e9):
        monkeypatch.setattr(run, "available_memory", lambda available=available: available)
        sizes.append(run.auto_batch_size(model, planned, model.parameter_count))
    assert all(size & (size - 1) == 0 and 256 <= size <= 65536 for size in sizes)
    assert sizes[0] == sizes[1] == sizes[2] and sizes[3] == 65536 and sizes[4] < sizes[0]


def test_which_batch_of_a_run_xla_starts_at(tmp_path):
    """XLA from the batch where its compilation pays (`run.make_kernel`): a run's size known in
    advance decides at once, a stream of unknown size switches once it has had that many points."""
    import keras

    from derivcli.models import load_model
    from derivcli.run import DerivativeRequest, make_kernel, plan

    model = load_model(MODEL)

    def start(request, points, batch_size=4096, of=model):
        return make_kernel(of, plan(of, request), points=points, batch_size=batch_size).xla_from

    gradient, hessian = DerivativeRequest(jacobian=True), DerivativeRequest(hessian=True)
    eighth = DerivativeRequest(partials=[{"x0": 8}])
    assert start(gradient, 2_000_000) is None and start(gradient, 20_000_000) == 1
    assert start(hessian, 700_000) is None and start(hessian, 800_000) == 1
    assert start(eighth, 100_000) is None and start(eighth, 200_000) == 0  # order 8: its first batch too
    assert start(hessian, None) == 184  # a stream: from its batch past 750,000 points, 4096 a batch
    assert start(hessian, 10**9, batch_size=None) is None  # no batch size, no XLA (library calls)
    wide = keras.Sequential([keras.Input((17,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    wide.save(tmp_path / "wide.keras")
    wide = load_model(str(tmp_path / "wide.keras"))
    assert start(DerivativeRequest(laplacian=True), 10**9, of=wide) is None  # Laplacians over > 16 inputs
    assert start(DerivativeRequest(laplacian=True, wrt=["x0", "x1"]), 10**9, of=wide) == 1
