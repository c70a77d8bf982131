"""Benchmark: the whole `derivcli grad` command against its bare compiled kernel.

    .venv/bin/python bench/bench_io.py [--rows 1000000]

On the same model and the same batches it prints rows per second of:
- the kernel alone (points already in memory, results discarded);
- the command's pipeline in the same process (read the CSV, compute, write CSV
  or NPZ), interleaved with the kernel runs; its ratio is the median over 5
  rounds of each run against the kernel run of its round;
- the installed command reading a CSV file and writing CSV, then NPZ;
- the same after its first batch, that is without its fixed start-up
  (TensorFlow import, model load, tracing), as the command's `--timings` reports,
  each of 3 runs against a kernel run just before it;
and the ratio of each to the kernel. Peak resident memory comes from
/usr/bin/time when it is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MODEL = str(ROOT / "sample_models" / "softplus_2d.keras")
BATCH = 4096


def write_points(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        handle.write("x0,x1\n")
        for start in range(0, rows, 1_000_000):
            block = rng.uniform(-2, 2, (min(1_000_000, rows - start), 2))
            np.savetxt(handle, block, fmt="%.6f", delimiter=",")


def build_mlp(path: Path, width: int, depth: int) -> str:
    """A 2-input tanh MLP with seeded random weights, saved as .keras."""
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((2,), name="x")] + [keras.layers.Dense(width, "tanh") for _ in range(depth)]
    keras.Sequential([*layers, keras.layers.Dense(1)]).save(path)
    return str(path)


def in_process_seconds(
    model_path: str, csv_path: Path, folder: Path, rows: int,
) -> tuple[dict[str, list[float]], Callable[[], float]]:
    """5 interleaved rounds of the bare kernel and the command's pipeline (CSV in, CSV or NPZ out),
    and a function that times the bare kernel once more.

    The pipeline is the command less its fixed start-up, timed in one process, and
    each pipeline run is compared with the kernel run next to it, so that the
    machine's drift from run to run does not enter the ratio.
    """
    from derivcli.models import load_model
    from derivcli.points import CsvSource
    from derivcli.run import DerivativeRequest, compute, layout_for, make_kernel, plan
    from derivcli.writers import open_writer

    model = load_model(model_path)
    planned = plan(model, DerivativeRequest(jacobian=True))
    kernel = make_kernel(model, planned)
    points = np.random.default_rng(0).uniform(-2, 2, (rows, 2)).astype(np.float32)
    kernel(points[:BATCH])

    def bare() -> None:
        for i in range(0, rows, BATCH):
            kernel(points[i : i + BATCH])

    def pipeline(suffix: str) -> None:
        source = CsvSource(str(csv_path), model.coordinate_names)
        writer = open_writer(suffix, layout_for(model, source, planned.names), str(folder / f"pipeline.{suffix}"))
        compute(model, source, kernel, planned.names, writer, BATCH)

    runs = {"kernel": bare, "csv": lambda: pipeline("csv"), "npz": lambda: pipeline("npz")}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(5):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)

    def time_kernel() -> float:
        start = time.perf_counter()
        bare()
        return time.perf_counter() - start

    return seconds, time_kernel


def command_seconds(model_path: str, csv_path: Path, output: Path) -> tuple[float, float, int, str]:
    """The installed command's wall time, its streaming seconds and points after the first batch
    (from `--timings`), and its peak resident memory."""
    derivcli = str(Path(sys.executable).parent / "derivcli")
    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    done = subprocess.run(
        [*timer, derivcli, "grad", model_path, "--csv", str(csv_path), "--batch-size", str(BATCH), "-o", str(output),
         "--timings"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    peak = f"{int(lines[-1]) / 1024:.0f} MB" if timer else "-"
    timings = next(line for line in lines if line.startswith("derivcli: timings:"))
    match = re.search(r"the other ([\d,]+) in ([\d.]+) s", timings)
    assert match, timings
    return elapsed, float(match.group(2)), int(match.group(1).replace(",", "")), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "points.csv"
        write_points(data, rows)
        models = [(MODEL, "softplus_2d.keras (2-32x2-1, 1,185 parameters)"),
                  (build_mlp(Path(folder) / "mlp.keras", 128, 3), "2-128x3-1 tanh MLP (33,665 parameters)")]
        print(f"grad, {rows:,} rows, batches of {BATCH}")
        for model_path, title in models:
            timed, time_kernel = in_process_seconds(model_path, data, Path(folder), rows)
            kernel = min(timed["kernel"])
            print(f"\n{title}")
            print(f"{'what':34s} {'seconds':>8s} {'rows/s':>12s} {'x kernel':>9s} {'peak RSS':>9s}")
            print(f"{'kernel alone (best of 5)':34s} {kernel:8.2f} {rows / kernel:12,.0f} {1.0:9.2f} {'-':>9s}")
            for suffix in ("csv", "npz"):
                best = min(timed[suffix])
                # The ratio: the median over rounds of each run against its round's kernel.
                ratio = statistics.median(a / b for a, b in zip(timed[suffix], timed["kernel"]))
                spread = ", ".join(f"{a / b:.2f}" for a, b in zip(timed[suffix], timed["kernel"]))
                print(f"{'CSV to ' + suffix + ', in process':34s} {best:8.2f} {rows / best:12,.0f} "
                      f"{ratio:9.2f} {'-':>9s}   rounds: {spread}")
            for suffix in (".csv", ".npz"):
                # Three rounds, each command against a kernel run just before it; the median ratio.
                runs, ratios = [], []
                for _ in range(3):
                    kernel_now = time_kernel()
                    runs.append(command_seconds(model_path, data, Path(folder) / f"out{suffix}"))
                    ratios.append(runs[-1][1] / runs[-1][2] / (kernel_now / rows))
                whole, streaming, points, peak = min(runs)
                print(f"{'command, CSV to ' + suffix[1:]:34s} {whole:8.2f} {rows / whole:12,.0f} "
                      f"{whole / kernel:9.2f} {peak:>9s}")
                print(f"{'  after its first batch (--timings)':34s} {streaming:8.2f} {points / streaming:12,.0f} "
                      f"{statistics.median(ratios):9.2f} {'':>9s}   rounds: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
