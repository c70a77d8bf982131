"""Loading saved Keras models, naming their inputs and outputs, dtype promotion.

Everything that knows about Keras files lives here. A loaded model becomes a
`LoadedModel`: one function from a (batch, inputs) tensor of coordinates to a
(batch, outputs) tensor of values, whatever the file held (a `.keras` or `.h5`
Keras model, or the serving signature of a SavedModel), plus the names the
command line uses for its coordinates and outputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from derivcli.errors import RunError, UsageError
from derivcli.naming import coordinate_names, output_names, summarized

LOAD_HINT = "derivcli reads .keras files, .h5/.hdf5 files and SavedModel directories"


@dataclass
class TensorInfo:
    """One input or output of a model: its name, shape without the batch axis, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class LoadedModel:
    """A model ready to differentiate.

    Attributes:
        path: where it was loaded from.
        kind: `keras` (a Keras model object) or `saved_model` (a serving signature; in float64, its
            graph widened by `engine.graph.promote_to_float64`).
        inputs / outputs: the model's own inputs and outputs.
        coordinate_names: one name per scalar input, in model order.
        output_names: one name per scalar output, flattened in order.
        dtype: the compute dtype, `float32` or `float64`.
        keras_model: the Keras model when `kind == "keras"`.
        signature: the concrete serving function when `kind == "saved_model"`.
        saved_object: the restored SavedModel object, which owns the signature's variables.
    """

    path: str
    kind: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    coordinate_names: list[str]
    output_names: list[str]
    dtype: str
    keras_model: Any = None
    signature: Any = None
    saved_object: Any = None
    signature_input_keys: list[str] = field(default_factory=list)
    signature_output_keys: list[str] = field(default_factory=list)
    # --logits on a SavedModel: its frozen graph with the final squash left out, (batch, inputs) -> (batch, outputs).
    logits_graph: Any = None
    target: str | int | None = None  # --target: "top", an output index, or a label input's name; outputs y, target
    target_classes: int = 0  # with --target: the output elements the index picks among
    input_names: list[str] | None = None  # --names given one per input: the inputs' new names
    live: bool = False  # a model being trained (`in_training`): its frozen graph reads the variables on every run
    _frozen: Any = None

    @property
    def index_outputs(self) -> set[int]:
        """Outputs that are indices, not values of the function (`target`): never differentiated."""
        return {1} if self.target is not None else set()

    @property
    def label_input(self) -> bool:
        """`--target NAME`: the last input is the labels' column, an index held like a token id."""
        return isinstance(self.target, str) and self.target != "top"

    @property
    def model_inputs(self) -> list[TensorInfo]:
        """The inputs the model itself takes (without `--target NAME`'s labels)."""
        return self.inputs[:-1] if self.label_input else self.inputs

    @property
    def index_bounds(self) -> dict[int, int]:
        """Held coordinates that index the outputs (`--target NAME`'s labels), by position, with the outputs' count."""
        return {len(self.coordinate_names) - 1: self.target_classes} if self.label_input else {}

    @property
    def discrete_positions(self) -> dict[int, str]:
        """The coordinates of integer and boolean inputs (token ids, categories), by position, with their dtype:
        held at their values, never differentiated."""
        held, start = {}, 0
        for info in self.inputs:
            if is_discrete(info.dtype):
                held.update({position: info.dtype for position in range(start, start + info.size)})
            start += info.size
        return held

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """The inputs as (name, shape without the batch axis): what an NPZ of points in the model's shapes holds
        (by the names `--names` gave the inputs, if it named them whole)."""
        names = (self.input_names or [])[:len(self.inputs)]
        return [(names[k] if k < len(names) else info.name, info.shape) for k, info in enumerate(self.inputs)]

    @property
    def parameter_count(self) -> int:
        """The number of scalar weights."""
        if self.kind == "keras":
            return int(self.keras_model.count_params())
        return int(sum(v.shape.num_elements() for v in getattr(self.saved_object, "variables", [])))

    def call_flat(self, coordinates: Any) -> Any:
        """Evaluates the model on a (batch, inputs) tensor; returns (batch, outputs).

        Traceable inside `tf.function`; derivatives flow through it.
        """
        import tensorflow as tf

        if self.kind == "saved_model" and self.dtype == "float64":
            return self._frozen(coordinates)  # the signature's graph widened to float64, --target in it
        # A model in training is differentiated as it computes, its constants as Keras makes them;
        # a file's model evaluated in float64 (`--dtype float64`) has every constant in float64.
        with contextlib.nullcontext() if self.live else exact_constants(self.dtype):
            values = self._call_flat(coordinates, tf)
        if self.label_input:
            return targeted(values, tf.cast(coordinates[:, -1], tf.int32), tf)
        return values if self.target is None else targeted(values, self.target, tf)

    def untargeted(self) -> LoadedModel:
        """The model without `--target top`'s pick: every output element, `y0 ...` (attribution picks each point's
        class once, at the point, and keeps it along the path)."""
        import dataclasses

        whole = dataclasses.replace(self, target=None, target_classes=0, _frozen=None,
                                    output_names=[f"y{i}" for i in range(self.target_classes)])
        if whole.kind == "saved_model" and whole.dtype == "float64":
            whole = _widened(dataclasses.replace(whole, dtype="float32"))
        return whole

    def frozen(self) -> Any:
        """The model as a frozen graph rewritten to differentiate its function (`engine.graph.freeze`), made once."""
        if self._frozen is None:
            from derivcli.engine.graph import freeze

            self._frozen = freeze(self.call_flat, len(self.coordinate_names), self.dtype, live=self.live)
        return self._frozen

    def _call_flat(self, coordinates: Any, tf: Any) -> Any:
        pieces, start = [], 0
        for info in self.model_inputs:
            piece = coordinates[:, start : start + info.size]
            pieces.append(tf.reshape(piece, (-1, *info.shape)))
            start += info.size
        if self.kind == "keras":
            # Token ids and categories reach the model in their own dtype, as whole numbers (`points_in_dtype`).
            pieces = [tf.cast(piece, info.dtype) if is_discrete(info.dtype) else piece
                      for piece, info in zip(pieces, self.model_inputs)]
            arguments = pieces[0] if len(pieces) == 1 else pieces
            results = tf.nest.flatten(self.keras_model(arguments, training=False))
        elif self.logits_graph is not None:
            return tf.cast(self.logits_graph(coordinates[:, :sum(info.size for info in self.model_inputs)]), self.dtype)
        else:
            by_key = {
                key: tf.cast(piece, self.signature.structured_input_signature[1][key].dtype)
                for key, piece in zip(self.signature_input_keys, pieces)
            }
            returned = self.signature(**by_key)
            results = [returned[key] for key in self.signature_output_keys]
        # Each output's size is known: a shape computed from the values would be one XLA needs as a constant, and a
        # jit_compile training step that updates the variables would then compile anew on every call.
        flat = [tf.reshape(tf.cast(r, self.dtype), (-1, info.size)) for r, info in zip(results, self.outputs)]
        return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)


