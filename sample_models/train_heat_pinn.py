"""Trains the physics-informed net `heat_pinn.keras` for the heat equation.

    u_t = 0.1 u_xx  on t in [0, 1], x in [-1, 1],
    u(0, x) = sin(pi x),  u(t, -1) = u(t, 1) = 0,

whose exact solution is u = exp(-0.1 pi^2 t) sin(pi x). Its residual
`u_t - 0.1*u_xx` is what `derivcli op` gates in the README walkthrough:

    derivcli op sample_models/heat_pinn.keras --names t,x --output-names u \\
        --grid t=0:1:101 --grid x=-1:1:201 --expr "res=u_t - 0.1*u_xx" --max-abs 0.05

Run with `.venv/bin/python sample_models/train_heat_pinn.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = Path(__file__).resolve().parent
DIFFUSIVITY = 0.1


def build() -> keras.Model:
    t = keras.Input((1,), name="t")
    x = keras.Input((1,), name="x")
    h = keras.layers.Concatenate()([t, x])
    for i in range(3):
        h = keras.layers.Dense(32, activation="tanh", name=f"hidden{i + 1}")(h)
    return keras.Model([t, x], keras.layers.Dense(1, name="u")(h), name="heat_pinn")


def main(steps: int = 3000) -> None:
    keras.utils.set_random_seed(0)
    model = build()
    optimizer = keras.optimizers.Adam(2e-3)
    rng = np.random.default_rng(0)
    interior = tf.constant(rng.uniform([0, -1], [1, 1], (2048, 2)), tf.float32)
    x0 = tf.constant(rng.uniform(-1, 1, (256, 1)), tf.float32)
    tb = tf.constant(rng.uniform(0, 1, (256, 1)), tf.float32)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as weights_tape:
            t, x = interior[:, :1], interior[:, 1:]
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape(persistent=True) as inner:
                    inner.watch([t, x])
                    u = model([t, x])
                u_x = inner.gradient(u, x)
                u_t = inner.gradient(u, t)
            u_xx = outer.gradient(u_x, x)
            residual = u_t - DIFFUSIVITY * u_xx
            initial = model([tf.zeros_like(x0), x0]) - tf.sin(np.pi * x0)
            boundary = tf.concat([model([tb, -tf.ones_like(tb)]), model([tb, tf.ones_like(tb)])], 0)
            loss = (tf.reduce_mean(residual**2) + 10 * tf.reduce_mean(initial**2)
                    + 10 * tf.reduce_mean(boundary**2))
        gradients = weights_tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    for i in range(steps):
        loss = step()
        if i % 500 == 0:
            print(f"step {i:5d}  loss {float(loss):.3e}")
    model.save(HERE / "heat_pinn.keras")
    t, x = np.meshgrid(np.linspace(0, 1, 11), np.linspace(-1, 1, 21), indexing="ij")
    exact = np.exp(-DIFFUSIVITY * np.pi**2 * t) * np.sin(np.pi * x)
    predicted = model([t.reshape(-1, 1), x.reshape(-1, 1)]).numpy().reshape(t.shape)
    print(f"max |u - exact| on an 11 x 21 grid: {np.max(np.abs(predicted - exact)):.3e}")


if __name__ == "__main__":
    main()
