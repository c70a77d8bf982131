"""Benchmark: derivcli's compiled kernels against the ways people write it by hand.

    .venv/bin/python bench/bench_derivatives.py           # the full table (a few minutes)
    .venv/bin/python bench/bench_derivatives.py --quick   # smaller, for a smoke run

On the same model and points, in one run, it times:
- derivcli: the compiled `DerivativeKernel` (one tf.function for all columns);
- eager loop: nested GradientTapes per point, in eager mode (the forum answer);
- tape.jacobian: `tape.batch_jacobian`/`jacobian` over the whole batch in tf.function;
- for the n-th derivative, derivcli's Taylor-mode kernel against its nested-tape kernel and,
  when `jax` is installed, against `jax.experimental.jet` on the same weights;
- for the Laplacian of a 50-input net, the Forward Laplacian against the Hessian's trace;
and prints per-point times, the ratio to one forward pass, and the speed-ups. Taylor
times to first result include building the Taylor program (freezing the graph).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
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


def mlp(inputs: int, width: int, depth: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    x = keras.Input((inputs,))
    h = x
    for _ in range(depth):
        h = keras.layers.Dense(width, activation="tanh")(h)
    return keras.Model(x, keras.layers.Dense(1)(h))


def best_time(function: Callable[[], object], repeats: int = 5) -> float:
    """The best of `repeats` runs, after one warm-up run (which includes tracing)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def eager_loop(model: keras.Model, points: np.ndarray, kind: str, order: int = 1) -> None:
    """Per point, nested tapes in eager mode, as hand-written code usually does it."""
    for point in points:
        x = tf.constant(point[None, :])
        if kind == "nth":
            tapes = [tf.GradientTape() for _ in range(order)]
            for tape in tapes:
                tape.__enter__()
                tape.watch(x)
            value = model(x)
            for tape in reversed(tapes):
                tape.__exit__(None, None, None)
                value = tape.gradient(value, x)
            continue
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = model(x)
            gradient = inner.gradient(y, x)
            if kind == "grad":
                continue
            rows = [outer.gradient(gradient[:, i], x) for i in range(x.shape[1])]
        del outer, rows


