"""Fixtures: networks with closed-form derivatives, saved in every format derivcli reads."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest
from typer.testing import CliRunner

from derivcli.cli import app
from derivcli.models import import_tensorflow

from closed_forms import OneLayerNet

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
FORMATS = ["keras", "h5", "export", "tf_saved_model", "keras2_h5", "keras2_savedmodel"]


def keras3_model(net: OneLayerNet, input_names: list[str] | None = None, dtype: str = "float32"):
    """The Keras 3 model of `net`; several named 1-feature inputs when `input_names` is given."""
    import keras

    dimension, hidden = net.kernel.shape
    if input_names:
        inputs = [keras.Input((1,), name=name, dtype=dtype) for name in input_names]
        joined = keras.layers.Concatenate()(inputs)
    else:
        inputs = keras.Input((dimension,), name="x", dtype=dtype)
        joined = inputs
    hidden_layer = keras.layers.Dense(hidden, activation=net.activation, name="hidden", dtype=dtype)
    out = keras.layers.Dense(net.head.shape[1], name="out", dtype=dtype)
    model = keras.Model(inputs, out(hidden_layer(joined)))
    model.set_weights(net.weights(dtype))
    return model


def keras2_model(net: OneLayerNet):
    """The same network written with Keras 2 (tf_keras), as older projects saved it."""
    import tf_keras

    dimension, hidden = net.kernel.shape
    model = tf_keras.Sequential([
        tf_keras.layers.Dense(hidden, activation=net.activation, input_shape=(dimension,)),
        tf_keras.layers.Dense(net.head.shape[1]),
    ])
    model.set_weights(net.weights())
    return model


def save(net: OneLayerNet, form: str, folder: Path, input_names: list[str] | None = None) -> Path:
    """Saves `net` in the format `form` under `folder`; returns the path to give derivcli."""
    tf = import_tensorflow()
    folder.mkdir(parents=True, exist_ok=True)
    if form.startswith("keras2"):
        model = keras2_model(net)
        path = folder / ("model.h5" if form == "keras2_h5" else "savedmodel")
        if form == "keras2_h5":
            model.save(path)
        else:
            model.save(path, save_format="tf")
        return path
    model = keras3_model(net, input_names)
    if form == "keras":
        path = folder / "model.keras"
        model.save(path)
    elif form == "h5":
        path = folder / "model.h5"
        model.save(path)
    elif form == "export":
        path = folder / "exported"
        model.export(path, verbose=False)
    elif form == "tf_saved_model":
        path = folder / "tf_saved"
        tf.saved_model.save(model, str(path))
    else:
        raise ValueError(form)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[OneLayerNet, Path]]:
    """Makes (and caches) a saved network: factory(activation, inputs, outputs, form)."""
    cache: dict[tuple, tuple[OneLayerNet, Path]] = {}

    def factory(activation: str = "tanh", inputs: int = 2, outputs: int = 1, form: str = "keras",
                input_names: tuple[str, ...] | None = None) -> tuple[OneLayerNet, Path]:
        key = (activation, inputs, outputs, form, input_names)
        if key not in cache:
            net = OneLayerNet.random(activation, inputs, outputs, seed=inputs * 10 + outputs)
            folder = tmp_path_factory.mktemp(f"{activation}_{inputs}_{outputs}_{form}")
            cache[key] = (net, save(net, form, folder, list(input_names) if input_names else None))
        return cache[key]

    return factory


@pytest.fixture()
def cli() -> Callable[..., object]:
    """Runs derivcli in-process; returns the CliRunner result."""
    runner = CliRunner()

    def invoke(*args: object, input: str | bytes | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


def read_csv(text: str, delimiter: str = ",") -> dict[str, np.ndarray | list[str]]:
    """Columns of a CSV text; numeric columns as float64 arrays."""
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    header, body = rows[0], rows[1:]
    columns: dict[str, np.ndarray | list[str]] = {}
    for j, name in enumerate(header):
        cells = [row[j] for row in body]
        try:
            columns[name] = np.array(cells, dtype=np.float64)
        except ValueError:
            columns[name] = cells
    return columns


def derivcli_executable() -> str:
    """The installed `derivcli` beside the running Python."""
    return str(Path(sys.executable).parent / "derivcli")


def run_installed(*args: str, input: bytes | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """Runs the installed command in a subprocess."""
    return subprocess.run(
        [derivcli_executable(), *args], input=input, capture_output=True, timeout=timeout, cwd=ROOT
    )


def save_custom_model(folder: Path, source_text: str, class_name: str, dense_first: bool = False) -> tuple[Path, Path]:
    """Writes a custom-layer file, imports it, saves x -> [Dense ->] Layer as .keras.

    Returns:
        (the model's path, the Python file to pass with --custom-objects).
    """
    import importlib.util

    import keras

    source = folder / f"{class_name.lower()}_layer.py"
    source.write_text(source_text)
    spec = importlib.util.spec_from_file_location(source.stem, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = keras.Input((1,), name="x")
    hidden = keras.layers.Dense(1, name="scale", kernel_initializer="ones")(inputs) if dense_first else inputs
    path = folder / f"{class_name}.keras"
    keras.Model(inputs, getattr(module, class_name)(name=class_name.lower())(hidden)).save(path)
    return path, source


def run_in_pty(*args: str, columns: int = 80, lines: int = 24, stdout_pipe: bool = False,
               env: dict[str, str] | None = None, timeout: int = 180) -> tuple[int, str, str]:
    """Runs the installed command with a pseudo-terminal of `columns` x `lines` as its terminal.

    Standard error, and standard output unless `stdout_pipe`, are the terminal, as a person's shell
    gives them. Returns (status, what the terminal showed, standard output when piped).
    """
    import fcntl
    import select
    import struct
    import termios

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    process = subprocess.Popen(
        [derivcli_executable(), *args], stdin=subprocess.DEVNULL, stderr=follower,
        stdout=subprocess.PIPE if stdout_pipe else follower, cwd=ROOT,
        env={**os.environ, "TERM": "xterm-256color", **(env or {})},
    )
    os.close(follower)
    shown = bytearray()
    piped = bytearray()
    streams = [leader] + ([process.stdout.fileno()] if stdout_pipe else [])
    while streams:
        ready, _, _ = select.select(streams, [], [], timeout)
        if not ready:
            process.kill()
            raise TimeoutError(f"derivcli {' '.join(args)} ran over {timeout} s")
        for stream in ready:
            try:
                data = os.read(stream, 1 << 16)
            except OSError:  # the terminal's other end closed (Linux: EIO)
                data = b""
            if not data:
                streams.remove(stream)
            elif stream == leader:
                shown += data
            else:
                piped += data
    os.close(leader)
    return process.wait(), shown.decode("utf-8", "replace"), piped.decode("utf-8", "replace")
