"""The gradient of an image classifier's top class, whole commands, side by side.

Workload (issue 24): a 28x28x1 CNN (two conv layers, a dense head, softmax), 10,000 images in an
NPZ. derivcli:

    derivcli grad cnn.keras --npz images.npz --target top -o derivcli.npz

against the best a TensorFlow user writes by hand: a script that loads the same .keras file and
the same NPZ, and runs a `tf.function(jit_compile=True)` GradientTape of the top class over
batches, saving the gradients. Both are timed as whole processes (Python, TensorFlow's import,
loading, computing, writing), best of `--rounds` alternating rounds; the gradients are compared.

    .venv/bin/python bench/bench_images.py [--images 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HAND_WRITTEN = '''
import sys
import numpy as np
import keras
import tensorflow as tf

model = keras.models.load_model(sys.argv[1], compile=False)
images = np.load(sys.argv[2])["image"]

@tf.function(jit_compile=True)
def top_gradient(x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=False)
        top = tf.argmax(y, axis=1, output_type=tf.int32)
        picked = tf.gather(y, top, axis=1, batch_dims=1)
    return picked, top, tape.gradient(picked, x)

batch = 4096
parts = [top_gradient(tf.constant(images[i:i + batch])) for i in range(0, len(images), batch)]
np.savez(sys.argv[3], y=np.concatenate([p[0].numpy() for p in parts]),
         target=np.concatenate([p[1].numpy() for p in parts]),
         gradient=np.concatenate([p[2].numpy() for p in parts]))
'''


def build(folder: Path, count: int) -> tuple[Path, Path]:
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((28, 28, 1), name="image")
    hidden = keras.layers.Conv2D(8, 3, activation="relu")(image)
    hidden = keras.layers.MaxPooling2D(2)(hidden)
    hidden = keras.layers.Conv2D(16, 3, activation="relu")(hidden)
    hidden = keras.layers.MaxPooling2D(2)(hidden)
    hidden = keras.layers.Dense(64, activation="relu")(keras.layers.Flatten()(hidden))
    outputs = keras.layers.Dense(10, activation="softmax")(hidden)
    keras.Model(image, outputs).save(folder / "cnn.keras")
    images = np.random.default_rng(0).uniform(0, 1, (count, 28, 28, 1)).astype(np.float32)
    np.savez(folder / "images.npz", image=images)
    return folder / "cnn.keras", folder / "images.npz"


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])}… failed: {done.stderr[-500:]}")
    return time.perf_counter() - started


def alternate(commands: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    """Each command's whole-process times over `rounds` rounds, their order swapped every other round."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    order = list(commands.items())
    for round_number in range(rounds):
        for name, command in order if round_number % 2 == 0 else order[::-1]:
            times[name].append(timed(command))
    return times


@contextlib.contextmanager
def side_by_side(description: str, default_images: int, derivcli_arguments: list[str], hand_written: str,
                 other_scripts: dict[str, str] | None = None) -> Iterator[tuple[argparse.Namespace, dict[str, list[float]], Path]]:
    """Builds the CNN and images, times `derivcli COMMAND cnn.keras --npz images.npz ARGUMENTS -o derivcli.npz`
    against the hand-written script (writing hand.npz) and any `other_scripts` (each writing NAME.npz), and yields
    (options, times, the folder of the files)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=default_images)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    derivcli = str(Path(sys.executable).parent / "derivcli")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model, images = build(folder, options.images)
        script = folder / "hand_written.py"
        script.write_text(hand_written)
        command, *rest = derivcli_arguments
        ours = [derivcli, command, str(model), "--npz", str(images), *rest, "-q", "-o", str(folder / "derivcli.npz")]
        commands = {"derivcli": ours, "hand": [sys.executable, str(script), str(model), str(images), str(folder / "hand.npz")]}
        for name, text in (other_scripts or {}).items():
            (folder / f"{name}.py").write_text(text)
            commands[name] = [sys.executable, str(folder / f"{name}.py"), str(model), str(images), str(folder / f"{name}.npz")]
        yield options, alternate(commands, options.rounds), folder


def main() -> None:
    with side_by_side(__doc__, 10_000, ["grad", "--target", "top"], HAND_WRITTEN) as (options, times, folder):  # noqa: SIM117 (the files of the first)
        with np.load(folder / "derivcli.npz") as ours_file, np.load(folder / "hand.npz") as theirs_file:
            assert np.array_equal(ours_file["target"], theirs_file["target"])
            scale = np.abs(theirs_file["gradient"]).max()
            per_image = np.abs(ours_file["dy/dx"] - theirs_file["gradient"]).reshape(options.images, -1).max(1) / scale
            # A relu pre-activation within round-off of 0 can take the other branch under XLA's fused sums:
            # those images' gradients differ by a whole term, the others by float32 round-off.
            agreeing = per_image <= 1e-5
            difference = per_image[agreeing].max(initial=0.0)
    best = {name: min(values) for name, values in times.items()}
    print(f"grad of the top class, 28x28x1 CNN (2 conv, dense head), {options.images:,} images from NPZ, "
          f"whole commands, best of {options.rounds}")
    print(f"{'derivcli s':>12} {'hand-written XLA s':>20} {'ratio':>8} {'images within 1e-5':>20} "
          f"{'their max rel. difference':>26}")
    print(f"{best['derivcli']:12.2f} {best['hand']:20.2f} {best['derivcli'] / best['hand']:7.2f}x "
          f"{int(agreeing.sum()):>12,} of {options.images:,} {difference:26.2e}")
    print("all rounds: " + ", ".join(f"{name} " + " ".join(f"{t:.2f}" for t in values) for name, values in times.items()))


if __name__ == "__main__":
    main()
