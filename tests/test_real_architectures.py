"""Real architectures: keras.applications networks, grouped convolutions, attention and recurrent layers.

Every reference here is computed by Keras alone, on a float64 twin the test builds itself (the same
architecture under a float64 dtype policy, the float32 weights widened exactly), with plain
GradientTapes: nothing of derivcli's freezing, graph import or kernels. A float32 tape is no
reference on these networks: on ReLU6 and ReLU nets it can land on the other side of a kink.

Tolerances:
- derivcli in float64 against the float64 twin: both compute the same function in double
  precision, in different op orders, but Keras's float64 GELU holds float32-rounded constants
  (its values and derivatives are 4e-9 off, measured against math.erf), which leaves a twin with
  GELU layers about 1e-8 of the column's largest magnitude off. TWIN_TOLERANCE, 1e-7 of it, is
  ten times that, and still a thousandth of the float32 tolerance below.
- derivcli in float32 against the float64 twin, on smooth networks only (GELU, swish: no kinks
  to land across): float32 round-off (6e-8) grown through ~100 layers stays under 1e-4 of the
  largest magnitude.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from conftest import read_csv

SIZE = 32  # the smallest input keras.applications builds these networks at
TWIN_TOLERANCE = 1e-7  # of a column's largest magnitude, derivcli in float64 against a float64 twin (see above)


@contextlib.contextmanager
def float64_policy():
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def float64_twin(build, model):
    """The same architecture built under a float64 policy, with `model`'s weights widened."""
    with float64_policy():
        twin = build()
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return twin


