"""Benchmark: derivcli's compiled kernels against JAX (`jax.jit(jax.vmap(...))`) on the same weights and points.

    .venv/bin/pip install 'jax[cpu]'             # optional: the benchmark's only extra dependency
    .venv/bin/python bench/bench_jax.py           # the table, kernels at 4096 and 65536 points
    .venv/bin/python bench/bench_jax.py --quick   # 4096 points only

Each workload builds one Keras model, saves it as .keras and loads it with
`derivcli.models.load_model`; derivcli's kernel is `derivcli.run.make_kernel`
for the command's plan, as a long run uses it (batches of the given size,
compiled with XLA), and JAX evaluates the same
function from the same weights. The two are timed in interleaved rounds (best
of each), so a busy machine slows both alike: the ratio is what counts. "max
rel diff" is the largest difference between the two results, relative to the
largest result; "first s" is the time to the first batch's result, tracing
and compiling included; "plain s" is derivcli's kernel of a short run, the
plain graph without XLA.

Then whole commands: the installed `derivcli` against a Python script that
does the same with JAX from the same .keras file (its weights read with h5py,
the points made with NumPy, the result written with numpy.savez): a Hessian
on a 1024 x 1024 grid, a Laplacian of the 50-input net at 32,768 points from
an NPZ, and d8y/dx8 on 1,048,576 grid points, each to NPZ, best of 2, start-up
(importing TensorFlow, or JAX) included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from derivcli.models import import_tensorflow, load_model  # noqa: E402

tf = import_tensorflow()
import keras  # noqa: E402

from derivcli.run import DerivativeRequest, make_kernel, plan  # noqa: E402


def mlp(folder: str, name: str, inputs: int, width: int, depth: int) -> tuple[object, list[tuple[np.ndarray, np.ndarray]]]:
    """A tanh MLP saved and loaded through derivcli, and its weights for JAX."""
    keras.utils.set_random_seed(0)
    x = keras.Input((inputs,))
    h = x
    for _ in range(depth):
        h = keras.layers.Dense(width, activation="tanh")(h)
    model = keras.Model(x, keras.layers.Dense(1)(h))
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    weights = [(layer.get_weights()[0], layer.get_weights()[1]) for layer in model.layers[1:]]
    return load_model(path), weights


def jax_function(weights: list[tuple[np.ndarray, np.ndarray]]) -> Callable:
    import jax.numpy as jnp

    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]

    def f(x):  # one point (D,) -> scalar
        h = x
        for w, b in params[:-1]:
            h = jnp.tanh(h @ w + b)
        w, b = params[-1]
        return (h @ w + b)[0]

    return f


def jax_workload(kind: str, f: Callable, dimension: int) -> Callable:
    import jax
    import jax.numpy as jnp
    from jax.experimental import jet

    if kind == "gradient":
        return jax.jit(jax.vmap(lambda x: jnp.concatenate([f(x)[None], jax.grad(f)(x)])))
    if kind == "hessian":
        rows, cols = np.triu_indices(dimension)
        return jax.jit(jax.vmap(lambda x: jnp.concatenate([f(x)[None], jax.hessian(f)(x)[rows, cols]])))
    if kind == "laplacian":
        return jax.jit(jax.vmap(lambda x: jnp.stack([f(x), jnp.trace(jax.hessian(f)(x))])))
    order = int(kind.split("^")[1])

    def series(x):  # d^n f / dx^n of a 1-input net: the n-th jet coefficient along e_1
        _, coefficients = jet.jet(f, (x,), ((jnp.ones_like(x),) + (jnp.zeros_like(x),) * (order - 1),))
        return jnp.stack([f(x), coefficients[-1]])

    return jax.jit(jax.vmap(series))


def derivcli_kernel(model: object, kind: str, points: int, long_run: bool = True) -> Callable:
    if kind == "gradient":
        request = DerivativeRequest(jacobian=True)
    elif kind == "hessian":
        request = DerivativeRequest(hessian=True)
    elif kind == "laplacian":
        request = DerivativeRequest(laplacian=True)
    else:
        request = DerivativeRequest(partials=[{"x": int(kind.split("^")[1])}])
    planned = plan(model, request)
    if not long_run:  # a short run's kernel: the plain graph
        return make_kernel(model, planned, "cpu", "auto", points=points)
    # The kernel of a long run (here 1e8 points, enough for XLA's compilation to pay), in batches
    # of `points`: XLA from its first batch.
    return make_kernel(model, planned, "cpu", "auto", points=100_000_000, batch_size=points)


def first_call(function: Callable[[], object]) -> float:
    """Seconds to the first result: tracing (derivcli) or compiling (JAX) included."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def best_of(functions: list[Callable[[], object]], rounds: int) -> list[float]:
    """Interleaved rounds: each function once per round, after a warm-up (tracing, compiling),
    in turns first and last, so that neither always runs on caches the other left."""
    for function in functions:
        function()
    best = [float("inf")] * len(functions)
    for round_ in range(rounds):
        order = list(enumerate(functions))
        for i, function in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            function()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


