"""Real architectures, whole commands, side by side (issue 32).

keras.applications networks with random weights (EfficientNetB0 and ConvNeXtTiny by default), at
64x64x3 (`--size 224` for full size), N images in an NPZ. Two workloads, each against what a
TensorFlow user writes by hand on the same .keras file and NPZ:

    derivcli grad MODEL --npz images.npz --target top -o derivcli.npz
        against: load, one eager GradientTape of the top class, np.savez

    derivcli attribute MODEL --npz images.npz --target top --steps 32 -o derivcli.npz
        against: load, integrated gradients by 32 Gauss-Legendre nodes from zero, every image's path rows in one
        eager GradientTape a batch, np.savez

Whole processes (Python, TensorFlow's import, loading, computing, writing), best of `--rounds`
alternating rounds; the results are compared.

    .venv/bin/python bench/bench_applications.py [--models EfficientNetB0,ConvNeXtTiny] [--size 64] [--images 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_images import alternate

GRADIENT = '''
import sys
import numpy as np
import keras
import tensorflow as tf

model = keras.models.load_model(sys.argv[1], compile=False)
x = tf.constant(np.load(sys.argv[2])["x"])
with tf.GradientTape() as tape:
    tape.watch(x)
    y = model(x, training=False)
    top = tf.argmax(y, axis=1, output_type=tf.int32)
    picked = tf.gather(y, top, axis=1, batch_dims=1)
np.savez(sys.argv[3], y=picked.numpy(), target=top.numpy(), gradient=tape.gradient(picked, x).numpy())
'''

INTEGRATED_GRADIENTS = '''
import sys
import numpy as np
import keras
import tensorflow as tf

steps = int(sys.argv[4])
model = keras.models.load_model(sys.argv[1], compile=False)
images = np.load(sys.argv[2])["x"]
nodes, weights = np.polynomial.legendre.leggauss(steps)
alphas, weights = (nodes + 1) / 2, weights / 2
top = np.argmax(model(images, training=False).numpy(), axis=1)
per_batch = max(1, 256 // steps)  # images whose path rows go in one batch
attributions = []
for low in range(0, len(images), per_batch):
    part = images[low:low + per_batch]
    rows = tf.constant((alphas[None, :, None, None, None] * part[:, None]).reshape(-1, *part.shape[1:]), tf.float32)
    classes = tf.constant(np.repeat(top[low:low + per_batch], steps), tf.int32)
    with tf.GradientTape() as tape:
        tape.watch(rows)
        picked = tf.gather(model(rows, training=False), classes, axis=1, batch_dims=1)
    gradient = tape.gradient(picked, rows).numpy().reshape(len(part), steps, *part.shape[1:])
    attributions.append(part * np.tensordot(weights, gradient, axes=(0, 1)).astype(np.float32))
np.savez(sys.argv[3], attribution=np.concatenate(attributions), target=top)
'''


def build(folder: Path, name: str, size: int, count: int) -> tuple[Path, Path]:
    import keras

    keras.utils.set_random_seed(0)
    getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10).save(folder / "m.keras")
    images = np.random.default_rng(0).uniform(0, 255, (count, size, size, 3)).astype(np.float32)
    np.savez(folder / "images.npz", x=images)
    return folder / "m.keras", folder / "images.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="EfficientNetB0,ConvNeXtTiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    derivcli = str(Path(sys.executable).parent / "derivcli")
    print(f"{options.images} images of {options.size}x{options.size}x3, best of {options.rounds} rounds, whole processes")
    print(f"{'network':<16} {'workload':<22} {'derivcli s':>10} {'by hand s':>10} {'ratio':>6}  agreement")
    for name in options.models.split(","):
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            model, images = build(folder, name, options.size, options.images)
            for workload, script, command, extra in (
                    ("grad --target top", GRADIENT, ["grad"], []),
                    (f"attribute IG {options.steps} steps", INTEGRATED_GRADIENTS,
                     ["attribute", "--steps", str(options.steps)], [str(options.steps)])):
                (folder / "hand.py").write_text(script)
                times = alternate({
                    "derivcli": [derivcli, *command, str(model), "--npz", str(images), "--target", "top", "-q",
                                 "-o", str(folder / "derivcli.npz")],
                    "hand": [sys.executable, str(folder / "hand.py"), str(model), str(images),
                             str(folder / "hand.npz"), *extra]}, options.rounds)
                with np.load(folder / "derivcli.npz") as ours, np.load(folder / "hand.npz") as theirs:
                    key = "dy/dx" if "dy/dx" in ours else "attr(y)/x"
                    reference = theirs["gradient" if key == "dy/dx" else "attribution"]
                    agreement = np.abs(ours[key] - reference).max() / np.abs(reference).max()
                    same_classes = np.array_equal(ours["target"], theirs["target"])
                ours_best, theirs_best = min(times["derivcli"]), min(times["hand"])
                print(f"{name:<16} {workload:<22} {ours_best:>10.1f} {theirs_best:>10.1f} {ours_best / theirs_best:>5.2f}x"
                      f"  {agreement:.1e} of max{'' if same_classes else ' (other classes picked)'}", flush=True)


if __name__ == "__main__":
    main()