def top_class_gradient(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's largest output's index and its gradient, by one plain tape on the Keras model."""
    import tensorflow as tf

    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=False)
        top = tf.argmax(y, axis=1)
        picked = tf.gather(y, top, batch_dims=1)
    return top.numpy(), tape.gradient(picked, x).numpy()


APPLICATIONS = {
    # name: also compared in float32 (smooth, and quick enough), what it brings
    "ConvNeXtTiny": False,  # grouped (depthwise) Conv2D that Keras wraps in an XLA function; LayerNorm, GELU
    "EfficientNetB0": True,  # swish with TensorFlow's custom gradient, squeeze-excitation, depthwise conv
    "MobileNetV2": False,  # ReLU6 kinks, depthwise conv, BatchNorm
    "MobileNetV3Small": False,  # hard swish (ReLU6 inside), squeeze-excitation
}


@pytest.fixture(scope="session")
def applications(tmp_path_factory):
    """Each network saved as .keras at 32x32x3 with random weights, two images, and its float64 twin's answer."""
    import keras

    folder = tmp_path_factory.mktemp("applications")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.savez(folder / "images.npz", x=images)
    built = {}
    for name in APPLICATIONS:
        # MobileNetV3's Rescaling layer is left out: Keras's float64 Rescaling rounds its scale 1/127.5 to float32,
        # which left the twin's gradient 1.7e-7 off (derivcli's float64 keeps the scale exact).
        extra = {"include_preprocessing": False} if name.startswith("MobileNetV3") else {}

        def build(name=name, extra=extra):
            return getattr(keras.applications, name)(weights=None, input_shape=(SIZE, SIZE, 3), classes=4, **extra)

        keras.utils.set_random_seed(1)
        model = build()
        path = folder / f"{name}.keras"
        model.save(path)
        top, gradient = top_class_gradient(float64_twin(build, model), images.astype(np.float64))
        built[name] = (path, top, gradient)
    return folder / "images.npz", built


@pytest.mark.slow
@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_a_keras_application_s_gradient_matches_its_float64_twin(cli, tmp_path, applications, name):
    """On main at 755183a ConvNeXtTiny failed with 'NotFoundError ... SymbolicGradient' in depthwise_conv."""
    images, built = applications
    path, top, reference = built[name]
    dtypes = ["float64", "float32"] if APPLICATIONS[name] else ["float64"]
    for dtype in dtypes:
        out = tmp_path / f"{dtype}.npz"
        result = cli("grad", path, "--npz", images, "--target", "top", "--dtype", dtype, "-o", out, "-q")
        assert result.exit_code == 0, result.stderr
        arrays = np.load(out)
        np.testing.assert_array_equal(arrays["target"], top)
        tolerance = TWIN_TOLERANCE if dtype == "float64" else 1e-4
        np.testing.assert_allclose(arrays["dy/dx"], reference, rtol=0, atol=tolerance * np.abs(reference).max())


# -- a small grouped-convolution net, in every format, to order 2 --

def grouped_net(dtype: str = "float32"):
    """Depthwise (groups = channels) and grouped (2 channels a group) Conv2D, LayerNorm and GELU."""
    import keras

    inputs = keras.Input((6, 6, 4), name="image", dtype=dtype)
    h = keras.layers.Conv2D(8, 3, groups=4, padding="same", activation="gelu", dtype=dtype, name="depthwise")(inputs)
    h = keras.layers.LayerNormalization(dtype=dtype, name="norm")(h)
    h = keras.layers.Conv2D(4, 3, groups=2, activation="tanh", dtype=dtype, name="grouped")(h)
    h = keras.layers.GlobalAveragePooling2D(dtype=dtype)(h)
    return keras.Model(inputs, keras.layers.Dense(2, dtype=dtype, name="out")(h))


@pytest.fixture(scope="session")
def grouped(tmp_path_factory):
    import keras

    folder = tmp_path_factory.mktemp("grouped")
    keras.utils.set_random_seed(3)
    model = grouped_net()
    model.set_weights([w + np.random.default_rng(4).normal(0, 0.05, w.shape).astype(w.dtype)
                       for w in model.get_weights()])  # LayerNorm's gamma and beta off 1 and 0
    paths = {"keras": folder / "grouped.keras", "h5": folder / "grouped.h5", "export": folder / "grouped_export"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    model.export(paths["export"], verbose=False)
    twin = grouped_net("float64")
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    images = np.random.default_rng(5).normal(size=(3, 6, 6, 4)).astype(np.float32)
    np.savez(folder / "images.npz", image=images)
    return paths, twin, images, folder / "images.npz", grouped_references(twin, images)


PIXELS = [(0, 0, 0), (2, 3, 1)]


def grouped_references(twin, images: np.ndarray) -> dict:
    """The twin's gradient of each output (a tape) and d2y0 over PIXELS (finite differences), once for all formats."""
    import tensorflow as tf

    x = tf.constant(images.astype(np.float64))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = twin(x)
        outputs = [y[:, m] for m in range(2)]
    references = {f"dy{m}/dx": tape.gradient(output, x).numpy() for m, output in enumerate(outputs)}
    flat = [int(np.ravel_multi_index(pixel, images.shape[1:])) for pixel in PIXELS]
    names = [f"x[{i},{j},{c}]" for i, j, c in PIXELS]
    for a in range(len(PIXELS)):
        for b in range(a, len(PIXELS)):
            column = f"d2y0/d{names[a]}^2" if a == b else f"d2y0/d{names[a]}d{names[b]}"
            references[column] = second_derivative_reference(twin, images, flat[a], flat[b])
    return references


def second_derivative_reference(twin, points: np.ndarray, first: int, second: int, output: int = 0):
    """d2y/dx_first dx_second at each point, by Richardson-extrapolated float64 central differences of the twin's
    values (Keras's forward pass alone), and their error estimate.

    Not Keras's nested tapes: LayerNormalization's variance is taken around stop_gradient(mean), a
    training convention that leaves the first derivative whole but changes the second (here by 10%).
    """
    from derivcli.finite_differences import finite_difference

    shape = points.shape[1:]
    flat = points.reshape(len(points), -1).astype(np.float64)
    index = [0] * flat.shape[1]
    index[first] += 1
    index[second] += 1

    def values(rows: np.ndarray) -> np.ndarray:
        return np.asarray(twin(rows.reshape(-1, *shape), training=False), np.float64).reshape(len(rows), -1)

    estimate = finite_difference(values, flat, tuple(index), output)
    return estimate.value, estimate.error


@pytest.mark.parametrize("form", ["keras", "h5", "export"])
def test_grouped_convolutions_differentiate_to_order_two_in_every_format(cli, tmp_path, grouped, form):
    """The gradient of both outputs against the float64 twin's tape; the Hessian over two pixels against float64
    finite differences of the twin."""
    paths, twin, images, npz, references = grouped
    out = tmp_path / "grad.npz"
    result = cli("grad", paths[form], "--npz", npz, "--dtype", "float64", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    arrays = np.load(out)
    for m in range(2):
        expected = references[f"dy{m}/dx"]
        np.testing.assert_allclose(arrays[f"dy{m}/dx"], expected, rtol=0, atol=TWIN_TOLERANCE * np.abs(expected).max())

    wrt = ",".join(f"x[{i},{j},{c}]" for i, j, c in PIXELS)
    result = cli("hessian", paths[form], "--npz", npz, "--dtype", "float64", "--wrt", wrt, "--outputs", "y0",
                 "--format", "csv")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    hessian = [name for name in references if name.startswith("d2")]
    assert [name for name in table if name.startswith("d2")] == hessian
    for column in hessian:
        expected, error = references[column]
        assert np.all(np.abs(table[column] - expected) <= error + TWIN_TOLERANCE * np.abs(expected).max()), column


# -- a text model: attention, normalization and a bidirectional LSTM --

def sequence_net(dtype: str = "float32"):
    """Features (5 steps x 3) -> Dense -> MultiHeadAttention + residual -> LayerNorm -> BiLSTM -> Dense."""
    import keras

    inputs = keras.Input((5, 3), name="seq", dtype=dtype)
    h = keras.layers.Dense(8, dtype=dtype, name="embed")(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, dtype=dtype, name="attention")(h, h)
    h = keras.layers.LayerNormalization(dtype=dtype, name="norm")(keras.layers.Add(dtype=dtype)([h, attended]))
    h = keras.layers.Bidirectional(keras.layers.LSTM(4, dtype=dtype), dtype=dtype, name="bilstm")(h)
    return keras.Model(inputs, keras.layers.Dense(1, dtype=dtype, name="out")(h))


def test_attention_and_a_bidirectional_lstm_to_order_two(cli, tmp_path):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(7)
    model = sequence_net()
    path = tmp_path / "sequence.keras"
    model.save(path)
    twin = sequence_net("float64")
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    points = np.random.default_rng(8).normal(size=(2, 5, 3))
    np.savez(tmp_path / "points.npz", seq=points.astype(np.float32))
    x = tf.constant(points)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = twin(x)[:, 0]
    gradient = tape.gradient(y, x).numpy()

    result = cli("deriv", path, "--npz", tmp_path / "points.npz", "--dtype", "float64", "--partial", "x[0,0]",
                 "-f", "csv")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    np.testing.assert_allclose(table["dy/dx[0,0]"], gradient[:, 0, 0], rtol=0, atol=TWIN_TOLERANCE * np.abs(gradient).max())
    # Order 2 against float64 finite differences of the model's values, with their error estimate (`check`): the
    # Keras twin's own second derivatives sit 1.6e-7 (relative) off them and off derivcli's, from a float32 rounding
    # inside Keras's float64 attention or LSTM that this test does not pin down.
    checked = cli("check", path, "--npz", tmp_path / "points.npz", "--dtype", "float64", "--strict",
                  "--partial", "x[0,0]^2", "--partial", "x[0,0],x[4,2]", "--partial", "x[2,1]^2", "--rtol", "1e-8")
    assert checked.exit_code == 0, checked.stderr
    assert read_csv(checked.stdout)["status"] == ["ok", "ok", "ok"]


def test_grad_of_a_token_model_says_why_it_has_no_derivative(cli, tmp_path):
    """On main at 755183a it printed the ids, y and target, with no word on why or on attribute --layer."""
    import keras

    tokens = keras.Input((16,), dtype="int32", name="tokens")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 8, name="embed")(tokens))
    keras.Model(tokens, keras.layers.Dense(3, name="out")(pooled)).save(tmp_path / "tokens.keras")
    np.savez(tmp_path / "ids.npz", tokens=np.random.default_rng(0).integers(0, 50, (4, 16)).astype(np.int32))
    result = cli("grad", tmp_path / "tokens.keras", "--npz", tmp_path / "ids.npz", "--target", "top", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert list(read_csv(result.stdout))[-2:] == ["y", "target"]
    assert "they are held at their values and never differentiated" in result.stderr
    assert "attribute --layer embed attributes the output to each token" in result.stderr
    values = cli("eval", tmp_path / "tokens.keras", "--npz", tmp_path / "ids.npz", "-f", "csv")
    assert "never differentiated" not in values.stderr  # eval asked for no derivative
    binary = cli("grad", tmp_path / "tokens.keras", "--npz", tmp_path / "ids.npz", "--target", "top", "-q",
                 "-o", tmp_path / "out.npz")
    assert binary.exit_code == 0, binary.stderr
    with np.load(tmp_path / "out.npz") as arrays:  # on main at 755183a: 16 arrays x0 ... x15
        assert sorted(arrays) == ["target", "x", "y"]
        np.testing.assert_array_equal(arrays["x"], np.load(tmp_path / "ids.npz")["tokens"])
        assert arrays["x"].dtype == np.int32


def test_info_on_a_big_model_keeps_whole_names_and_counts_layers_by_class(cli, applications):
    """On main at 755183a `info` cut MobileNetV3's names with '…' and listed 40 layers in its smoothness line."""
    _, built = applications
    result = cli("info", built["MobileNetV3Small"][0])
    assert result.exit_code == 0, result.stderr
    layers = result.stdout.split(" layer ")[1]
    assert "…" not in layers and " expanded_conv_squeeze_excite_avg_pool " in layers
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("smoothness:"))
    assert "ReLU" in verdict and "info --format json lists them" in verdict and "re_lu_1," not in verdict
    listed = cli("info", built["MobileNetV3Small"][0], "--format", "json")
    assert "re_lu_1" in listed.stdout  # the json verdict lists every layer
