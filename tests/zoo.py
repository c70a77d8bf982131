"""A zoo of common Keras architectures, each with an independent reference in mpmath.

Every entry builds a small Keras model with fixed float32 weights and gives the
function it computes written out again in mpmath, from the weights alone, with
every constant exact (gelu's 1/sqrt(2), SELU's scale, the attention scale, ...).
The reference shares no code with derivcli, Keras or TensorFlow; its derivatives
come from `mpmath.diff` (finite differences at 60 digits with automatic steps),
so they are exact to far below float64 round-off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mpmath as mp
import numpy as np

mp.mp.dps = 60

LAYERS_FILE = str(Path(__file__).with_name("zoo_layers.py"))


# -- mpmath arrays: NumPy object arrays of mpf --

def exact(array) -> np.ndarray:
    """A float array as mpf values, exactly (float32 weights are binary fractions)."""
    return np.vectorize(lambda v: mp.mpf(float(v)), otypes=[object])(np.asarray(array))


def elementwise(function: Callable) -> Callable[[np.ndarray], np.ndarray]:
    return np.vectorize(function, otypes=[object])


def sigmoid(u):
    return 1 / (1 + mp.exp(-u))


def softplus(u):
    return mp.log(1 + mp.exp(u))


ACTIVATIONS = {
    "linear": lambda u: u,
    "tanh": mp.tanh,
    "sigmoid": sigmoid,
    "softplus": softplus,
    "gelu": lambda u: u / 2 * (1 + mp.erf(u / mp.sqrt(2))),
    "gelu_tanh": lambda u: u / 2 * (1 + mp.tanh(mp.sqrt(2 / mp.pi) * (u + mp.mpf("0.044715") * u**3))),
    "silu": lambda u: u * sigmoid(u),
    "mish": lambda u: u * mp.tanh(softplus(u)),
    "elu": lambda u: u if u > 0 else mp.exp(u) - 1,
    "selu": lambda u: mp.mpf("1.0507009873554804934193349852946")
    * (u if u > 0 else mp.mpf("1.6732632423543772848170429916717") * (mp.exp(u) - 1)),
    "softsign": lambda u: u / (1 + abs(u)),
    "hard_sigmoid": lambda u: min(max((u + 3) / 6, 0), 1),
    "leaky_relu": lambda u: u if u > 0 else mp.mpf("0.3") * u,
    "relu": lambda u: max(u, 0),
}


def dense(x: np.ndarray, weights: list, activation: str = "linear") -> np.ndarray:
    kernel, bias = weights
    return elementwise(ACTIVATIONS[activation])(x @ exact(kernel) + exact(bias))


def softmax(u: np.ndarray) -> np.ndarray:
    e = elementwise(mp.exp)(u)
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, gamma, beta, epsilon: float = 1e-3) -> np.ndarray:
    mean = x.sum(axis=-1, keepdims=True) / x.shape[-1]
    variance = ((x - mean) ** 2).sum(axis=-1, keepdims=True) / x.shape[-1]
    return (x - mean) / elementwise(mp.sqrt)(variance + mp.mpf(epsilon)) * exact(gamma) + exact(beta)


def lstm(sequence: np.ndarray, kernel, recurrent, bias) -> np.ndarray:
    units = recurrent.shape[0]
    h = np.array([mp.mpf(0)] * units, dtype=object)
    c = h.copy()
    for x in sequence:
        z = x @ exact(kernel) + h @ exact(recurrent) + exact(bias)
        i, f, g, o = (z[k * units:(k + 1) * units] for k in range(4))
        c = elementwise(sigmoid)(f) * c + elementwise(sigmoid)(i) * elementwise(mp.tanh)(g)
        h = elementwise(sigmoid)(o) * elementwise(mp.tanh)(c)
    return h


def gru(sequence: np.ndarray, kernel, recurrent, bias) -> np.ndarray:
    """Keras's GRU with reset_after=True: bias is (2, 3 units), input and recurrent."""
    units = recurrent.shape[0]
    h = np.array([mp.mpf(0)] * units, dtype=object)
    for x in sequence:
        projected = x @ exact(kernel) + exact(bias[0])
        carried = h @ exact(recurrent) + exact(bias[1])
        xz, xr, xh = (projected[k * units:(k + 1) * units] for k in range(3))
        hz, hr, hh = (carried[k * units:(k + 1) * units] for k in range(3))
        z = elementwise(sigmoid)(xz + hz)
        r = elementwise(sigmoid)(xr + hr)
        candidate = elementwise(mp.tanh)(xh + r * hh)
        h = z * h + (1 - z) * candidate
    return h


