"""Integrated Gradients of an image classifier's top class, whole commands, side by side.

Workload (issue 26): a 28x28x1 CNN (two conv layers, a dense head, softmax), 512 images in an NPZ,
50 Gauss-Legendre steps from a zero baseline. derivcli:

    derivcli attribute cnn.keras --npz images.npz --target top --steps 50 -o derivcli.npz

against the best a TensorFlow user writes by hand: a script that loads the same .keras file and NPZ,
picks each image's top class, folds the 50 steps into the batch (images x steps rows) and runs one
`tf.function(jit_compile=True)` GradientTape over them, batch after batch. Where PyTorch and Captum
are installed (`pip install torch` first, then the `captum` extra: not part of `make test`), also
Captum's IntegratedGradients (`method="gausslegendre"`, 50 steps, 8 images x 50 rows at a time) on
the same .keras file loaded by Keras's torch backend. All are timed as whole processes, best of
`--rounds` alternating rounds; the attributions are compared.

    .venv/bin/python bench/bench_attribution.py [--images 512] [--rounds 3]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_images import side_by_side  # noqa: E402  (the same CNN, images and rounds)

HAND_WRITTEN = '''
import sys
import numpy as np
import keras
import tensorflow as tf

model = keras.models.load_model(sys.argv[1], compile=False)
images = np.load(sys.argv[2])["image"]
steps = 50
nodes, weights = np.polynomial.legendre.leggauss(steps)
alphas = tf.constant((nodes + 1) / 2, tf.float32)
weights = tf.constant(weights / 2, tf.float32)
per_batch = 8  # images per batch: 8 x 50 = 400 rows

@tf.function(jit_compile=True)
def integrated(x):
    top = tf.argmax(model(x, training=False), axis=1, output_type=tf.int32)
    rows = alphas[None, :, None, None, None] * x[:, None]                      # (images, steps, 28, 28, 1)
    flat = tf.reshape(rows, (-1, 28, 28, 1))
    with tf.GradientTape() as tape:
        tape.watch(flat)
        y = model(flat, training=False)
        picked = tf.gather(y, tf.repeat(top, steps), axis=1, batch_dims=1)
    gradients = tf.reshape(tape.gradient(picked, flat), (-1, steps, 28, 28, 1))
    return top, x * tf.einsum("k,nkhwc->nhwc", weights, gradients)

parts = [integrated(tf.constant(images[i:i + per_batch])) for i in range(0, len(images), per_batch)]
np.savez(sys.argv[3], target=np.concatenate([p[0].numpy() for p in parts]),
         attribution=np.concatenate([p[1].numpy() for p in parts]))
'''


CAPTUM = '''
import os
import sys

os.environ["KERAS_BACKEND"] = "torch"
import keras
import numpy as np
import torch
from captum.attr import IntegratedGradients

model = keras.models.load_model(sys.argv[1], compile=False)
images = torch.from_numpy(np.load(sys.argv[2])["image"])
per_batch = 8  # images per batch: 8 x 50 = 400 rows, as the hand-written script
with torch.no_grad():
    top = torch.cat([model(images[i:i + 512], training=False).argmax(1) for i in range(0, len(images), 512)])
integrated = IntegratedGradients(lambda x: model(x, training=False))
parts = [integrated.attribute(images[i:i + per_batch], baselines=torch.zeros_like(images[i:i + per_batch]),
                              target=top[i:i + per_batch], n_steps=50, method="gausslegendre").detach().numpy()
         for i in range(0, len(images), per_batch)]
np.savez(sys.argv[3], target=top.numpy(), attribution=np.concatenate(parts))
'''


def captum_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "captum"))


def main() -> None:
    others = {"with_captum": CAPTUM} if captum_installed() else {}  # not captum.py: it would shadow the package
    with side_by_side(__doc__, 512, ["attribute", "--target", "top", "--steps", "50"], HAND_WRITTEN, others) \
            as (options, times, folder):  # noqa: SIM117 (the second reads files the first makes)
        agreeing = {}
        with np.load(folder / "derivcli.npz") as ours_file:
            for name in ["hand", *others]:
                with np.load(folder / f"{name}.npz") as theirs_file:
                    same_class = ours_file["target"] == theirs_file["target"]
                    scale = np.abs(theirs_file["attribution"]).max()
                    per_image = np.abs(ours_file["attr(y)/x"] - theirs_file["attribution"]).reshape(
                        options.images, -1).max(1)
                    agreeing[name] = int(((per_image / scale <= 1e-4) & same_class).sum())
    best = {name: min(values) for name, values in times.items()}
    print(f"integrated gradients, 50 Gauss-Legendre steps, top class of a 28x28x1 CNN, {options.images:,} images "
          f"from NPZ, whole commands, best of {options.rounds}")
    print(f"{'against':>18} {'derivcli s':>11} {'their s':>9} {'ratio':>8} {'images within 1e-4':>20}")
    for name, label in [("hand", "hand-written XLA"), *(("with_captum", "Captum (torch)") for _ in others)]:
        print(f"{label:>18} {best['derivcli']:11.2f} {best[name]:9.2f} {best['derivcli'] / best[name]:7.2f}x "
              f"{agreeing[name]:>12,} of {options.images:,}")
    if not others:
        print("(Captum: not installed; `pip install torch` and the `captum` extra add it)")
    print("all rounds: " + ", ".join(f"{name} " + " ".join(f"{t:.2f}" for t in values) for name, values in times.items()))


if __name__ == "__main__":
    main()
