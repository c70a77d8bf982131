"""Trains the physics-informed net `heat_pinn.keras` for the heat equation, its residual by `derivcli.operator`.

    u_t = 0.1 u_xx  on t in [0, 1], x in [-1, 1],
    u(0, x) = sin(pi x),  u(t, -1) = u(t, 1) = 0,

whose exact solution is u = exp(-0.1 pi^2 t) sin(pi x). The loss's residual is written once, in
derivcli's operator language, and the same expression is what `derivcli op` gates in CI:

    derivcli op sample_models/heat_pinn.keras --output-names u \\
        --grid t=0:1:101 --grid x=-1:1:201 --expr "res=u_t - 0.1*u_xx" --max-abs 0.2

Run with `.venv/bin/python sample_models/train_heat_pinn.py [--steps N] [--output FILE]`
(3,000 steps, about 20 s on 2 cores; `make demo` trains a copy under .venv/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import derivcli
from derivcli.models import import_tensorflow

tf = import_tensorflow()  # TensorFlow on the Keras backend, its start-up chatter silenced

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DIFFUSIVITY = 0.1


def build() -> keras.Model:
    t = keras.Input((1,), name="t")
    x = keras.Input((1,), name="x")
    h = keras.layers.Concatenate()([t, x])
    for i in range(3):
        h = keras.layers.Dense(32, activation="tanh", name=f"hidden{i + 1}")(h)
    return keras.Model([t, x], keras.layers.Dense(1, name="u")(h), name="heat_pinn")


def main(steps: int = 3000, output: Path = HERE / "heat_pinn.keras") -> None:
    keras.utils.set_random_seed(0)
    model = build()
    # The model's inputs are named t and x; its output is named u here. Planned once, traced once.
    residual = derivcli.operator(model, f"u_t - {DIFFUSIVITY}*u_xx", outputs="u")
    optimizer = keras.optimizers.Adam(2e-3)
    rng = np.random.default_rng(0)
    interior = tf.constant(rng.uniform([0, -1], [1, 1], (2048, 2)), tf.float32)  # columns t, x
    x0 = tf.constant(rng.uniform(-1, 1, (256, 1)), tf.float32)
    tb = tf.constant(rng.uniform(0, 1, (256, 1)), tf.float32)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            initial = model([tf.zeros_like(x0), x0]) - tf.sin(np.pi * x0)
            boundary = tf.concat([model([tb, -tf.ones_like(tb)]), model([tb, tf.ones_like(tb)])], 0)
            loss = (tf.reduce_mean(residual(interior) ** 2) + 10 * tf.reduce_mean(initial**2)
                    + 10 * tf.reduce_mean(boundary**2))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    for i in range(steps):
        loss = step()
        if i % 500 == 0:
            print(f"step {i:5d}  loss {float(loss):.3e}")
    model.save(output)
    t, x = np.meshgrid(np.linspace(0, 1, 11), np.linspace(-1, 1, 21), indexing="ij")
    exact = np.exp(-DIFFUSIVITY * np.pi**2 * t) * np.sin(np.pi * x)
    predicted = model([t.reshape(-1, 1), x.reshape(-1, 1)]).numpy().reshape(t.shape)
    print(f"max |u - exact| on an 11 x 21 grid: {np.max(np.abs(predicted - exact)):.3e}  ({residual.engine})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--output", type=Path, default=HERE / "heat_pinn.keras")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.output)
