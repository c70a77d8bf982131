"""derivcli.operator and friends inside a training loss (derivcli.training).

References are nested `tf.GradientTape`s written here, on the Keras model itself: no derivcli code
path. In float64 the residuals and their gradients with respect to the weights agree to 1e-10
relative to their scale: both routes compute the same sums of O(1) products of a few dozen terms,
whose round-off is ~1e-15 each, so 1e-10 leaves five digits of margin and still catches a wrong
term (which is O(1e-2) or larger on these nets).
"""

from __future__ import annotations

import doctest
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import derivcli
from derivcli import training
from derivcli.errors import UsageError

F64 = "float64"


def _mlp(activation: str, outputs: int = 1, width: int = 12) -> keras.Model:
    inputs = keras.Input((3,), dtype=F64)
    h = keras.layers.Dense(width, activation=activation, dtype=F64)(inputs)
    h = keras.layers.Dense(width, activation=activation, dtype=F64)(h)
    return keras.Model(inputs, keras.layers.Dense(outputs, dtype=F64)(h))


class _HonestLayerNorm(keras.layers.Layer):
    """`norm`'s function written out, its variance around the mean itself (Keras's moments take it around
    stop_gradient(mean): the same values, other second derivatives)."""

    def __init__(self, norm: keras.layers.LayerNormalization, **options) -> None:
        super().__init__(**options)
        self.norm = norm

    def call(self, h):
        mean = tf.reduce_mean(h, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(h - mean), axis=-1, keepdims=True)
        return (h - mean) / tf.sqrt(variance + self.norm.epsilon) * self.norm.gamma + self.norm.beta


# Models whose nested-tape reference runs on a twin: the same variables, the function written without gradient tricks.
REFERENCE_TWINS: dict[int, keras.Model] = {}


def _residual_block() -> keras.Model:
    inputs = keras.Input((3,), dtype=F64)
    first, second, third = (keras.layers.Dense(12, activation=a, dtype=F64) for a in ("tanh", "softplus", None))
    norm = keras.layers.LayerNormalization(dtype=F64)
    head = keras.layers.Dense(1, dtype=F64)

    def block(normalize: keras.layers.Layer) -> keras.Model:
        h = first(inputs)
        h = keras.layers.Add(dtype=F64)([h, third(second(h))])
        return keras.Model(inputs, head(normalize(h)))

    model = block(norm)
    REFERENCE_TWINS[id(model)] = block(_HonestLayerNorm(norm, dtype=F64))
    return model


def _two_heads() -> keras.Model:
    inputs = keras.Input((3,), dtype=F64)
    h = keras.layers.Dense(12, activation="tanh", dtype=F64)(inputs)
    u = keras.layers.Dense(1, name="u", dtype=F64)(h)
    v = keras.layers.Dense(1, activation="sigmoid", name="v", dtype=F64)(keras.layers.Dense(8, activation="gelu", dtype=F64)(h))
    return keras.Model(inputs, [u, v])


@pytest.fixture(scope="module")
def float64_models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(7)
    return {"tanh": _mlp("tanh"), "softplus": _mlp("softplus"), "gelu": _mlp("gelu"),
            "residual block": _residual_block(), "two outputs": _two_heads()}


def _points(count: int = 64, dtype: str = F64, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).uniform(-1, 1, (count, 3)), dtype)


def _nested_tapes(model: keras.Model, x: tf.Tensor) -> dict[str, tf.Tensor]:
    """Every output's value, gradient and Laplacian over x and y (coordinates 1 and 2), by nested tapes."""
    model = REFERENCE_TWINS.get(id(model), model)
    found = {}
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(x)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(x)
            values = model(x, training=False)
            values = tf.concat(values, axis=1) if isinstance(values, list) else values
            columns = [values[:, m] for m in range(values.shape[1])]
        gradients = [inner.gradient(column, x) for column in columns]
        firsts = [(g[:, 1], g[:, 2]) for g in gradients]
    for m, (column, g, (gx, gy)) in enumerate(zip(columns, gradients, firsts)):
        found[f"y{m}"] = column
        found[f"y{m}_t"], found[f"y{m}_x"] = g[:, 0], g[:, 1]
        found[f"lap{m}"] = outer.gradient(gx, x)[:, 1] + outer.gradient(gy, x)[:, 2]
    return found


def _residuals_by_tapes(model: keras.Model, x: tf.Tensor) -> list[tf.Tensor]:
    """The residuals of `_EXPRESSIONS` by nested tapes."""
    d = _nested_tapes(model, x)
    first = d["y0_t"] + d["y0"] * d["y0_x"] - 0.05 * d["lap0"]
    if "y1" not in d:
        return [first]
    return [first, d["lap1"] + d["y0"] * d["y1"]]


