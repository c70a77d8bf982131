"""A physics-informed training step with derivcli.operator against hand-written tapes, side by side.

Workload (issue 25): an MLP (D+1) -> width x 4 tanh -> 1 on inputs (t, x1..xD), float32, a batch of
points, the loss mean((u_t - 0.01 lap_x u)^2); one whole training step (the operator, dL/dtheta and
an Adam update) inside `tf.function`, with `jit_compile` off and on. Three ways to write it, on the
same weights and points:

- derivcli: `derivcli.operator(model, "D(u, t) - 0.01*lap(u)", wrt="x")`, the Forward Laplacian on
  the model's live weights;
- (A) nested GradientTape: the gradient, then one more gradient per dimension for u_xixi;
- (B) forward over reverse: per dimension a `tf.autodiff.ForwardAccumulator` with a unit tangent
  over a GradientTape's gradient, a Hessian-vector product whose i-th entry is u_xixi.

Each configuration runs in a process of its own: the median of `--steps` timed steps after
`--warmup` steps, and the peak resident memory it grew by over the process's memory before its
first step (the traced and compiled graphs count). The first step's losses are compared: the three
must agree to float32 round-off.

    .venv/bin/python bench/bench_training.py                     # the issue's workload (hours on 2 CPU cores)
    .venv/bin/python bench/bench_training.py --batch 1024 --steps 20 --widths 64

(B) under XLA compiles its step anew after every weight update (measured at D = 2: 1.6 ms a step
with the weights held, 0.72 s with Adam's update): a ForwardAccumulator's JVPs are function calls,
and XLA takes compile-time constants from the weights through them. derivcli's operators met the
same trap and avoid it (`derivcli.training`). `--budget` keeps such rows to a few timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("derivcli", "nested", "forward-over-reverse")
DIFFUSIVITY = 0.01


def memory_kb(field: str) -> int:
    """A line of /proc/self/status in kB: VmRSS now, VmHWM the peak so far."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(method: str, dimension: int, width: int, jit: bool, batch: int, steps: int, warmup: int,
           budget: float) -> dict:
    """One configuration in this process: times its steps, measures its memory, returns them with the first loss."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import derivcli

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((dimension + 1,))]
                             + [keras.layers.Dense(width, activation="tanh") for _ in range(4)]
                             + [keras.layers.Dense(1)])
    points = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, dimension + 1)), tf.float32)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    if method == "derivcli":
        residual = derivcli.operator(model, "D(u, t) - 0.01*lap(u)", inputs=["t"] + [f"x{i}" for i in range(dimension)],
                                     outputs="u", wrt="x")
    elif method == "nested":
        def residual(z: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape(persistent=True) as outer:
                outer.watch(z)
                with tf.GradientTape() as inner:
                    inner.watch(z)
                    u = model(z)
                gradient = inner.gradient(u, z)
                firsts = [gradient[:, 1 + i] for i in range(dimension)]
            laplacian = tf.add_n([outer.gradient(firsts[i], z)[:, 1 + i] for i in range(dimension)])
            return gradient[:, 0] - DIFFUSIVITY * laplacian
    else:
        def residual(z: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as inner:
                inner.watch(z)
                u = model(z)
            u_t = inner.gradient(u, z)[:, 0]
            terms = []
            for i in range(dimension):
                tangent = tf.zeros_like(z) + tf.one_hot(1 + i, dimension + 1)  # not broadcast_to: see engine.tape._per_point
                with tf.autodiff.ForwardAccumulator(z, tangent) as accumulator:
                    with tf.GradientTape() as tape:
                        tape.watch(z)
                        u = model(z)
                    gradient = tape.gradient(u, z)
                terms.append(accumulator.jvp(gradient)[:, 1 + i])
            return u_t - DIFFUSIVITY * tf.add_n(terms)

    @tf.function(jit_compile=jit)
    def step(z: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(residual(z) ** 2)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    before = memory_kb("VmRSS")
    first_loss = float(step(points))
    for _ in range(warmup - 1):
        step(points).numpy()
    times: list[float] = []
    for _ in range(steps):
        start = time.perf_counter()
        step(points).numpy()
        times.append(time.perf_counter() - start)
        if sum(times) > budget and len(times) >= 3:  # a step of seconds: its median is known well enough
            break
    return {"median_ms": 1e3 * statistics.median(times), "memory_mb": (memory_kb("VmHWM") - before) / 1024,
            "first_loss": first_loss, "steps": len(times)}


def run_worker(method: str, dimension: int, width: int, jit: bool, options: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", method, str(dimension), str(width), str(int(jit)),
               "--batch", str(options.batch), "--steps", str(options.steps), "--warmup", str(options.warmup),
               "--budget", str(options.budget)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=options.timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {done.returncode}: {last[:60]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="2,10,50,100")
    parser.add_argument("--widths", default="64,512")
    parser.add_argument("--jit", default="off,on")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--budget", type=float, default=120,
                        help="seconds of timed steps per configuration, after which (and 3 steps) the median is taken")
    parser.add_argument("--methods", default=",".join(METHODS), type=lambda text: text.split(","),
                        help="which of derivcli, nested, forward-over-reverse to run")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "D", "WIDTH", "JIT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        method, dimension, width, jit = options.worker
        print(json.dumps(worker(method, int(dimension), int(width), jit == "1", options.batch, options.steps,
                                options.warmup, options.budget)))
        return
    print(f"training step: MLP (D+1) -> width x 4 tanh -> 1, batch {options.batch:,}, float32, "
          f"loss mean((u_t - 0.01 lap u)^2), median of {options.steps} steps after {options.warmup}")
    print(f"{'D':>4} {'width':>6} {'XLA':>4} | {'derivcli ms':>11} {'(A) nested':>11} {'(B) fwd/rev':>11} | "
          f"{'vs A':>6} {'vs B':>6} | {'MB derivcli':>11} {'MB (B)':>8} {'ratio':>6} | loss agrees")
    cut_short = False
    for width in map(int, options.widths.split(",")):
        for dimension in map(int, options.dims.split(",")):
            for jit in (j == "on" for j in options.jit.split(",")):
                found = {method: run_worker(method, dimension, width, jit, options) if method in options.methods
                         else {"error": "not run (--methods)"} for method in METHODS}
                print(row(dimension, width, jit, found, options.steps), flush=True)
                cut_short = cut_short or any(r.get("steps", options.steps) < options.steps for r in found.values())
    if cut_short:
        print(f"* fewer steps than {options.steps}: the timed steps had passed --budget {options.budget:g} s")


def row(dimension: int, width: int, jit: bool, found: dict[str, dict], options_steps: int) -> str:
    ours, nested, forward = (found[m] for m in METHODS)

    def ms(result: dict) -> str:
        if "median_ms" not in result:
            return f"{'not run' if result['error'].startswith('not run') else 'failed':>11} "
        few = "*" if result["steps"] < options_steps else " "  # stopped by --budget
        return f"{result['median_ms']:10.1f}{few}"

    def ratio(theirs: dict) -> str:
        if "median_ms" not in theirs or "median_ms" not in ours:
            return f"{'-':>6}"
        return f"{theirs['median_ms'] / ours['median_ms']:5.2f}x"

    memory = f"{ours.get('memory_mb', float('nan')):11.0f} {forward.get('memory_mb', float('nan')):8.0f} " + (
        f"{ours['memory_mb'] / forward['memory_mb']:5.2f}x" if "memory_mb" in ours and "memory_mb" in forward
        and forward["memory_mb"] > 0 else f"{'-':>6}")
    losses = [r["first_loss"] for r in found.values() if "first_loss" in r]
    ran = [r for r in found.values() if not r.get("error", "").startswith("not run")]
    agrees = len(losses) == len(ran) >= 2 and max(losses) - min(losses) <= 1e-4 * max(abs(v) for v in losses)
    errors = "; ".join(f"{m}: {r['error']}" for m, r in found.items() if r in ran and "error" in r)
    return (f"{dimension:4d} {width:6d} {'on' if jit else 'off':>4} | {ms(ours)} {ms(nested)} {ms(forward)} | "
            f"{ratio(nested)} {ratio(forward)} | {memory} | {'yes' if agrees else 'NO'}" + (f"  {errors}" if errors else ""))


if __name__ == "__main__":
    main()