def attention(x: np.ndarray, weights: list, key_dim: int) -> np.ndarray:
    """Keras MultiHeadAttention, self-attention of a (sequence, features) array."""
    qk, qb, kk, kb, vk, vb, ok, ob = weights
    query = np.einsum("sf,fhd->shd", x, exact(qk)) + exact(qb)
    key = np.einsum("sf,fhd->shd", x, exact(kk)) + exact(kb)
    value = np.einsum("sf,fhd->shd", x, exact(vk)) + exact(vb)
    scores = np.einsum("qhd,khd->hqk", query / mp.sqrt(key_dim), key)
    weights_ = softmax(scores)
    mixed = np.einsum("hqk,khd->qhd", weights_, value)
    return np.einsum("qhd,hdo->qo", mixed, exact(ok)) + exact(ob)


# -- the zoo --


@dataclass
class Entry:
    """One architecture: how to build it, and its function in mpmath.

    Attributes:
        build: makes the Keras model (float32, weights set).
        reference: (model weights, point as mpf list in model input order) -> list of outputs.
        custom_objects: the model needs `zoo_layers.py`.
    """

    name: str
    build: Callable
    reference: Callable
    custom_objects: bool = False


def _weights(model, seed: int, scale: float = 0.7) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([(rng.normal(size=w.shape) * scale).astype("float32") for w in model.get_weights()])


def _mlp(activation: str, layer=None):
    def build():
        import keras

        inputs = keras.Input((2,))
        hidden = keras.layers.Dense(3, activation=None if layer else activation)(inputs)
        if layer is not None:
            hidden = layer()(hidden)
        model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
        _weights(model, 1)
        return model

    def reference(w, x):
        return list(dense(dense(np.array(x, dtype=object), w[0:2], activation), w[2:4]))

    return build, reference


def _layer_norm():
    import keras

    inputs = keras.Input((3,))
    hidden = keras.layers.LayerNormalization()(keras.layers.Dense(4, activation="tanh")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    _weights(model, 2)
    return model


def _layer_norm_reference(w, x):
    hidden = layer_norm(dense(np.array(x, dtype=object), w[0:2], "tanh"), w[2], w[3])
    return list(dense(hidden, w[4:6]))


def _batch_norm():
    import keras

    inputs = keras.Input((3,))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Activation("tanh")(hidden)))
    _weights(model, 3)
    weights = model.get_weights()
    weights[5] = np.abs(weights[5]) + np.float32(0.5)  # the moving variance
    model.set_weights(weights)
    return model


def _batch_norm_reference(w, x):
    hidden = dense(np.array(x, dtype=object), w[0:2])
    gamma, beta, mean, variance = (exact(v) for v in w[2:6])
    normal = (hidden - mean) / elementwise(mp.sqrt)(variance + mp.mpf(1e-3)) * gamma + beta
    return list(dense(elementwise(mp.tanh)(normal), w[6:8]))


def _attention():
    import keras

    inputs = keras.Input((3,))
    sequence = keras.layers.Dense(2)(keras.layers.Reshape((3, 1))(inputs))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(sequence, sequence)
    joined = keras.layers.LayerNormalization()(keras.layers.Add()([sequence, attended]))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(joined)))
    _weights(model, 4)
    return model


def _attention_reference(w, x):
    sequence = dense(np.array(x, dtype=object).reshape(3, 1), w[0:2])
    joined = layer_norm(sequence + attention(sequence, w[2:10], 3), w[10], w[11])
    return list(dense(joined.reshape(-1), w[12:14]))