def _expressions(model: keras.Model) -> tuple[list[str], str]:
    if len(model.outputs) == 2:
        return ["res=u_t + u*u_x - 0.05*lap(u)", "g=lap(v) + u*v"], "u,v"
    return ["res=u_t + u*u_x - 0.05*lap(u)"], "u"


def _loss_and_gradients(model: keras.Model, residuals: callable, x: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
    with tf.GradientTape() as tape:
        loss = tf.add_n([tf.reduce_mean(r**2) for r in residuals(x)])
    gradients = tape.gradient(loss, model.trainable_variables)
    # A weight the loss does not depend on (the head's bias, under derivatives only) has gradient 0.
    return loss, [tf.zeros(v.shape, v.dtype) if g is None else g for v, g in zip(model.trainable_variables, gradients)]


def _assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-10) -> None:
    scale = float(np.max(np.abs(expected))) + 1e-300
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("name", ["tanh", "softplus", "gelu", "residual block", "two outputs"])
@pytest.mark.parametrize("engine", ["auto", "tape"])
def test_residuals_and_weight_gradients_equal_nested_tapes_in_float64(float64_models, name, engine):
    model = float64_models[name]
    expressions, outputs = _expressions(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto must not fall back on any of these
        residual = derivcli.operator(model, expressions, inputs="t,x,y", outputs=outputs, wrt="x,y", engine=engine)
    assert residual.dtype == F64
    assert residual.engine.startswith("Taylor series" if engine == "auto" else "nested tapes")
    x = _points()
    ours = residual(x)
    assert list(ours) == [e.split("=")[0] for e in expressions]
    for mine, reference in zip(ours.values(), _residuals_by_tapes(model, x)):
        _assert_close(mine.numpy(), reference.numpy())
    loss, gradients = _loss_and_gradients(model, lambda p: list(residual(p).values()), x)
    expected_loss, expected = _loss_and_gradients(model, lambda p: _residuals_by_tapes(model, p), x)
    _assert_close(loss.numpy(), expected_loss.numpy())
    for variable, mine, reference in zip(model.trainable_variables, gradients, expected):
        assert np.max(np.abs(reference.numpy())) > 0 or variable.name == "bias", variable.path
        _assert_close(mine.numpy(), reference.numpy())


def test_eager_function_and_xla_agree_and_never_retrace(float64_models):
    """The same residual and weight gradients eagerly, in tf.function and under jit_compile; 100 steps, one trace."""
    model = float64_models["tanh"]
    residual = derivcli.operator(model, "u_t - 0.01*lap(u)", inputs="t,x,y", outputs="u", wrt="x,y")
    x = _points(32)

    def loss_and_gradients(points: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(residual(points) ** 2)
        return loss, tape.gradient(loss, model.trainable_variables)

    eager = loss_and_gradients(x)
    assert residual.traces == 1  # eagerly, its own function: traced once for any number of calls
    for jit in (False, True):
        compiled = tf.function(loss_and_gradients, jit_compile=jit)
        result = compiled(x)
        traced = residual.traces
        for _ in range(100):
            result = compiled(x)
        assert compiled.experimental_get_tracing_count() == 1 and residual.traces == traced
        _assert_close(result[0].numpy(), eager[0].numpy())
        for mine, reference in zip(result[1], eager[1]):
            _assert_close(mine.numpy(), reference.numpy())


def test_operator_reads_the_weights_as_they_train():
    """Steps of Adam change the weights; the operator then gives the new model's residual, not the first one's."""
    keras.utils.set_random_seed(3)
    model = _mlp("tanh")
    residual = derivcli.operator(model, "res=u_t + u*u_x - 0.05*lap(u)", inputs="t,x,y", outputs="u", wrt="x,y")
    optimizer = keras.optimizers.Adam(1e-2)
    x = _points(128)

    @tf.function
    def step(points: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(residual(points) ** 2)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    before = residual(x).numpy()
    losses = [float(step(x)) for _ in range(100)]
    assert losses[-1] < 0.5 * losses[0]
    after = residual(x).numpy()
    assert np.max(np.abs(after - before)) > 1e-3
    _assert_close(after, _residuals_by_tapes(model, x)[0].numpy())
    assert step.experimental_get_tracing_count() <= 2  # Keras builds the optimizer's variables in the first trace


class HeatNet(keras.Model):
    """A model whose loss is a residual, trained by `fit` with its own train_step."""

    def train_step(self, data: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(self.residual(data) ** 2)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"residual": loss}


def test_fit_with_a_custom_train_step_trains_on_the_operator():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((2,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    model = HeatNet(inputs, keras.layers.Dense(1)(hidden))
    model.residual = derivcli.operator(model, "u_x + u_yy - 1", inputs="x,y", outputs="u")
    points = np.random.default_rng(1).uniform(-1, 1, (512, 2)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = float(tf.reduce_mean(model.residual(points) ** 2))
    model.fit(points, epochs=1, batch_size=128, verbose=0)
    traced = model.residual.traces  # Keras traces its train function (twice: the optimizer makes variables)
    history = model.fit(points, epochs=8, batch_size=128, verbose=0).history["residual"]
    assert len(history) == 8 and history[-1] < 0.2 * before
    assert model.residual.traces == traced  # 32 more steps, no more tracing
    # The trained model's residual by nested tapes (float32: the terms are O(1), round-off ~1e-6).
    x = tf.constant(points[:64])
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            u = model(x)[:, 0]
        g = inner.gradient(u, x)
        gy = g[:, 1]
    expected = g[:, 0] + outer.gradient(gy, x)[:, 1] - 1
    np.testing.assert_allclose(model.residual(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_an_operator_made_inside_a_traced_step_plans_eagerly():
    keras.utils.set_random_seed(2)
    model = _mlp("softplus")
    made = {}

    @tf.function
    def residual(points: tf.Tensor) -> tf.Tensor:
        if "op" not in made:
            made["op"] = derivcli.operator(model, "lap(u)", inputs="t,x,y", outputs="u", wrt="x,y")
        return made["op"](points)

    x = _points(8)
    _assert_close(residual(x).numpy(), _nested_tapes(model, x)["lap0"].numpy())


def test_taylor_series_fall_back_to_tapes_with_the_reason():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((3,), dtype=F64)
    hidden = keras.layers.Dense(8, activation="tanh", dtype=F64)(inputs)
    hidden = keras.layers.Lambda(lambda v: keras.ops.arctan(v), dtype=F64)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, dtype=F64)(hidden))
    with pytest.warns(UserWarning, match=r"Taylor series do not cover op Atan"):
        residual = derivcli.operator(model, "lap(u)", inputs="t,x,y", outputs="u", wrt="x,y")
    assert residual.engine.startswith("nested tapes") and "Atan" in residual.refused
    x = _points(16)
    _assert_close(residual(x).numpy(), _nested_tapes(model, x)["lap0"].numpy())
    with pytest.raises(UsageError, match="does not cover"):
        derivcli.operator(model, "lap(u)", inputs="t,x,y", outputs="u", engine="taylor")


def test_stop_gradient_changes_neither_the_derivatives_nor_their_weight_gradients():
    """A model computing tanh(z) as z + stop_gradient(tanh(z) - z) has tanh's derivatives and weight gradients."""

    class Trick(keras.layers.Layer):
        def call(self, z):
            return z + tf.stop_gradient(tf.tanh(z) - z)

    keras.utils.set_random_seed(6)
    inputs = keras.Input((3,), dtype=F64)
    dense = keras.layers.Dense(8, dtype=F64)
    head = keras.layers.Dense(1, dtype=F64)
    tricked = keras.Model(inputs, head(Trick(dtype=F64)(dense(inputs))))
    honest = keras.Model(inputs, head(keras.layers.Activation("tanh", dtype=F64)(dense(inputs))))
    x = _points(16)
    for engine in ("auto", "tape"):
        residual = derivcli.operator(tricked, "u_x + lap(u)", inputs="t,x,y", outputs="u", wrt="x,y", engine=engine)
        d = _nested_tapes(honest, x)
        _assert_close(residual(x).numpy(), (d["y0_x"] + d["lap0"]).numpy())
        _, gradients = _loss_and_gradients(tricked, lambda p, operator=residual: [operator(p)], x)
        _, expected = _loss_and_gradients(honest, lambda p: [_nested_tapes(honest, p)["y0_x"]
                                                             + _nested_tapes(honest, p)["lap0"]], x)
        for mine, reference in zip(gradients, expected):
            _assert_close(mine.numpy(), reference.numpy())


def test_gradient_hessian_laplacian_and_derivative_against_closed_forms():
    """u = exp(a.x) has gradient a u, Hessian a a^T u, Laplacian |a|^2 u and d3u/dx0 dx1^2 = a0 a1^2 u."""
    inputs = keras.Input((3,), dtype=F64)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="exponential", use_bias=False, dtype=F64)(inputs))
    a = np.array([0.5, -1.0, 2.0])
    model.set_weights([a[:, None]])
    x = _points(10)
    u = np.exp(x.numpy() @ a)
    np.testing.assert_allclose(derivcli.gradient(model, x).numpy(), u[:, None] * a, rtol=1e-13)
    np.testing.assert_allclose(derivcli.hessian(model, x).numpy(), u[:, None, None] * np.outer(a, a), rtol=1e-13)
    np.testing.assert_allclose(derivcli.laplacian(model, x).numpy(), u * (a @ a), rtol=1e-13)
    np.testing.assert_allclose(derivcli.laplacian(model, x, wrt="x1,x2").numpy(), u * 5.0, rtol=1e-13)
    np.testing.assert_allclose(derivcli.derivative(model, x, "x0,x1^2").numpy(), u * a[0] * a[1] ** 2, rtol=1e-13)
    np.testing.assert_allclose(derivcli.gradient(model, x, wrt="x2").numpy(), u[:, None] * a[2:], rtol=1e-13)
    # Made once per model and request: a call in every step neither plans nor traces again.
    assert training._made(model, "laplacian").traces == 1


def test_several_inputs_by_name_and_several_outputs():
    keras.utils.set_random_seed(8)
    t = keras.Input((1,), name="t", dtype=F64)
    x = keras.Input((2,), name="x", dtype=F64)
    hidden = keras.layers.Dense(8, activation="tanh", dtype=F64)(keras.layers.Concatenate(dtype=F64)([t, x]))
    model = keras.Model([t, x], keras.layers.Dense(2, dtype=F64)(hidden))
    flat = _points(6)
    by_name = {"t": flat[:, :1], "x": flat[:, 1:]}
    gradients = derivcli.gradient(model, by_name)
    assert gradients["t"].shape == (6, 2, 1) and gradients["x"].shape == (6, 2, 2)
    with tf.GradientTape() as tape:
        tape.watch(flat)
        first = model([flat[:, :1], flat[:, 1:]])[:, 1]
    expected = tape.gradient(first, flat).numpy()
    _assert_close(np.concatenate([gradients["t"][:, 1], gradients["x"][:, 1]], axis=1), expected)
    lap = derivcli.laplacian(model, [flat[:, :1], flat[:, 1:]], wrt="x")
    assert lap.shape == (6, 2)
    residual = derivcli.operator(model, "D(y1, t) - lap(y0)", wrt="x")
    d = derivcli.derivative(model, by_name, "t")
    _assert_close(residual(by_name).numpy(), (d[:, 1] - lap[:, 0]).numpy())


def test_bad_calls_are_one_line_errors():
    model = _mlp("tanh")
    with pytest.raises(UsageError, match="expected a keras.Model"):
        derivcli.operator(object(), "lap(y)")
    with pytest.raises(UsageError, match="'q' in the subscript is not an input"):
        derivcli.operator(model, "u_q", inputs="t,x,y", outputs="u")
    with pytest.raises(UsageError, match="engine='fast'"):
        derivcli.operator(model, "lap(y)", engine="fast")
    with pytest.raises(UsageError, match="3 input"):
        derivcli.operator(model, "lap(y)", inputs="x,y")
    residual = derivcli.operator(model, "lap(y)")
    with pytest.raises(UsageError, match=r"points of shape \(4, 2\)"):
        residual(tf.zeros((4, 2)))


def test_docstring_examples_run():
    failures, tried = doctest.testmod(training, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 10 and failures == 0


@pytest.mark.slow
def test_the_readme_training_example_trains_a_model_the_cli_gate_passes(tmp_path):
    """The README's example, as printed there: the Python block trains and saves; the console block after it runs."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from test_readme import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("#### Derivatives inside a training loss"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    console = re.search(r"```console\n(.*?)```", section, re.S).group(1).splitlines()
    (tmp_path / "train.py").write_text(code)
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "TF_CPP_MIN_LOG_LEVEL": "3"}
    trained = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=environment, capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    command = console[0][2:].rstrip("\\") + " " + console[1].strip()
    done = subprocess.run(["bash", "-c", command + " 2>&1"], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=300)
    assert console[3] == "$ echo $?" and done.returncode == int(console[4]) == 0, done.stdout
    # Training moves with the machine's round-off over 2,000 steps: the line's form, and a maximum under the gate.
    pattern = re.escape(console[2]).replace(re.escape("0.0376176"), r"([0-9.e-]+)").replace(
        re.escape("x=1, y=0"), r"x=[0-9.]+, y=[0-9.]+")
    found = re.fullmatch(pattern, done.stdout.strip())
    assert found and float(found.group(1)) <= 0.1, (console[2], done.stdout)
