"""Benchmark: does the last shard of a big CSV cost what the first does?

    .venv/bin/python bench/bench_shards.py [--rows 10000000] [--shards 100]

Writes a CSV of ROWS points (two inputs and an id column) to a temporary
folder, then runs the installed command `derivcli eval` on shard 0/N and on
shard N-1/N of it, alternately, 3 rounds, and prints the wall time of each
(median), their ratio, and the same for the row scan alone (`CsvRowIndex`),
which every shard pays once. A shard that parsed the rows before its own
would take about N/2 times longer at the end of the file than at its start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MODEL = str(ROOT / "sample_models" / "softplus_2d.keras")


def write_points(path: Path, rows: int) -> None:
    """ROWS lines `id,x0,x1` in blocks, through Arrow's CSV writer."""
    import pyarrow as pa
    import pyarrow.csv as arrow_csv

    rng = np.random.default_rng(0)
    block = 1_000_000
    with open(path, "wb") as handle:
        handle.write(b"id,x0,x1\n")  # Arrow quotes the names of a header it writes
    schema = pa.schema([("id", pa.int64()), ("x0", pa.float64()), ("x1", pa.float64())])
    with open(path, "ab") as handle, arrow_csv.CSVWriter(
            handle, schema, write_options=arrow_csv.WriteOptions(include_header=False, quoting_style="none")) as writer:
        for start in range(0, rows, block):
            count = min(block, rows - start)
            writer.write_batch(pa.record_batch([pa.array(np.arange(start, start + count)),
                                                pa.array(rng.uniform(-1, 1, count)), pa.array(rng.uniform(-1, 1, count))],
                                               names=["id", "x0", "x1"]))


def timed_run(arguments: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(arguments, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    from derivcli.points import MAX_LINE_BYTES
    from derivcli.points.csv_scan import CsvRowIndex

    executable = str(Path(sys.executable).parent / "derivcli")
    with tempfile.TemporaryDirectory() as folder:
        points = Path(folder) / "points.csv"
        started = time.perf_counter()
        write_points(points, options.rows)
        size = points.stat().st_size
        print(f"{options.rows:,} rows, {size / 2**20:.0f} MiB, written in {time.perf_counter() - started:.1f} s; "
              f"{options.shards} shards of {options.rows // options.shards:,} rows")
        scans = []
        for _ in range(options.rounds):
            started = time.perf_counter()
            index = CsvRowIndex.scan(str(points), MAX_LINE_BYTES)
            scans.append(time.perf_counter() - started)
        assert index is not None and index.total == options.rows
        times: dict[int, list[float]] = {0: [], options.shards - 1: []}
        for _ in range(options.rounds):
            for k in times:
                times[k].append(timed_run([executable, "eval", MODEL, "--csv", str(points), "--shard",
                                           f"{k}/{options.shards}", "-o", str(Path(folder) / f"part{k}.csv")]))
        first, last = (statistics.median(times[k]) for k in times)
        print(f"{'':28s}{'seconds':>10s}")
        print(f"{'row scan (every shard)':28s}{statistics.median(scans):10.2f}")
        print(f"{f'shard 0/{options.shards}':28s}{first:10.2f}")
        print(f"{f'shard {options.shards - 1}/{options.shards}':28s}{last:10.2f}")
        print(f"last / first: {last / first:.2f}x (goal: within 1.5x)")


if __name__ == "__main__":
    main()
