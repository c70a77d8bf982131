"""`derivcli attribute`: each method against references written with plain `tf.GradientTape` on the saved
Keras model (rebuilt in float64 by Keras alone), determinism across batches and shards, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from test_tensor_inputs import float64_twin, token_model  # noqa: F401 (a fixture)

from conftest import SAMPLES, read_csv
from test_errors import assert_one_line_error

RNG = np.random.default_rng(11)
SOFTPLUS = SAMPLES / "softplus_2d.keras"
BARS, BARS_POINTS = SAMPLES / "bars_cnn.keras", SAMPLES / "bars.npz"


def gradients(model, points):
    """dy/dx of every output at each point, (N, M, D), by a plain tape (float64)."""
    import tensorflow as tf

    x = tf.constant(points)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=False)
    return y.numpy(), tape.batch_jacobian(y, x).numpy()


def trapezoid_ig(model, points, baseline, output, steps=4000):
    """Integrated gradients by the trapezoid rule on `steps` intervals: (x - x') * mean of the gradients."""
    alphas = np.linspace(0, 1, steps + 1)
    weights = np.r_[0.5, np.ones(steps - 1), 0.5] / steps
    rows = baseline[None] + alphas[:, None, None] * (points - baseline)[None]  # (steps + 1, N, D), one tape
    _, jacobian = gradients(model, rows.reshape(-1, points.shape[1]))
    along = jacobian[:, output, :].reshape(steps + 1, *points.shape)
    return (points - baseline) * np.einsum("k,knd->nd", weights, along)


def test_integrated_gradients_agree_with_a_fine_trapezoid_and_are_complete(cli):
    points = RNG.uniform(-1, 1, (6, 2))
    at = [arg for point in points for arg in ("--at", ",".join(map(str, point.tolist())))]
    result = cli("attribute", SOFTPLUS, *at, "--dtype", "float64", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table) == ["x0", "x1", "y", "attr(y)/x0", "attr(y)/x1", "delta(y)"]
    twin = float64_twin(SOFTPLUS)
    reference = trapezoid_ig(twin, points, np.zeros_like(points), 0)
    # The trapezoid rule's error on 4,000 intervals is below (1/4000)^2 * max|f''| / 12 ~ 1e-8 here.
    np.testing.assert_allclose(np.stack([table["attr(y)/x0"], table["attr(y)/x1"]], 1), reference, rtol=1e-7, atol=1e-8)
    values, _ = gradients(twin, points)
    at_zero, _ = gradients(twin, np.zeros_like(points))
    change = values[:, 0] - at_zero[:, 0]
    # Completeness: sum of attributions = y(x) - y(0), to 1e-6 relative in float64 (Gauss-Legendre at 50 steps).
    np.testing.assert_allclose(table["attr(y)/x0"] + table["attr(y)/x1"], change, rtol=1e-6, atol=1e-12)
    assert np.all(np.abs(table["delta(y)"]) <= 1e-6 * np.abs(change) + 1e-12)


@pytest.mark.parametrize("rule", ["riemann-left", "riemann-right", "riemann-middle", "riemann-trapezoid"])
def test_each_riemann_rule_is_its_sum(cli, rule):
    """5 steps of each rule: derivcli's columns equal the rule's sum written out here."""
    point = np.array([[0.4, -0.6]])
    result = cli("attribute", SOFTPLUS, "--at", "0.4,-0.6", "--dtype", "float64", "-f", "csv", "--steps", "5",
                 "--rule", rule)
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    k = np.arange(5.0)
    nodes = {"riemann-left": k / 5, "riemann-right": (k + 1) / 5, "riemann-middle": (k + 0.5) / 5,
             "riemann-trapezoid": k / 4}[rule]
    weights = np.r_[0.5, 1, 1, 1, 0.5] / 4 if rule == "riemann-trapezoid" else np.full(5, 0.2)
    twin = float64_twin(SOFTPLUS)
    expected = sum(w * gradients(twin, a * point)[1][0, 0] for a, w in zip(nodes, weights)) * point[0]
    np.testing.assert_allclose([table["attr(y)/x0"][0], table["attr(y)/x1"][0]], expected, rtol=1e-12)


def test_saliency_input_x_gradient_and_smoothgrad_without_noise_are_the_gradient(cli):
    points = RNG.uniform(-1, 1, (5, 2))
    at = [arg for point in points for arg in ("--at", ",".join(map(str, point.tolist())))]
    _, jacobian = gradients(float64_twin(SOFTPLUS), points)
    gradient = jacobian[:, 0, :]
    columns = ["attr(y)/x0", "attr(y)/x1"]
    for method, expected in (("saliency", np.abs(gradient)), ("input-x-gradient", points * gradient),
                             ("smoothgrad", gradient)):
        extra = ["--noise", "0"] if method == "smoothgrad" else []
        result = cli("attribute", SOFTPLUS, *at, "--method", method, "--dtype", "float64", "-f", "csv", *extra)
        assert result.exit_code == 0, result.stderr
        table = read_csv(result.stdout)
        assert "delta(y)" not in table
        np.testing.assert_allclose(np.stack([table[c] for c in columns], 1), expected, rtol=1e-10, atol=1e-14)


def test_smoothgrad_and_expected_gradients_follow_their_documented_draws(cli, tmp_path):
    """The draws are the seed's and the point's row number (numpy's default_rng([seed, row])); the gradients
    at the drawn rows come from a plain tape here."""
    points = RNG.uniform(-1, 1, (3, 2))
    pool = RNG.uniform(-1, 1, (7, 2))
    np.savez(tmp_path / "points.npz", x=points)
    np.savez(tmp_path / "pool.npz", x=pool)
    twin = float64_twin(SOFTPLUS)
    base = ["attribute", SOFTPLUS, "--npz", tmp_path / "points.npz", "--dtype", "float64", "-f", "csv", "--seed", "7",
            "--samples", "9"]
    smooth = read_csv(cli(*base, "--method", "smoothgrad", "--noise", "0.2").stdout)
    expected = cli(*base, "--method", "expected-gradients", "--baseline", tmp_path / "pool.npz")
    assert expected.exit_code == 0, expected.stderr
    drawn = read_csv(expected.stdout)
    for row, point in enumerate(points):
        rng = np.random.default_rng([7, row])
        noisy = point + rng.standard_normal((9, 2)) * 0.2 * (point.max() - point.min())
        reference = gradients(twin, noisy)[1][:, 0, :].mean(axis=0)
        np.testing.assert_allclose([smooth["attr(y)/x0"][row], smooth["attr(y)/x1"][row]], reference, rtol=1e-10)
        rng = np.random.default_rng([7, row])
        chosen = pool[rng.integers(7, size=9)]
        alphas = rng.uniform(size=9)
        along = gradients(twin, chosen + alphas[:, None] * (point - chosen))[1][:, 0, :]
        reference = ((point - chosen) * along).mean(axis=0)
        np.testing.assert_allclose([drawn["attr(y)/x0"][row], drawn["attr(y)/x1"][row]], reference, rtol=1e-10)
        at_baselines = gradients(twin, chosen)[0][:, 0].mean()
        y = gradients(twin, point[None])[0][0, 0]
        assert drawn["delta(y)"][row] == pytest.approx(reference.sum() - (y - at_baselines), abs=1e-12)


def test_an_image_classifier_s_top_class_is_attributed_along_the_whole_path(cli, tmp_path):
    """--target top picks each image's class at the image and keeps it on the path: completeness holds
    (a path row's own top class would break it), in float64 to 1e-9 of the logit's change."""
    import keras
    import tensorflow as tf

    result = cli("attribute", BARS, "--npz", BARS_POINTS, "--target", "top", "--logits", "--dtype", "float64",
                 "-o", tmp_path / "a.npz")
    assert result.exit_code == 0, result.stderr
    arrays = np.load(tmp_path / "a.npz")
    assert arrays["attr(y)/x"].shape == (4, 8, 8, 1) and arrays["target"].dtype == np.int64
    twin = float64_twin(BARS)
    logits = keras.Model(twin.inputs, twin.get_layer("logits").output)
    images = np.load(BARS_POINTS)["image"].astype(np.float64)
    change = (logits(tf.constant(images)).numpy() - logits(tf.constant(0 * images)).numpy())[np.arange(4), arrays["target"]]
    np.testing.assert_allclose(arrays["attr(y)/x"].reshape(4, -1).sum(axis=1), change, rtol=1e-9)
    assert np.all(np.abs(arrays["delta(y)"]) < 1e-9 * np.abs(change))


def test_the_same_draws_for_any_batch_size_and_shard(cli, tmp_path):
    """Byte for byte run to run and sharded against unsharded at one batch size; to round-off across sizes."""
    base = ["attribute", BARS, "--npz", BARS_POINTS, "--target", "top", "--method", "smoothgrad", "--samples", "6"]
    runs = {}
    for name, extra in (("a", ["--batch-size", "8"]), ("b", ["--batch-size", "8"]), ("c", ["--batch-size", "32"])):
        assert cli(*base, *extra, "-o", tmp_path / f"{name}.npz").exit_code == 0
        runs[name] = (tmp_path / f"{name}.npz").read_bytes()
    assert runs["a"] == runs["b"]
    for k in range(3):
        assert cli(*base, "--batch-size", "8", "--shard", f"{k}/3", "-o", tmp_path / f"part{k}.npz").exit_code == 0
    assert cli("merge", *[tmp_path / f"part{k}.npz" for k in range(3)], "-o", tmp_path / "m.npz").exit_code == 0
    assert (tmp_path / "m.npz").read_bytes() == runs["a"]
    a, c = np.load(tmp_path / "a.npz"), np.load(tmp_path / "c.npz")
    scale = np.abs(a["attr(y)/x"]).max()
    np.testing.assert_allclose(a["attr(y)/x"], c["attr(y)/x"], atol=1e-5 * scale)  # float32 round-off of a mean


def test_steps_auto_and_the_delta_gate(cli):
    base = ["attribute", SOFTPLUS, "--at", "0.9,-0.8", "--at", "0.1,0.2", "-f", "csv", "--dtype", "float64",
            "--rule", "riemann-left"]
    auto = cli(*base, "--steps", "auto", "--max-delta", "1e-4")
    assert auto.exit_code == 0, auto.stderr
    table = read_csv(auto.stdout)
    assert list(table)[-1] == "steps(y)" and set(table["steps(y)"]) <= {16, 32, 64, 128, 256, 512, 1024, 2048, 4096}
    assert np.all(np.abs(table["delta(y)"]) <= 1e-4) and table["steps(y)"].max() > 16  # riemann-left converges slowly
    coarse = cli(*base, "--steps", "4", "--max-delta", "1e-4")
    assert_one_line_error(coarse, 3, "max |delta(y)| =", "exceeds --max-delta 0.0001", "--steps auto")
    assert len(read_csv(coarse.stdout)["delta(y)"]) == 2  # the table is written whole before the gate


@pytest.mark.parametrize(("args", "fragment"), [
    (["--method", "lrp"], "--method 'lrp': choose one of integrated-gradients, saliency, input-x-gradient, smoothgrad, "
                          "expected-gradients"),
    (["--steps", "0"], "--steps '0': give a whole number of at least 1"),
    (["--noise", "-0.1", "--method", "smoothgrad"], "--noise -0.1: give a fraction of each point's range, 0 or more"),
    (["--rule", "simpson"], "--rule 'simpson': choose one of gauss-legendre, riemann-left"),
    (["--method", "expected-gradients"], "draws its baselines from a file: give --baseline FILE"),
    (["--method", "saliency", "--max-delta", "0.1"], "saliency has no delta"),
    (["--wrt", "q"], "'q' is not an input"),
])
def test_attribute_usage_errors(cli, args, fragment):
    assert_one_line_error(cli("attribute", SOFTPLUS, "--at", "0.1,0.2", *args), 2, fragment)


def test_a_baseline_file_gives_one_baseline_or_one_per_point(cli, tmp_path):
    points = RNG.uniform(-1, 1, (3, 2))
    np.savez(tmp_path / "points.npz", x=points)
    np.savez(tmp_path / "one.npz", x=np.array([[0.5, -0.5]]))
    np.savez(tmp_path / "each.npz", x=points * 0.5)
    np.savez(tmp_path / "two.npz", x=points[:2])
    twin = float64_twin(SOFTPLUS)
    base = ["attribute", SOFTPLUS, "--npz", tmp_path / "points.npz", "--dtype", "float64", "-f", "csv"]
    for name, baseline in (("one", np.array([[0.5, -0.5]])), ("each", points * 0.5)):
        table = read_csv(cli(*base, "--baseline", tmp_path / f"{name}.npz").stdout)
        reference = trapezoid_ig(twin, points, np.broadcast_to(baseline, points.shape), 0, steps=2000)
        np.testing.assert_allclose(np.stack([table["attr(y)/x0"], table["attr(y)/x1"]], 1), reference, rtol=1e-6,
                                   atol=1e-9)
    assert_one_line_error(cli(*base, "--baseline", tmp_path / "two.npz"), 2, "2 baselines for 3 points")


def test_a_wrt_subset_moves_only_its_coordinates_along_the_path(cli):
    """--wrt x1: the baseline replaces x1 only, so the attribution is y(x) - y(x0, 0), whole."""
    result = read_csv(cli("attribute", SOFTPLUS, "--at", "0.3,0.7", "--wrt", "x1", "--dtype", "float64", "-f",
                          "csv").stdout)
    twin = float64_twin(SOFTPLUS)
    y = gradients(twin, np.array([[0.3, 0.7], [0.3, 0.0]]))[0][:, 0]
    assert list(result) == ["x0", "x1", "y", "attr(y)/x1", "delta(y)"]
    assert result["attr(y)/x1"][0] == pytest.approx(y[0] - y[1], rel=1e-12)


def test_layer_integrated_gradients_on_an_embedding_give_one_attribution_per_token(cli, token_model):  # noqa: F811
    """--layer on an Embedding: per token, the integral of h_t . dy/dz_t along z = a h; the tokens' sum is
    f(x) - f(x with the layer's output at zero). The reference scales the twin's embedding table by a and takes
    the tape's gradient with respect to the table (20 Gauss-Legendre nodes, written out here)."""
    import tensorflow as tf

    folder, ids, values = token_model
    result = cli("attribute", folder / "tokens.keras", "--npz", folder / "points.npz", "--layer", "embedding",
                 "--dtype", "float64", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert [name for name in table if name.startswith("attr(")] == [f"attr(y)/embedding{t}" for t in range(4)]
    twin = float64_twin(folder / "tokens.keras")
    embedding = twin.get_layer("embedding")
    table_weights = embedding.get_weights()[0].copy()
    nodes, weights = np.polynomial.legendre.leggauss(20)
    for row, (tokens, features) in enumerate(zip(ids, values)):
        if len(set(tokens)) < len(tokens):
            continue  # a repeated id shares its table row: this reference needs distinct ids
        reference = np.zeros(4)
        for node, weight in zip((nodes + 1) / 2, weights / 2):
            embedding.embeddings.assign(node * table_weights)
            with tf.GradientTape() as tape:
                y = twin([tf.constant(tokens[None]), tf.constant(features[None])], training=False)[0, 0]
            gradient = tf.convert_to_tensor(tape.gradient(y, embedding.embeddings)).numpy()
            reference += weight * np.array([gradient[t] @ table_weights[t] for t in tokens])
        embedding.embeddings.assign(table_weights)
        got = [table[f"attr(y)/embedding{t}"][row] for t in range(4)]
        np.testing.assert_allclose(got, reference, rtol=1e-9, atol=1e-12)
        embedding.embeddings.assign(0 * table_weights)
        at_zero = twin([tf.constant(tokens[None]), tf.constant(features[None])], training=False).numpy()[0, 0]
        embedding.embeddings.assign(table_weights)
        assert sum(got) == pytest.approx(table["y"][row] - at_zero, rel=1e-9, abs=1e-12)
        assert abs(table["delta(y)"][row]) < 1e-12


def test_layer_attributions_of_a_conv_layer_keep_its_shape(cli, tmp_path):
    result = cli("attribute", BARS, "--npz", BARS_POINTS, "--target", "top", "--logits", "--layer", "conv",
                 "--dtype", "float64", "-o", tmp_path / "conv.npz")
    assert result.exit_code == 0, result.stderr
    arrays = np.load(tmp_path / "conv.npz")
    assert arrays["attr(y)/conv"].shape == (4, 6, 6, 4)
    assert np.all(np.abs(arrays["delta(y)"]) < 1e-9 * np.abs(arrays["y"]))
    assert_one_line_error(cli("attribute", BARS, "--npz", BARS_POINTS, "--layer", "nope"), 2,
                          "--layer 'nope': no layer of that name (layers: ")
    assert_one_line_error(cli("attribute", BARS, "--npz", BARS_POINTS, "--layer", "conv", "--method", "saliency"), 2,
                          "--layer attributes by integrated gradients")


def test_attribute_plot_draws_sixteen_images_four_across(cli, tmp_path, monkeypatch):
    images = np.concatenate([np.load(BARS_POINTS)["image"]] * 5)[:18]
    np.savez(tmp_path / "images.npz", image=images)
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "400")
    terminal = cli("attribute", BARS, "--npz", tmp_path / "images.npz", "--target", "top", "--plot", "-",
                   "-o", tmp_path / "a.npz")
    assert terminal.exit_code == 0, terminal.stderr
    titles = [line.split(" x: ")[0].split(" attr(y)/x: ")[0] for line in terminal.stdout.splitlines()
              if line.startswith("point ")]
    assert len(titles) == 32 and titles[-1].startswith("point 16, target ") and ", delta " in titles[-1]
    from test_plots import overlapping

    from derivcli.plots import PlotData, View, build_figure

    data = [PlotData([("column", np.arange(8.0)), ("row", np.arange(8.0))],
                     {"x": np.ones((8, 8)), "attr(y)/x": np.eye(8) - 0.5}, label=f"point {k}, target 1, delta 1e-07",
                     image=True) for k in range(1, 17)]
    figure = build_figure(data, [View([0, 1], {}, "")] * 16)
    shown = [axis for axis in figure.axes if axis.get_visible() and axis.get_label() != "<colorbar>"]
    assert len(shown) == 32 and len({round(axis.get_position().x0, 3) for axis in shown}) == 4
    assert overlapping(figure) == []


def test_auto_rows_follow_the_row_s_bytes():
    from derivcli.attribution import auto_rows

    assert auto_rows(784, 65536) == 1024  # a 28x28 image: the cap in rows
    assert auto_rows(224 * 224 * 3, 65536) == 128  # a 224x224x3 image: 1.2 MB a row, 256 MB of rows
    assert auto_rows(2, 300) == 256  # the estimate, as a power of two
