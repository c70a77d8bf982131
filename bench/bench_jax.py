"""Benchmark: derivcli's compiled kernels against JAX (`jax.jit(jax.vmap(...))`) on the same weights and points.

    .venv/bin/pip install 'jax[cpu]'             # optional: the benchmark's only extra dependency
    .venv/bin/python bench/bench_jax.py           # the table, kernels at 4096 and 65536 points
    .venv/bin/python bench/bench_jax.py --quick   # 4096 points only

Each workload builds one Keras model, saves it as .keras and loads it with
`derivcli.models.load_model`; derivcli's kernel is `derivcli.run.make_kernel`
for the command's plan, as the command runs it, and JAX evaluates the same
function from the same weights. The two are timed in interleaved rounds (best
of each), so a busy machine slows both alike: the ratio is what counts. The
last column is the largest difference between the two results, relative to
the largest result.
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


def derivcli_kernel(model: object, kind: str, points: int) -> Callable:
    if kind == "gradient":
        request = DerivativeRequest(jacobian=True)
    elif kind == "hessian":
        request = DerivativeRequest(hessian=True)
    elif kind == "laplacian":
        request = DerivativeRequest(laplacian=True)
    else:
        request = DerivativeRequest(partials=[{"x": int(kind.split("^")[1])}])
    planned = plan(model, request)
    return make_kernel(model, planned, "cpu", "auto", points=points)


def best_of(functions: list[Callable[[], object]], rounds: int) -> list[float]:
    """Interleaved rounds: each function once per round, after a warm-up (tracing, compiling)."""
    for function in functions:
        function()
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for i, function in enumerate(functions):
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
    parser.add_argument("--quick", action="store_true", help="4096 points only, 3 rounds")
    options = parser.parse_args()
    import jax

    jax.config.update("jax_enable_x64", False)
    sizes = [4096] if options.quick else [4096, 65536]
    rounds = 3 if options.quick else 5
    print(f"{'workload':32s}{'points':>8s}{'derivcli s':>12s}{'JAX s':>10s}{'derivcli/JAX':>14s}{'max rel diff':>14s}")
    with tempfile.TemporaryDirectory() as folder:
        for label, kind, inputs, width, depth in WORKLOADS:
            model, weights = mlp(folder, kind.replace("^", ""), inputs, width, depth)
            f = jax_function(weights)
            for size in sizes:
                count = min(size, 512 * size // 4096) if kind == "laplacian" else size  # the D=50 Hessian is big
                points = np.random.default_rng(1).uniform(-1, 1, (count, inputs)).astype(np.float32)
                kernel = derivcli_kernel(model, kind, count)
                reference = jax_workload(kind, f, inputs)
                ours = kernel(points)
                theirs = np.asarray(reference(points))
                if kind.startswith("x^"):
                    ours = ours[:, [0, -1]]
                difference = np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30)
                mine, jaxs = best_of([lambda: kernel(points), lambda: np.asarray(reference(points))], rounds)
                print(f"{label:32s}{count:8d}{mine:12.4f}{jaxs:10.4f}{mine / jaxs:13.2f}x{difference:14.2e}", flush=True)


if __name__ == "__main__":
    main()