@contextlib.contextmanager
def exact_constants(dtype: str) -> Iterator[None]:
    """While a float64 model is built or traced, numbers written in code become float64 constants.

    TensorFlow and Keras turn Python numbers into float32 tensors before casting
    them: gelu's 1/sqrt(2) and 0.044715 (`tf.cast(0.044715, x.dtype)`), the
    MultiHeadAttention scale, Rescaling's scale and offset, Normalization's mean
    and variance; LeakyRelu keeps its slope in a 32-bit attribute. In float64
    each would be off by a float32 rounding (1e-8 relative). Within this scope
    such numbers are converted straight to the target dtype, and leaky relu is
    computed with a float64 slope. Nothing changes for float32.
    """
    if dtype != "float64":
        yield
        return
    import keras
    import keras.src.backend as keras_backend
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.ops import math_ops

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)

    def python_floats(value: Any) -> bool:
        if isinstance(value, float):
            return True
        if isinstance(value, (list, tuple)) and value:
            return all(isinstance(v, (int, float)) or python_floats(v) for v in value) and any(
                isinstance(v, float) or python_floats(v) for v in value)
        return False

    cast, keras_convert, leaky_relu = math_ops.cast, keras_backend.core.convert_to_tensor, tf.nn.leaky_relu

    def exact_cast(x: Any, dtype: Any, name: Any = None) -> Any:
        if is_number(x) and tf.as_dtype(dtype).is_floating:
            return tf.constant(float(x), tf.as_dtype(dtype), name=name)
        return cast(x, dtype, name=name)

    def exact_convert(x: Any, dtype: Any = None, sparse: Any = None, ragged: Any = None) -> Any:
        if dtype is None and python_floats(x):
            dtype = "float64"
        return keras_convert(x, dtype=dtype, sparse=sparse, ragged=ragged)

    def exact_leaky_relu(features: Any, alpha: float = 0.2, name: Any = None) -> Any:
        features = tf.convert_to_tensor(features)
        if features.dtype != tf.float64:
            return leaky_relu(features, alpha=alpha, name=name)
        return tf.where(features > 0, features, features * tf.constant(float(alpha), tf.float64))

    floatx = keras.config.floatx()
    patches = [(math_ops, "cast", exact_cast), (tf, "cast", exact_cast), (tf.dtypes, "cast", exact_cast),
               (keras_backend.core, "convert_to_tensor", exact_convert), (tf.nn, "leaky_relu", exact_leaky_relu)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        keras.config.set_floatx("float64")
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
        keras.config.set_floatx(floatx)


# Packages TensorFlow and Keras import at start-up, if installed, for features derivcli never uses.
HIDDEN_AT_IMPORT = ("matplotlib", "matplotlib.pyplot", "jax")


def targeted(values: Any, target: Any, tf: Any) -> Any:
    """(batch, 2): the output element `target` picks at each point (the largest for `top`), and its index.

    `target` is "top", an index, or a tensor of indices, one per point (`--target NAME`'s labels).
    The index is piecewise constant in the point, so the picked value's derivatives are that
    element's (where two elements tie for the largest, the first is taken, as `argmax` does).
    """
    if isinstance(target, str):
        index = tf.argmax(values, axis=1, output_type=tf.int32)
    elif not isinstance(target, int):
        index = target
    else:
        index = tf.fill(tf.shape(values)[:1], tf.constant(int(target), tf.int32))
    picked = tf.gather(values, index, axis=1, batch_dims=1)
    return tf.stack([picked, tf.stop_gradient(tf.cast(index, values.dtype))], axis=1)


def without_final_squash(model: Any, path: Path) -> Any:
    """`--logits`: the model with a final softmax or sigmoid left out, on each output that ends in one.

    The squash may be a layer's activation (Dense(10, activation="softmax")), an `Activation`
    layer or a `Softmax` layer. The layer whose activation it is is rebuilt with a linear one,
    sharing its weights.

    Raises:
        UsageError: no output ends in a softmax or sigmoid.
    """
    import keras

    outputs, found = [], []
    for tensor in model.outputs:
        layer = tensor._keras_history.operation
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        squashes = isinstance(layer, keras.layers.Softmax) or activation in ("softmax", "sigmoid")
        if squashes and isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
            outputs.append(layer.input)
        elif squashes:
            config = {**layer.get_config(), "activation": "linear"}
            linear = type(layer).from_config(config)
            linear.build(layer.input.shape)
            linear.set_weights(layer.get_weights())
            outputs.append(linear(layer.input))
        else:
            outputs.append(tensor)
        if squashes:
            found.append(layer.name)
    if not found:
        last = ", ".join(f"{t._keras_history.operation.name} ({type(t._keras_history.operation).__name__})"
                         for t in model.outputs)
        raise UsageError(f"--logits: {path} ends in no softmax or sigmoid to leave out (its output layers: {last})")
    return keras.Model(model.inputs, outputs[0] if len(outputs) == 1 else outputs)


def is_discrete(dtype: str) -> bool:
    """Whether an input of this dtype holds integers or booleans (token ids, categories), not real numbers."""
    return dtype.startswith(("int", "uint")) or dtype == "bool"


def import_tensorflow() -> Any:
    """Imports TensorFlow with its start-up chatter silenced.

    TensorFlow's C++ start-up logs go to file descriptor 2 before Python can
    configure them, so standard error is pointed at /dev/null for the import.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # derivcli differentiates with TensorFlow: a KERAS_BACKEND=jax (or torch) in the user's
    # environment must not decide which backend loads the model.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    saved = os.dup(2)
    # Keras imports matplotlib.pyplot at start-up, if installed, for image-gallery helpers
    # that derivcli never calls: 0.2 s of every run. TensorFlow Lite's converter imports JAX,
    # if installed, to convert JAX functions: 0.35 s. Hidden during the import, both take
    # them for absent; `derivcli.plots` imports matplotlib for real when a picture is drawn.
    hidden = {name: sys.modules.get(name) for name in HIDDEN_AT_IMPORT if name not in sys.modules}
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.modules.update(dict.fromkeys(hidden))  # None: "import matplotlib" raises ImportError
        import keras  # noqa: F401  (loaded here too, behind the same silence)
        import tensorflow as tf
    finally:
        for name in hidden:
            if sys.modules.get(name) is None:
                sys.modules.pop(name, None)
        os.dup2(saved, 2)
        os.close(saved)
    import logging

    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    return tf


def load_custom_objects(paths: Sequence[str]) -> dict[str, Any]:
    """Runs each `--custom-objects` file and collects the classes it provides.

    A file provides its `CUSTOM_OBJECTS` dict if it has one, and every Keras
    class it defines; classes it registers with
    `keras.saving.register_keras_serializable` are found by Keras itself.

    Raises:
        RunError: a file is missing or raises while it runs.
    """
    import keras

    objects: dict[str, Any] = {}
    for number, path in enumerate(paths):
        if not Path(path).is_file():
            raise RunError(f"--custom-objects {path}: no such file")
        if Path(path).suffix != ".py":
            raise UsageError(f"--custom-objects {path}: expected a Python file (.py) that defines the model's "
                             "custom classes or a CUSTOM_OBJECTS dict")
        spec = importlib.util.spec_from_file_location(f"derivcli_custom_objects_{number}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # the user's code may raise anything
            raise RunError(
                f"--custom-objects {path}: running it raised {type(error).__name__}: {error}"
            ) from None
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, (keras.layers.Layer, keras.Model)):
                objects[name] = value
        objects.update(getattr(module, "CUSTOM_OBJECTS", {}))
    return objects


# A .keras archive of a model derivcli can differentiate is small: its weights are read into
# memory whole. Declared sizes above these are refused before anything is extracted.
MAX_ARCHIVE_BYTES = 4 << 30
MAX_CONFIG_BYTES = 64 << 20
MAX_ARCHIVE_MEMBERS = 10_000
# Keras stores a .keras archive's members uncompressed, and float weights barely compress (1.1:1);
# a member that inflates far beyond that is a zip bomb, which Keras would read into memory whole.
MAX_INFLATION = 20
INFLATION_CHECKED_FROM = 16 << 20
# A model's config nests a few dozen levels (a layer in a nested model in a model); Keras
# deserializes it recursively, so a deeper one is refused before it reaches Keras.
MAX_CONFIG_DEPTH = 200


def _check_archive(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuses a .keras zip whose members could escape, or whose declared sizes are absurd.

    Raises:
        RunError: an absolute, `..` or symbolic-link member; too many members; a declared
            uncompressed size (or config.json size) beyond the limits above.
    """
    members = archive.infolist()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise RunError(f"cannot load {path}: the archive has {len(members):,} members; a .keras model has a few")
    total = 0
    for member in members:
        name = member.filename
        if name.startswith(("/", "\\")) or ".." in Path(name).parts or (len(name) > 1 and name[1] == ":"):
            raise RunError(f"cannot load {path}: archive member {name!r} points outside the archive")
        if (member.external_attr >> 16) & 0o170000 == 0o120000:
            raise RunError(f"cannot load {path}: archive member {name!r} is a symbolic link")
        if name == "config.json" and member.file_size > MAX_CONFIG_BYTES:
            raise RunError(f"cannot load {path}: config.json declares {member.file_size:,} bytes; a model's "
                           f"configuration is far smaller (at most {MAX_CONFIG_BYTES >> 20} MiB)")
        if member.file_size > max(INFLATION_CHECKED_FROM, MAX_INFLATION * member.compress_size):
            raise RunError(
                f"cannot load {path}: archive member {name!r} inflates {member.compress_size:,} bytes to "
                f"{member.file_size:,} ({member.file_size // max(member.compress_size, 1):,}:1), far beyond what "
                "weights compress to; a zip bomb is refused (a model saved by Keras stores its members uncompressed)")
        total += member.file_size
    if total > MAX_ARCHIVE_BYTES:
        raise RunError(f"cannot load {path}: the archive declares {total:,} bytes uncompressed, more than "
                       f"{MAX_ARCHIVE_BYTES >> 30} GiB")


def _sniff(path: Path) -> str:
    """Tells the format of a model file or directory: keras, h5 or saved_model.

    Only regular files and directories are opened: a FIFO would block for ever, a device
    (/dev/zero) would be read without end.
    """
    if not (path.is_dir() or path.is_file()):
        raise RunError(f"cannot load {path}: not a regular file or a directory; {LOAD_HINT}")
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return "saved_model"
        raise RunError(f"cannot load {path}: a directory with no saved_model.pb is not a SavedModel; {LOAD_HINT}")
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if magic.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                _check_archive(path, archive)
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            raise RunError(f"cannot load {path}: a corrupt or truncated .keras file (its zip archive is unreadable)") from None
        if "config.json" not in names:
            raise RunError(f"cannot load {path}: a zip file with no config.json is not a .keras model; {LOAD_HINT}")
        return "keras"
    if magic == b"\x89HDF\r\n\x1a\n":
        return "h5"
    raise RunError(f"cannot load {path}: not a .keras (zip), HDF5 or SavedModel file; {LOAD_HINT}")


def _explain_keras_error(path: Path, error: Exception) -> RunError:
    """Turns a Keras loading exception into one line that says how to fix it."""
    text = str(error)
    missing = re.search(r"(?:Could not locate (?:class|function) |Unknown (?:layer|object)[^']*)'([^']+)'", text)
    if missing:
        return RunError(
            f"cannot load {path}: unknown class {missing.group(1)!r}; pass the Python file "
            "that defines it with --custom-objects FILE.py"
        )
    if "Lambda" in text and ("safe_mode" in text or "unsafe" in text.lower()):
        return RunError(
            f"cannot load {path}: it has a Lambda layer, whose Python code Keras will not run "
            "in safe mode; pass --unsafe if you trust the file"
        )
    if "No model config found" in text:
        return RunError(
            f"cannot load {path}: it holds weights only (saved with save_weights), not a model; save the whole "
            "model with model.save('model.keras'), or rebuild the model in Python and call load_weights"
        )
    return RunError(f"cannot load {path}: {keras_reason(text) or type(error).__name__}")


def keras_reason(text: str) -> str:
    """The sentences of a Keras error that say what is wrong, without its frame lines.

    Keras wraps a layer's error as "Exception encountered when calling X.call()",
    the reason (in ANSI bold), then "Arguments received by ..." and bullet lines.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    kept = [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith(("Arguments received", "•", "File ", "Traceback"))]
    framed = [line for line in kept if not line.startswith("Exception encountered")]
    reason = " ".join(framed or kept)
    return reason if len(reason) <= 400 else reason[:397] + "..."



def _shape(shape: Any) -> tuple[int, ...]:
    dims = tuple(shape)[1:]
    if any(d is None for d in dims):
        raise RunError(
            f"input or output shape {tuple(shape)} has an unknown size beyond the batch axis; "
            "derivcli needs fixed feature sizes"
        )
    return tuple(int(d) for d in dims)


def _layer_name(tensor: Any, name: str) -> str:
    """The name of the layer that makes `tensor` where Keras reports an internal one (Sequential: keras_tensor_2)."""
    if not name.startswith("keras_tensor"):
        return name
    layer = getattr(getattr(tensor, "_keras_history", None), "operation", None)
    return getattr(layer, "name", None) or name


def suggested_output_names(model: LoadedModel) -> list[str] | None:
    """`--output-names` from the output layers' names, when each output is one scalar named like an identifier."""
    import keyword

    names = [info.name for info in model.outputs]
    # A name the user chose for what the output is (u, pressure), not a generic one (out, output) or Keras's own.
    generic = {"out", "output", "outputs", "pred", "prediction", "predictions", "logits", "y"}
    chosen = all(n.isidentifier() and not keyword.iskeyword(n) and n.lower() not in generic
                 and not _keras_default_name(model, n) for n in names)
    if all(info.size == 1 for info in model.outputs) and chosen and len(set(names)) == len(names) \
            and names != model.output_names:
        return names
    return None


def _keras_default_name(model: LoadedModel, name: str) -> bool:
    """Whether a layer's name is the one Keras made up (dense, dense_2), not one the user chose."""
    if model.kind != "keras":
        return False
    layer = next((layer for layer in model.keras_model.layers if layer.name == name), None)
    if layer is None:
        return False
    default = re.sub(r"(?<!^)(?=[A-Z])", "_", type(layer).__name__).lower()
    return re.fullmatch(re.escape(default) + r"(_\d+)?", name) is not None


def _keras_inputs_outputs(model: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise RunError(
            "the model has no defined inputs (a subclassed model that was never built); "
            "save a functional or Sequential model, or export a SavedModel with model.export()"
        )
    # An output tensor's own name is an internal counter (keras_tensor_5); the
    # layer that makes it has the name the user chose.
    output_layers = [_layer_name(t, name) for t, name in
                     zip(outputs, list(getattr(model, "output_names", None) or [t.name for t in outputs]))]
    return (
        [TensorInfo(t.name, _shape(t.shape), str(t.dtype)) for t in inputs],
        [TensorInfo(name, _shape(t.shape), str(t.dtype)) for name, t in zip(output_layers, outputs)],
    )


def _rebuilt(model: Any, custom_objects: dict[str, Any], safe_mode: bool, dtype: str) -> Any:
    """The same model rebuilt from its config for differentiation: float64 layers in float64, loops unrolled.

    - In float64 the layers compute in double precision and the weights are cast,
      not retrained: the same function as the float32 model, in double precision.
    - Recurrent layers (LSTM, GRU, SimpleRNN) are rebuilt with `unroll=True`:
      the same function, as straight-line ops instead of a loop, which the
      Taylor engine covers and nested tapes differentiate without a loop per order.

    Returns:
        The rebuilt model, or `model` itself when nothing needs rebuilding.
    """
    import keras
    import numpy as np

    changed = False

    def transform(node: Any) -> Any:
        nonlocal changed
        if isinstance(node, dict):
            if dtype == "float64" and node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
                changed = True
                return {**node, "config": {**node["config"], "name": "float64"}}
            result = {}
            for key, value in node.items():
                if key == "dtype" and dtype == "float64" and value in ("float32", "float16", "bfloat16"):
                    changed, value = True, "float64"
                elif key == "unroll" and value is False and not node.get("stateful", False):
                    changed, value = True, True
                else:
                    value = transform(value)
                result[key] = value
            return result
        if isinstance(node, list):
            return [transform(v) for v in node]
        return node

    config = transform(keras.saving.serialize_keras_object(model))
    if not changed:
        return model
    with keras.saving.custom_object_scope(custom_objects), exact_constants(dtype):
        rebuilt = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
    rebuilt.set_weights(
        [w.astype(dtype) if np.issubdtype(w.dtype, np.floating) else w for w in model.get_weights()]
    )
    return rebuilt


def load_model(
    path: str,
    custom_objects_files: Sequence[str] = (),
    unsafe: bool = False,
    dtype: str = "float32",
    names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    target: str | int | None = None,
    logits: bool = False,
) -> LoadedModel:
    """Loads a saved model of any supported format.

    Args:
        path: a `.keras` or `.h5`/`.hdf5` file, or a SavedModel directory.
        custom_objects_files: Python files that define the model's custom classes.
        unsafe: allow Keras to run the Python code of `Lambda` layers.
        dtype: `float32`, or `float64` to evaluate in double precision.
        names: new names for the coordinates (`--names`), count must match.
        output_names: new names for the outputs (`--output-names`).
        target: `--target`: "top" or an output index; the model's outputs become `y` (that element) and `target`.
        logits: `--logits`: leave out a final softmax or sigmoid (Keras models).

    Returns:
        The loaded model.

    Raises:
        RunError: missing, corrupt or unsupported files; unknown custom classes.
        UsageError: `names` or `output_names` of the wrong length.
    """
    model_path = Path(path)
    if not model_path.exists():
        raise RunError(f"cannot load {path}: no such file or directory; {LOAD_HINT}")
    kind = _sniff(model_path)
    tf = import_tensorflow()
    if kind == "saved_model":
        if not unsafe:
            from derivcli.safety import check_saved_model

            check_saved_model(model_path)
        loaded = _load_saved_model(model_path, tf)
        if logits:
            _graph_without_final_squash(loaded)
        _rename_inputs(loaded, names)
        if target is not None:
            _set_target(loaded, target, output_names)
        if dtype == "float64":
            loaded = _widened(loaded)
    else:
        loaded = _load_keras(model_path, kind, custom_objects_files, unsafe, dtype, logits)
        _rename_inputs(loaded, names)
        if target is not None:
            _set_target(loaded, target, output_names)
    if target is None:
        loaded.output_names = _rename(loaded.output_names, output_names, "--output-names", "output")
    return loaded


def in_training(model: Any, names: Sequence[str] | None = None, new_output_names: Sequence[str] | None = None) -> LoadedModel:
    """A Keras model object, as it trains: derivatives of it read its variables on every run (`derivcli.training`).

    Its compute dtype is its first output's. Nothing is loaded from a file, so nothing is inspected.

    Raises:
        UsageError: `model` is not a built Keras model, computes in neither float32 nor float64, or `names`
            or `new_output_names` do not match it.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise UsageError(f"expected a keras.Model, received {type(model).__name__}")
    try:
        inputs, outputs = _keras_inputs_outputs(model)
    except RunError as error:
        raise UsageError(error.message) from None
    dtype = next((info.dtype for info in outputs if info.dtype.startswith("float")), keras.config.floatx())
    if dtype not in ("float32", "float64"):
        raise UsageError(f"the model computes in {dtype}; derivcli differentiates float32 and float64 models")
    loaded = LoadedModel(
        f"<{type(model).__name__} {model.name}>", "keras", inputs, outputs, coordinate_names(inputs),
        output_names(outputs), dtype, keras_model=model, live=True,
    )
    _rename_inputs(loaded, names)
    loaded.output_names = _rename(loaded.output_names, new_output_names, "outputs", "output")
    return loaded


def _graph_without_final_squash(model: LoadedModel) -> None:
    """`--logits` on a SavedModel: the signature's graph, frozen, with the softmax or sigmoid it ends in left out.

    Raises:
        UsageError: the graph's output does not end in a softmax or sigmoid.
    """
    from derivcli.engine.graph import freeze, without_final_squash

    frozen = freeze(model.call_flat, len(model.coordinate_names), model.dtype)
    graph, last = without_final_squash(frozen)
    if graph is None:
        raise UsageError(f"--logits: {model.path} ends in no softmax or sigmoid to leave out (its graph ends in {last})")
    model.logits_graph = graph


def _set_target(model: LoadedModel, target: str | int, output_names: Sequence[str] | None) -> None:
    """`--target`: one output element per point, `y`, with its index in `target` (`targeted`).

    Raises:
        UsageError: with --output-names, or an index beyond the outputs.
    """
    if output_names:
        raise UsageError("--target gives one output, y, and its index, target: leave out --output-names")
    if isinstance(target, int) and not 0 <= target < len(model.output_names):
        raise UsageError(f"--target {target}: the model has {len(model.output_names)} output elements "
                         f"(indices 0 to {len(model.output_names) - 1})")
    if isinstance(target, str) and target != "top":  # the labels: read with the points, held as an input
        if target in {*model.coordinate_names, *(name.partition("[")[0] for name in model.coordinate_names),
                      *(info.name for info in model.inputs), "y", "target"}:
            raise UsageError(f"--target {target}: {target!r} names an input or an output; the labels' column or "
                             "array needs a name of its own")
        model.inputs = [*model.inputs, TensorInfo(target, (), "int64")]
        model.coordinate_names = [*model.coordinate_names, target]
    model.target, model.target_classes = target, len(model.output_names)
    model.output_names = ["y", "target"]


def _rename_inputs(model: LoadedModel, names: Sequence[str] | None) -> None:
    """`--names`: one name per coordinate, or one per input (`--names image,feat` names a tensor input's
    elements `image[3,2,0]`, and its array in an NPZ or HDF5 of points)."""
    from derivcli.naming import element_names

    tensors = any(len(info.shape) >= 2 for info in model.inputs)
    if names is not None and tensors and len(names) == len(model.inputs) != len(model.coordinate_names):
        model.coordinate_names = [n for new, info in zip(names, model.inputs) for n in element_names(new, info.shape)]
        model.input_names = list(names)
        return
    if names is not None and tensors and len(names) != len(model.coordinate_names):
        raise UsageError(f"--names {','.join(names)}: {len(names)} name(s) for {len(model.coordinate_names)} input "
                         f"coordinates ({summarized(model.coordinate_names)}) or {len(model.inputs)} input(s) "
                         f"({', '.join(info.name for info in model.inputs)})")
    model.coordinate_names = _rename(model.coordinate_names, names, "--names", "input")


def _rename(current: list[str], new: Sequence[str] | None, option: str, what: str) -> list[str]:
    if new is None:
        return current
    if len(new) != len(current):
        raise UsageError(
            f"{option} {','.join(new)}: {len(new)} name(s) for {len(current)} {what}(s) "
            f"({', '.join(current)})"
        )
    return list(new)


# Markers Keras 3 writes for data in a config, not classes to instantiate.
CONFIG_DATA_MARKERS = {"__keras_tensor__", "__numpy__", "__tensor__", "__bytes__", "__typespec__", "__lambda__"}
# Layers whose config carries code or a path to more code: they run only with --unsafe.
CODE_LAYERS = {"Lambda", "TFSMLayer"}


def model_config(path: Path, kind: str) -> Any:
    """The model's config as JSON, read without Keras: `config.json` of a .keras zip, `model_config` of an
    HDF5 file; None when an HDF5 file holds none (weights only: Keras then says so)."""

    if kind == "keras":
        with zipfile.ZipFile(path) as archive:
            return _parsed_config(path, archive.read("config.json"), "its config.json")
    import h5py

    with h5py.File(path, "r") as handle:
        text = handle.attrs.get("model_config")
    if text is None:
        return None
    return _parsed_config(path, text, "its model_config attribute")


def _parsed_config(path: Path, text: bytes | str, where: str) -> Any:
    """A model config's JSON, or one line that says what is wrong with it.

    Raises:
        RunError: text that is not UTF-8, not JSON, or nested deeper than `MAX_CONFIG_DEPTH`.
    """
    import json

    try:
        config = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as error:
        raise RunError(f"cannot load {path}: {where} is not UTF-8 text (byte "
                       f"0x{error.object[error.start]:02x} at offset {error.start:,}); a Keras config is UTF-8 JSON") from None
    except RecursionError:
        raise RunError(f"cannot load {path}: {where} nests deeper than Python can read; a model's config nests "
                       f"a few dozen levels (derivcli takes up to {MAX_CONFIG_DEPTH})") from None
    except ValueError as error:
        raise RunError(f"cannot load {path}: {where} is not valid JSON ({error})") from None
    depth, stack = 0, [(config, 1)]
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        if depth > MAX_CONFIG_DEPTH:
            raise RunError(f"cannot load {path}: {where} nests more than {MAX_CONFIG_DEPTH} levels deep; a model's "
                           "config nests a few dozen")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children)
    return config


def inspect_config(path: Path, config: Any, custom_objects: dict[str, Any], unsafe: bool) -> None:
    """Refuses, before Keras reads the file, what would run code from it.

    - `Lambda` and `TFSMLayer` layers, whatever their function (bytecode, or a named one), unless `--unsafe`;
    - a class or function from a module other than Keras's own that no `--custom-objects` file provides.

    Raises:
        RunError: naming the class, the layer and the fix.
    """
    import keras

    known = set(custom_objects) | {getattr(value, "__name__", "") for value in custom_objects.values()}
    namespaces = (keras.layers, keras.initializers, keras.regularizers, keras.constraints, keras.activations,
                  keras.dtype_policies, keras.models, keras.optimizers)
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        stack.extend(node.values())
        class_name = node.get("class_name")
        if not isinstance(class_name, str) or class_name in CONFIG_DATA_MARKERS:
            continue
        layer = (node.get("config") or {}).get("name") if isinstance(node.get("config"), dict) else None
        if class_name in CODE_LAYERS and not unsafe:
            raise RunError(
                f"cannot load {path}: it has a {class_name} layer{f' {layer!r}' if layer else ''}, which runs code "
                "from the file; pass --unsafe if you trust the file"
            )
        module, registered = node.get("module"), node.get("registered_name")
        own = module == "keras" or (isinstance(module, str) and module.startswith("keras.")) or (
            module is None and (class_name in ("Functional", "Sequential", "Model")
                                or any(hasattr(namespace, class_name) for namespace in namespaces)))
        provided = class_name in known or (isinstance(registered, str) and (
            registered in known or keras.saving.get_registered_object(registered) is not None))
        if not (own or provided):
            raise RunError(
                f"cannot load {path}: unknown class {class_name!r}; pass the Python file "
                "that defines it with --custom-objects FILE.py"
            )


def _load_keras(
    path: Path, kind: str, custom_objects_files: Sequence[str], unsafe: bool, dtype: str, logits: bool = False
) -> LoadedModel:
    import keras

    custom_objects = load_custom_objects(custom_objects_files)
    config = model_config(path, kind)
    if config is not None:
        inspect_config(path, config, custom_objects, unsafe)
    # Keras picks its reader by the name's extension: a file is read by what its bytes are
    # (an HDF5 file named .keras, a zip named .h5), through a link whose name says so.
    suffixes = (".keras",) if kind == "keras" else (".h5", ".hdf5")
    with tempfile.TemporaryDirectory(prefix="derivcli-") as folder:
        readable = path
        if path.suffix.lower() not in suffixes:
            readable = Path(folder) / f"model{suffixes[0]}"
            readable.symlink_to(path.resolve())
        try:
            model = keras.models.load_model(
                readable, custom_objects=custom_objects, compile=False, safe_mode=not unsafe
            )
        except Exception as error:  # Keras raises many types for a bad file
            raise _explain_keras_error(path, error) from None
    if not isinstance(model, keras.Model):
        raise RunError(f"cannot load {path}: it holds a {type(model).__name__}, not a Keras model")
    inputs, outputs = _keras_inputs_outputs(model)
    model = _rebuilt(model, custom_objects, not unsafe, dtype)
    if logits:
        model = without_final_squash(model, path)
    return LoadedModel(
        str(path), "keras", inputs, outputs, coordinate_names(inputs), output_names(outputs),
        dtype, keras_model=model,
    )


def _load_saved_model(path: Path, tf: Any) -> LoadedModel:
    if not (path / "variables").is_dir():
        raise RunError(f"cannot load {path}: the SavedModel has no variables folder (an incomplete copy?)")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as error:  # TensorFlow raises many types for a bad directory
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"cannot load {path}: {first_line}") from None
    signatures = dict(loaded.signatures)
    if not signatures:
        raise RunError(
            f"cannot load {path}: the SavedModel has no serving signature; save it with "
            "model.export() or tf.saved_model.save(model, dir, signatures=...)"
        )
    signature = signatures.get("serving_default") or next(iter(signatures.values()))
    input_specs = signature.structured_input_signature[1]
    output_specs = signature.structured_outputs
    if not input_specs or not isinstance(output_specs, dict):
        raise RunError(f"cannot load {path}: the serving signature takes no named inputs")
    # A signature maps names to tensors with no order of its own (the dict's order changes from
    # one process to the next), so inputs and outputs are taken in the order of their names.
    input_keys, output_keys = sorted(input_specs), sorted(output_specs)
    inputs = [TensorInfo(key, _shape(input_specs[key].shape), input_specs[key].dtype.name) for key in input_keys]
    outputs = [TensorInfo(key, _shape(output_specs[key].shape), output_specs[key].dtype.name) for key in output_keys]
    for info in inputs:
        if not info.dtype.startswith("float"):
            raise RunError(f"cannot differentiate {path}: input {info.name!r} has dtype {info.dtype}")
    model = LoadedModel(
        str(path), "saved_model", inputs, outputs, coordinate_names(inputs), output_names(outputs),
        "float32", signature=signature,
        signature_input_keys=input_keys, signature_output_keys=output_keys,
    )
    model.saved_object = loaded  # keeps the variables alive as long as the signature
    return model


def load_with_float64(
    path: str,
    custom_objects_files: Sequence[str] = (),
    unsafe: bool = False,
    dtype: str = "float32",
    names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    target: str | int | None = None,
    logits: bool = False,
) -> tuple[LoadedModel, LoadedModel | None]:
    """The model in `dtype`, and in float64 for reference computations.

    The second is the first when `dtype` is already float64, and None when
    the model cannot be promoted (a SavedModel's signature is fixed).
    """
    model = load_model(path, custom_objects_files, unsafe, dtype, names, output_names, target, logits)
    if dtype == "float64":
        return model, model
    if model.kind != "keras":
        return model, _saved_model_in_float64(model)
        return model, model
    return model, load_model(path, custom_objects_files, unsafe, "float64", names, output_names, target, logits)


def _saved_model_in_float64(model: LoadedModel) -> LoadedModel | None:
    """A SavedModel in float64 (`_widened`), or None when its graph cannot run in float64."""
    try:
        return _widened(model)
    except RunError:
        return None


def _widened(model: LoadedModel) -> LoadedModel:
    """A SavedModel whose frozen graph is widened to float64 (`engine.graph.promote_to_float64`).

    Raises:
        RunError: the graph has an op with no float64 kernel.
    """
    import copy

    from derivcli.engine.graph import promote_to_float64

    promoted = promote_to_float64(model.frozen())
    double = copy.copy(model)
    double.dtype = "float64"
    double._frozen = promoted
    return double
