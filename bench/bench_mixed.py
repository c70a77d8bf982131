"""Benchmark: mixed partials by nested tapes against interpolation of Taylor series.

    .venv/bin/python bench/bench_mixed.py

On a 64x3 tanh MLP and 256 points, for every mixed partial of one total order
over 2 or 3 inputs, it prints, for nested tapes and for interpolation (derivcli's
`--engine taylor`): the time to the first result (building and tracing), the
time per point, and the largest error relative to the column's largest value,
against nested tapes in float64. At order 8, where nested tapes trace for many
minutes, tapes are left out and the reference is float64 interpolation (which
agrees with closed forms to 1e-12, tests/test_higher_order.py). The error of
float32 interpolation is why `--engine auto` interpolates in float64 only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from derivcli.models import import_tensorflow  # noqa: E402

tf = import_tensorflow()
import keras  # noqa: E402

from derivcli.engine import Column, DerivativeKernel  # noqa: E402
from derivcli.engine.taylor import TaylorProgram  # noqa: E402
from derivcli.specs import all_partials  # noqa: E402


def mlp(inputs: int, dtype: str) -> keras.Model:
    """The same float32 weights in either dtype (float32 values are exact in float64)."""
    def build(kind: str) -> keras.Model:
        layers = [keras.Input((inputs,), dtype=kind)]
        layers += [keras.layers.Dense(64, "tanh", dtype=kind) for _ in range(3)] + [keras.layers.Dense(1, dtype=kind)]
        return keras.Sequential(layers)

    keras.utils.set_random_seed(0)
    weights = build("float32").get_weights()
    model = build(dtype)
    model.set_weights([w.astype(dtype) for w in weights])
    return model


def run(model: keras.Model, inputs: int, columns: list[Column], dtype: str, points: np.ndarray,
        interpolate: bool) -> tuple[np.ndarray, float, float]:
    """(values, seconds to the first result, seconds per run) of one kernel."""
    start = time.perf_counter()
    taylor = TaylorProgram.trace(model, inputs, dtype) if interpolate else None
    kernel = DerivativeKernel(model, inputs, columns, dtype, taylor=taylor, interpolate_from=3 if interpolate else None)
    values = kernel(points.astype(dtype))
    first = time.perf_counter() - start
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        kernel(points.astype(dtype))
        runs.append(time.perf_counter() - start)
    return values, first, min(runs)


def main() -> None:
    print(f"{'mixed partials, 256 points':30s} {'dtype':>7s} {'tape first s':>12s} {'us/pt':>7s} {'tape err':>9s} "
          f"{'interp first s':>14s} {'us/pt':>7s} {'interp err':>10s}")
    for inputs, order in ((2, 4), (2, 6), (3, 4), (2, 8)):
        partials = [p for p in all_partials(order, list(range(inputs)), inputs) if sum(map(bool, p)) >= 2]
        columns = [Column(0, p) for p in partials]
        points = np.random.default_rng(0).uniform(-1, 1, (256, inputs))
        tapes = order <= 6
        reference, _, _ = run(mlp(inputs, "float64"), inputs, columns, "float64", points, not tapes)
        scale = np.max(np.abs(reference), axis=0)
        for dtype in ("float32", "float64"):
            model = mlp(inputs, dtype)
            interp, interp_first, interp_run = run(model, inputs, columns, dtype, points, True)
            interp_error = np.max(np.abs(interp - reference) / scale)
            tape_text = f"{'-':>12s} {'-':>7s} {'-':>9s}"
            if tapes:
                tape, tape_first, tape_run = run(model, inputs, columns, dtype, points, False)
                tape_error = np.max(np.abs(tape - reference) / scale)
                tape_text = f"{tape_first:12.1f} {tape_run / 256 * 1e6:7.1f} {tape_error:9.1e}"
            print(f"{f'{inputs} inputs, order {order} ({len(partials)} mixed)':30s} {dtype:>7s} {tape_text} "
                  f"{interp_first:14.1f} {interp_run / 256 * 1e6:7.1f} {interp_error:10.1e}", flush=True)


if __name__ == "__main__":
    main()