WORKLOADS = [  # (label, kind, inputs, width, depth)
    ("gradient, 2->64x4 tanh", "gradient", 2, 64, 4),
    ("Hessian (upper), 2->64x4 tanh", "hessian", 2, 64, 4),
    ("Laplacian, 50->256x4 tanh", "laplacian", 50, 256, 4),
    ("d8y/dx8, 1->64x3 tanh", "x^8", 1, 64, 3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="kernels at 4096 points only, 3 rounds, no whole commands")
    options = parser.parse_args()
    import jax

    jax.config.update("jax_enable_x64", False)
    sizes = [4096] if options.quick else [4096, 65536]
    print(f"{'workload':32s}{'points':>8s}{'derivcli s':>12s}{'JAX s':>10s}{'derivcli/JAX':>14s}{'max rel diff':>14s}"
          f"{'first s':>9s}{'JAX first s':>13s}{'plain s':>9s}")
    with tempfile.TemporaryDirectory() as folder:
        for label, kind, inputs, width, depth in WORKLOADS:
            model, weights = mlp(folder, kind.replace("^", ""), inputs, width, depth)
            f = jax_function(weights)
            for size in sizes:
                count = min(size, 512 * size // 4096) if kind == "laplacian" else size  # the D=50 Hessian is big
                points = np.random.default_rng(1).uniform(-1, 1, (count, inputs)).astype(np.float32)
                kernel = derivcli_kernel(model, kind, count)
                reference = jax_workload(kind, f, inputs)
                firsts = [first_call(lambda: kernel(points)), first_call(lambda: np.asarray(reference(points)))]
                ours = kernel(points)
                theirs = np.asarray(reference(points))
                if kind.startswith("x^"):
                    ours = ours[:, [0, -1]]
                difference = np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30)
                rounds = 5 if count > 4096 else 10 if options.quick else 30  # milliseconds each: more rounds
                plain = derivcli_kernel(model, kind, count, long_run=False)
                mine, jaxs, plains = best_of(
                    [lambda: kernel(points), lambda: np.asarray(reference(points)), lambda: plain(points)], rounds)
                print(f"{label:32s}{count:8d}{mine:12.4f}{jaxs:10.4f}{mine / jaxs:13.2f}x{difference:14.2e}"
                      f"{firsts[0]:9.2f}{firsts[1]:13.2f}{plains:9.4f}", flush=True)
        gemm_floor()
        if not options.quick:
            whole_commands(folder)


def gemm_floor() -> None:
    """One layer's work in a 4096-point Hessian batch, (6 x 4096, 64) x (64, 64) and tanh, as each library runs it.

    Six streams (value, two tangents, three second-order terms) is what derivcli's and JAX's
    Hessians both push through each hidden layer: where the workloads are bound by these GEMMs,
    this ratio is the floor of theirs.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    left, weight = rng.uniform(-1, 1, (6 * 4096, 64)).astype(np.float32), rng.uniform(-1, 1, (64, 64)).astype(np.float32)
    spec = tf.TensorSpec(left.shape, tf.float32)
    constant = tf.constant(weight)
    graph = tf.function(lambda x: tf.tanh(x @ constant)).get_concrete_function(spec)
    xla = tf.function(lambda x: tf.tanh(x @ constant), jit_compile=True).get_concrete_function(spec)
    array = jnp.asarray(weight)
    reference = jax.jit(lambda x: jnp.tanh(x @ array))
    tensor = tf.constant(left)
    times = best_of([lambda: graph(tensor).numpy(), lambda: xla(tensor).numpy(), lambda: np.asarray(reference(left))], 30)
    print(f"\n{'GEMM + tanh, (24576x64)(64x64)':32s}  TensorFlow graph {times[0]:.4f} s ({times[0] / times[2]:.2f}x), "
          f"TensorFlow XLA {times[1]:.4f} s ({times[1] / times[2]:.2f}x), JAX {times[2]:.4f} s", flush=True)
    # And the cost of a call itself: a compiled function of a 4096-point batch that only doubles it.
    small = left[:4096, :2]
    spec = tf.TensorSpec(small.shape, tf.float32)
    graph = tf.function(lambda x: 2 * x).get_concrete_function(spec)
    xla = tf.function(lambda x: 2 * x, jit_compile=True).get_concrete_function(spec)
    reference = jax.jit(lambda x: 2 * x)
    times = best_of([lambda: graph(tf.constant(small)).numpy(), lambda: xla(tf.constant(small)).numpy(),
                     lambda: np.asarray(reference(small))], 200)
    print(f"{'a call: 2x on (4096x2)':32s}  TensorFlow graph {times[0] * 1e6:.0f} us, TensorFlow XLA "
          f"{times[1] * 1e6:.0f} us, JAX {times[2] * 1e6:.0f} us", flush=True)


JAX_SCRIPT = r"""
import io, json, sys, zipfile
import h5py, numpy as np
import jax, jax.numpy as jnp
from jax.experimental import jet
path, kind, points_spec, target = sys.argv[1:5]
archive = zipfile.ZipFile(path)
weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")["layers"]
names = sorted((n for n in weights if n.startswith("dense")), key=lambda n: int(n.split("_")[1]) if "_" in n else 0)
params = [(jnp.asarray(weights[n]["vars"]["0"][()]), jnp.asarray(weights[n]["vars"]["1"][()])) for n in names]
def f(x):
    h = x
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    return (h @ params[-1][0] + params[-1][1])[0]
if points_spec.endswith(".npz"):
    points = np.load(points_spec)["x"].astype(np.float32)
else:
    num, dims = (int(v) for v in points_spec.split("x"))
    axis = np.linspace(-1, 1, num)
    points = np.stack(np.meshgrid(*[axis] * dims, indexing="ij"), -1).reshape(-1, dims).astype(np.float32)
if kind == "hessian":
    rows, cols = np.triu_indices(points.shape[1])
    fn = jax.jit(jax.vmap(lambda x: jnp.concatenate([f(x)[None], jax.hessian(f)(x)[rows, cols]])))
elif kind == "laplacian":
    fn = jax.jit(jax.vmap(lambda x: jnp.stack([f(x), jnp.trace(jax.hessian(f)(x))])))
else:
    def series(x):
        _, c = jet.jet(f, (x,), ((jnp.ones_like(x),) + (jnp.zeros_like(x),) * 7,))
        return jnp.stack([f(x), c[-1]])
    fn = jax.jit(jax.vmap(series))
out = np.concatenate([np.asarray(fn(points[i:i + 65536])) for i in range(0, len(points), 65536)])
np.savez(target, **{str(j): out[:, j] for j in range(out.shape[1])})
"""


def whole_commands(folder: str) -> None:
    """The installed command against the JAX script, each from its own process."""
    import subprocess

    executable = str(Path(sys.executable).parent / "derivcli")
    script = os.path.join(folder, "jax_command.py")
    Path(script).write_text(JAX_SCRIPT)
    rng = np.random.default_rng(2)
    np.savez(os.path.join(folder, "points50.npz"), x=rng.uniform(-1, 1, (32768, 50)).astype(np.float32))
    jobs = [
        ("hessian, 1024^2 grid -> NPZ", "gradient", "hessian", ["hessian", "--grid", "-1:1:1024"], "1024x2"),
        ("laplacian, 32768 pts -> NPZ", "laplacian", "laplacian",
         ["laplacian", "--npz", os.path.join(folder, "points50.npz")], os.path.join(folder, "points50.npz")),
        ("d8y/dx8, 1048576 pts -> NPZ", "x8", "x^8", ["deriv", "-p", "x^8", "--grid", "-1:1:1048576"], "1048576x1"),
    ]
    print(f"\n{'whole command':32s}{'derivcli s':>20s}{'JAX script s':>14s}{'derivcli/JAX':>14s}")
    for label, model_name, kind, arguments, points in jobs:
        model = os.path.join(folder, f"{model_name}.keras")
        ours = [executable, arguments[0], model, *arguments[1:], "-q", "-o", os.path.join(folder, "ours.npz")]
        theirs = [sys.executable, script, model, kind, points, os.path.join(folder, "theirs.npz")]
        times = [float("inf"), float("inf")]
        for _ in range(2):
            for i, command in enumerate((ours, theirs)):
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
                times[i] = min(times[i], time.perf_counter() - start)
        print(f"{label:32s}{times[0]:20.2f}{times[1]:14.2f}{times[0] / times[1]:13.2f}x", flush=True)


if __name__ == "__main__":
    main()