def jacobian_function(model: keras.Model, kind: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """tape.batch_jacobian over the whole batch, in tf.function."""

    @tf.function(reduce_retracing=True)
    def run(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = model(x)
            gradient = inner.batch_jacobian(y, x)[:, 0, :]
        if kind == "grad":
            return gradient
        hessian = outer.batch_jacobian(gradient, x)
        return tf.linalg.trace(hessian) if kind == "laplacian" else hessian

    return run


def columns_for(kind: str, dimension: int, order: int = 1) -> list[Column]:
    zero = (0,) * dimension
    if kind == "grad":
        return [Column(0, zero)] + [Column(0, i) for i in all_partials(1, range(dimension), dimension)]
    if kind == "hessian":
        return [Column(0, zero)] + [Column(0, i) for i in all_partials(2, range(dimension), dimension)]
    if kind == "laplacian":
        return [Column(0, zero), Column(0, zero, laplacian_over=tuple(range(dimension)))]
    return [Column(0, (order,))]


def row(label: str, points: int, forward: float, ours: float, eager: float | None, jacobian: float | None) -> str:
    per = lambda seconds: f"{seconds / points * 1e6:9.2f}"  # noqa: E731
    eager_text = f"{per(eager)} {eager / ours:8.0f}x" if eager else f"{'-':>9} {'-':>9}"
    jacobian_text = f"{per(jacobian)} {jacobian / ours:8.1f}x" if jacobian else f"{'-':>9} {'-':>9}"
    return f"{label:24s} {points:7d} {per(ours)} {ours / forward:8.1f} {eager_text} {jacobian_text}"


def jet_function(model: keras.Model) -> Callable[[np.ndarray, int], object] | None:
    """The n-th derivative along x by `jax.experimental.jet`, on the Keras model's weights; None without jax."""
    try:
        import jax
        import jax.numpy as jnp
        from jax.experimental import jet
    except ImportError:
        return None
    weights = [(jnp.asarray(layer.kernel.numpy()), jnp.asarray(layer.bias.numpy())) for layer in model.layers
               if isinstance(layer, keras.layers.Dense)]

    def forward(x: object) -> object:
        for w, b in weights[:-1]:
            x = jnp.tanh(x @ w + b)
        return x @ weights[-1][0] + weights[-1][1]

    compiled: dict[int, Callable] = {}

    def nth(points: np.ndarray, order: int) -> object:
        if order not in compiled:
            def series(x: object) -> object:
                tangents = [jnp.ones_like(x)] + [jnp.zeros_like(x)] * (order - 1)
                _, out = jet.jet(forward, (x,), ((*tangents,),))
                return out[-1]  # jet's terms are derivatives: the n-th is d^n y / dx^n
            compiled[order] = jax.jit(series)
        return compiled[order](points).block_until_ready()

    return nth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer points and orders")
    arguments = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU(s), "
          f"GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    print(f"{'workload':24s} {'points':>7s} {'us/pt':>9s} {'x fwd':>8s} {'eager':>9s} {'speedup':>9s} "
          f"{'jacobian':>9s} {'speedup':>9s}")
    eager_points = 16 if arguments.quick else 64

    model = mlp(2, 64, 4)
    forward_fn = tf.function(model, reduce_retracing=True)
    for count in ((4096,) if arguments.quick else (4096, 65536)):
        points = np.random.default_rng(0).uniform(-1, 1, (count, 2)).astype(np.float32)
        forward = best_time(lambda: forward_fn(points).numpy())
        for kind in ("grad", "hessian", "laplacian"):
            # As `--engine auto` runs it: Taylor series for the pure second derivatives.
            program = TaylorProgram.trace(model, 2, "float32")
            kernel = DerivativeKernel(model, 2, columns_for(kind, 2), "float32", taylor=program)
            ours = best_time(lambda: kernel(points))
            eager = best_time(lambda: eager_loop(model, points[:eager_points], kind), 1) * count / eager_points
            jac = jacobian_function(model, kind)
            jacobian = best_time(lambda: jac(tf.constant(points)).numpy())
            print(row(f"2-64x4-1 {kind}", count, forward, ours, eager, jacobian))

    model = mlp(1, 64, 3)
    forward_fn = tf.function(model, reduce_retracing=True)
    points = np.random.default_rng(0).uniform(-1, 1, (1024, 1)).astype(np.float32)
    forward = best_time(lambda: forward_fn(points).numpy())
    jet = jet_function(model)
    print()
    print(f"{'n-th derivative, 1024 pts':26s} {'tape us/pt':>10s} {'first s':>8s} {'taylor us/pt':>12s} {'first s':>8s} "
          f"{'x fwd':>6s} {'vs tape':>8s} {'xla us/pt':>9s} {'first s':>8s} {'vs tape':>8s} {'eager us/pt':>11s} "
          f"{'jet us/pt':>9s} {'vs jet':>7s}")
    for order in ((1, 2, 4) if arguments.quick else (1, 2, 4, 6, 8, 12, 16)):
        columns = columns_for("nth", 1, order)
        # As `--engine auto` runs it: plain graphs for 1024 points; with XLA for long runs
        # (derivcli.run.XLA_POINTS_TIMES_ORDER).
        taylor, taylor_trace = timed_kernel(
            lambda: DerivativeKernel(model, 1, columns, "float32", taylor=TaylorProgram.trace(model, 1, "float32")),
            points)
        xla, xla_trace = taylor, taylor_trace
        if order >= 4:
            xla, xla_trace = timed_kernel(
                lambda: DerivativeKernel(model, 1, columns, "float32", taylor=TaylorProgram.trace(model, 1, "float32"),
                                         xla_from=0, batch_size=len(points)), points)
        if order <= 8:
            tape, tape_trace = timed_kernel(lambda: DerivativeKernel(model, 1, columns, "float32"), points)
            few = eager_points if order <= 4 else 8  # the eager loop at order 8 takes seconds a point
            eager = best_time(lambda: eager_loop(model, points[:few], "nth", order), 1) * 1024 / few
            tape_text = f"{tape / 1024 * 1e6:10.2f} {tape_trace:8.1f}"
            ratios = f"{tape / taylor:7.1f}x", f"{tape / xla:7.1f}x"
            eager_text = f"{eager / 1024 * 1e6:11.0f}"
        else:  # nested tapes past order 8 trace for many minutes
            tape_text, ratios, eager_text = f"{'-':>10s} {'-':>8s}", (f"{'-':>8s}", f"{'-':>8s}"), f"{'-':>11s}"
        jet_text = f"{'-':>9s} {'-':>7s}"
        if jet is not None:
            jax_time = best_time(lambda: jet(points, order))
            jet_text = f"{jax_time / 1024 * 1e6:9.2f} {jax_time / min(taylor, xla):6.2f}x"
        print(f"{'order ' + str(order):26s} {tape_text} {taylor / 1024 * 1e6:12.2f} {taylor_trace:8.1f} "
              f"{taylor / forward:6.1f} {ratios[0]} {xla / 1024 * 1e6:9.2f} {xla_trace:8.1f} {ratios[1]} "
              f"{eager_text} {jet_text}")
    laplacian_section(arguments.quick)


def laplacian_section(quick: bool) -> None:
    """The Laplacian of a 50-input net: Taylor series per input against the Hessian's trace by tapes."""
    model = mlp(50, 256, 4)
    points = np.random.default_rng(0).uniform(-1, 1, (128 if quick else 512, 50)).astype(np.float32)
    columns = columns_for("laplacian", 50)
    kernels, traces = {}, {}
    builders = {
        "taylor": lambda: DerivativeKernel(model, 50, columns, "float32", taylor=TaylorProgram.trace(model, 50, "float32")),
        "tape": lambda: DerivativeKernel(model, 50, columns, "float32"),
        "jacobian": lambda: (lambda p, jac=jacobian_function(model, "laplacian"): jac(tf.constant(p)).numpy()),
    }
    for name, build in builders.items():
        start = time.perf_counter()
        kernels[name] = build()
        kernels[name](points)
        traces[name] = time.perf_counter() - start
    # Interleaved rounds, best of each: this machine's speed drifts by 30% over seconds.
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(3 if quick else 7):
        for name, kernel in kernels.items():
            best[name] = min(best[name], best_time(lambda: kernel(points), 1))
    taylor, tape, jacobian = best["taylor"], best["tape"], best["jacobian"]
    taylor_trace, tape_trace = traces["taylor"], traces["tape"]
    n = len(points)
    print()
    print(f"Laplacian, 50-256x4-1 (tanh), {n} points: Taylor {taylor / n * 1e6:.0f} us/pt (trace {taylor_trace:.1f} s), "
          f"Hessian trace by tapes {tape / n * 1e6:.0f} us/pt (trace {tape_trace:.1f} s), batch_jacobian "
          f"{jacobian / n * 1e6:.0f} us/pt: Taylor {tape / taylor:.1f}x faster than tapes, "
          f"{jacobian / taylor:.1f}x than batch_jacobian")


def timed_kernel(build: Callable[[], Callable[[np.ndarray], object]], points: np.ndarray) -> tuple[float, float]:
    """(best run time, time to the first result: building, tracing, compiling and the first call) of a kernel."""
    start = time.perf_counter()
    kernel = build()
    kernel(points)
    trace = time.perf_counter() - start
    return best_time(lambda: kernel(points), 3), trace


if __name__ == "__main__":
    main()