def _softmax():
    import keras

    inputs = keras.Input((2,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    _weights(model, 5, 1.2)
    return model


def _softmax_reference(w, x):
    return list(softmax(dense(dense(np.array(x, dtype=object), w[0:2], "tanh"), w[2:4])))


def _preprocessing():
    import keras

    inputs = keras.Input((2,))
    normal = keras.layers.Normalization(mean=[0.3, -0.2], variance=[2.0, 0.7])(inputs)
    scaled = keras.layers.Rescaling(0.7, offset=0.1)(normal)
    hidden = keras.layers.Dense(3, activation="gelu")(scaled)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    _weights(model, 6)
    return model


def _preprocessing_reference(w, x):
    mean = np.array([mp.mpf("0.3"), mp.mpf("-0.2")], dtype=object)
    deviation = np.array([mp.sqrt(mp.mpf("2.0")), mp.sqrt(mp.mpf("0.7"))], dtype=object)
    scaled = (np.array(x, dtype=object) - mean) / deviation * mp.mpf("0.7") + mp.mpf("0.1")
    return list(dense(dense(scaled, w[0:2], "gelu"), w[2:4]))


def _gating():
    import keras

    inputs = keras.Input((2,))
    candidate = keras.layers.Dense(3, activation="tanh")(inputs)
    gate = keras.layers.Dense(3, activation="sigmoid")(inputs)
    gated = keras.layers.Multiply()([candidate, gate])
    joined = keras.layers.Add()([gated, keras.layers.Dense(3)(inputs)])
    model = keras.Model(inputs, keras.layers.Dense(1)(joined))
    _weights(model, 7)
    return model


def _gating_reference(w, x):
    point = np.array(x, dtype=object)
    joined = dense(point, w[0:2], "tanh") * dense(point, w[2:4], "sigmoid") + dense(point, w[4:6])
    return list(dense(joined, w[6:8]))


def _conv1d():
    import keras

    inputs = keras.Input((4,))
    convolved = keras.layers.Conv1D(2, 2, activation="tanh")(keras.layers.Reshape((4, 1))(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(convolved)))
    _weights(model, 8)
    return model


def _conv1d_reference(w, x):
    kernel, bias = exact(w[0]), exact(w[1])  # (2, 1, 2), (2,)
    signal = np.array(x, dtype=object).reshape(4, 1)
    rows = [sum(signal[t + j] @ kernel[j] for j in range(2)) + bias for t in range(3)]
    return list(dense(elementwise(mp.tanh)(np.array(rows)).reshape(-1), w[2:4]))


def _recurrent(kind: str, unroll: bool):
    def build():
        import keras

        inputs = keras.Input((3,))
        layer = getattr(keras.layers, kind)(3, unroll=unroll)
        model = keras.Model(inputs, keras.layers.Dense(1)(layer(keras.layers.Reshape((3, 1))(inputs))))
        _weights(model, 9)
        return model

    def reference(w, x):
        cell = lstm if kind == "LSTM" else gru
        return list(dense(cell(np.array(x, dtype=object).reshape(3, 1), *w[0:3]), w[3:5]))

    return build, reference


def _two_inputs():
    import keras

    x = keras.Input((1,), name="x")
    t = keras.Input((1,), name="t")
    hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([x, t]))
    model = keras.Model([x, t], keras.layers.Dense(1, name="u")(hidden))
    _weights(model, 10)
    return model


def _two_inputs_reference(w, x):
    return list(dense(dense(np.array(x, dtype=object), w[0:2], "tanh"), w[2:4]))


def _two_outputs():
    import keras

    inputs = keras.Input((2,))
    hidden = keras.layers.Dense(4, activation="softplus")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(1, name="u")(hidden), keras.layers.Dense(2, name="v")(hidden)])
    _weights(model, 11)
    return model


def _two_outputs_reference(w, x):
    hidden = dense(np.array(x, dtype=object), w[0:2], "softplus")
    return list(dense(hidden, w[2:4])) + list(dense(hidden, w[4:6]))


def _custom():
    import keras

    from zoo_layers import CenteredSoftplus

    inputs = keras.Input((2,))
    hidden = CenteredSoftplus()(keras.layers.Dense(3, activation="tanh")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    _weights(model, 12)
    return model


def _custom_reference(w, x):
    hidden = dense(np.array(x, dtype=object), w[0:2], "tanh")
    centered = hidden - hidden.sum() / len(hidden)
    return list(dense(exact(w[2]) * elementwise(softplus)(centered), w[3:5]))


ZOO = [
    Entry("layer_norm", _layer_norm, _layer_norm_reference),
    Entry("batch_norm", _batch_norm, _batch_norm_reference),
    Entry("attention", _attention, _attention_reference),
    Entry("softmax", _softmax, _softmax_reference),
    Entry("normalization_rescaling_gelu", _preprocessing, _preprocessing_reference),
    *(Entry(f"mlp_{a}", *_mlp(a)) for a in ("gelu", "silu", "mish", "elu", "selu", "softsign", "hard_sigmoid")),
    Entry("leaky_relu_layer", *_mlp("leaky_relu", layer=lambda: __import__("keras").layers.LeakyReLU(0.3))),
    Entry("gating_residual", _gating, _gating_reference),
    Entry("conv1d", _conv1d, _conv1d_reference),
    Entry("lstm", *_recurrent("LSTM", False)),
    Entry("lstm_unrolled", *_recurrent("LSTM", True)),
    Entry("gru", *_recurrent("GRU", False)),
    Entry("gru_unrolled", *_recurrent("GRU", True)),
    Entry("two_inputs", _two_inputs, _two_inputs_reference),
    Entry("two_outputs", _two_outputs, _two_outputs_reference),
    Entry("custom_layer", _custom, _custom_reference, custom_objects=True),
]


def reference_derivative(entry: Entry, weights: list, point, output: int, index: tuple[int, ...]) -> float:
    """d^index y_output at `point` (model input order), by mpmath at 60 digits."""
    def function(*coordinates):
        return entry.reference(weights, list(coordinates))[output]

    start = [mp.mpf(float(v)) for v in point]
    if not any(index):
        return float(function(*start))
    return float(mp.diff(function, tuple(start), tuple(index)))
