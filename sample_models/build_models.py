"""Builds the committed sample models (kilobytes each): `make models`.

Each model tells one story users bring to derivcli; the README lists what
derivcli prints for each. Training is seeded and short, so the files are
reproducible up to TensorFlow's own non-determinism.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bump_layer import Bump, BumpConditionOnly  # noqa: E402


def mlp(inputs: int, widths: list[int], activation: str, name: str) -> keras.Model:
    """A Dense network with one linear output."""
    x = keras.Input((inputs,), name="x")
    h = x
    for i, width in enumerate(widths):
        h = keras.layers.Dense(width, activation=activation, name=f"hidden{i + 1}")(h)
    y = keras.layers.Dense(1, name="out")(h)
    return keras.Model(x, y, name=name)


def fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    model.compile()  # drop the optimizer state: smaller files, nothing a user needs
    return model


def save_bumps() -> None:
    """The custom-layer samples, loaded with --custom-objects bump_layer.py."""
    inputs = keras.Input((1,), name="x")
    keras.Model(inputs, Bump(1.0, name="bump")(inputs), name="bump").save(HERE / "bump.keras")
    # The same bump with sigma used only in the condition: doctor finds sigma disconnected.
    inputs = keras.Input((1,), name="x")
    buggy = BumpConditionOnly(1.0, name="bump")(inputs)
    keras.Model(inputs, buggy, name="bump_condition_only").save(HERE / "bump_condition_only.keras")


def bar_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """8x8 grey images of one bright bar, horizontal (class 0), vertical (1) or diagonal (2), with noise."""
    images = rng.normal(0, 0.1, (count, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 3, count)
    for image, label in zip(images, labels):
        k = rng.integers(1, 7)
        if label == 0:
            image[k, 1:7, 0] += 1
        elif label == 1:
            image[1:7, k, 0] += 1
        else:
            image[np.arange(8), np.arange(8), 0] += 1
    return images, labels


def save_bars() -> None:
    """An image classifier (8x8x1, three classes: horizontal, vertical, diagonal bar) and four test images."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images, labels = bar_images(600, rng)
    image = keras.Input((8, 8, 1), name="image")
    hidden = keras.layers.Conv2D(4, 3, activation="tanh", name="conv")(image)
    hidden = keras.layers.AveragePooling2D(2, name="pool")(hidden)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.Flatten(name="flatten")(hidden))
    model = keras.Model(image, keras.layers.Softmax(name="probabilities")(logits), name="bars_cnn")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=30, batch_size=32, verbose=0)
    model.compile()
    model.save(HERE / "bars_cnn.keras")
    test_images, test_labels = bar_images(4, np.random.default_rng(1))
    np.savez(HERE / "bars.npz", image=test_images, label=test_labels)


def main() -> None:
    keras.utils.set_random_seed(0)
    x = np.linspace(-2, 2, 512, dtype="float32")[:, None]

    # y = x^2 with relu: the fit is fine, the second derivative is 0 almost everywhere.
    fit(mlp(1, [16, 16], "relu", "square_relu"), x, x**2, 300).save(HERE / "square_relu.keras")
    # y = x^2 with tanh: smooth, d2y/dx2 close to 2.
    tanh = fit(mlp(1, [16, 16], "tanh", "square_tanh"), x, x**2, 300)
    tanh.save(HERE / "square_tanh.keras")
    saved = HERE / "square_tanh_savedmodel"
    shutil.rmtree(saved, ignore_errors=True)
    tanh.export(saved, verbose=False)

    # y = (x - 5)^2 / 25 on [0, 10], saved as a legacy .h5 file: dy/dx = 2 (x - 5) / 25.
    x10 = np.linspace(0, 10, 512, dtype="float32")[:, None]
    shifted = fit(mlp(1, [16, 16], "tanh", "shifted_square"), x10, (x10 - 5) ** 2 / 25, 300)
    shifted.save(HERE / "shifted_square.h5")

    # Two inputs, softplus: for d/dx0 + d2/dx1^2. Fitted to sin(x0) + x1^2 / 2.
    grid = np.stack(np.meshgrid(np.linspace(-2, 2, 32), np.linspace(-2, 2, 32)), -1).reshape(-1, 2)
    grid = grid.astype("float32")
    target = np.sin(grid[:, :1]) + grid[:, 1:] ** 2 / 2
    fit(mlp(2, [32, 32], "softplus", "softplus_2d"), grid, target, 200).save(HERE / "softplus_2d.keras")

    save_bumps()
    save_bars()
    for path in sorted(HERE.glob("*")):
        if path.suffix in (".keras", ".h5") or path.is_dir() and path.name != "__pycache__":
            size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")))
            print(f"{path.name:32s} {size / 1024:7.1f} KiB")


if __name__ == "__main__":
    main()
