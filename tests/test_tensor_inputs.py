"""Models as people save them: image and sequence inputs keep their shapes and are named by index.

References never use derivcli's code: the saved .keras file is loaded by Keras, rebuilt here in
float64 (every layer's dtype policy rewritten, weights cast) and differentiated with plain
`tf.GradientTape` / `batch_jacobian`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_csv

RNG = np.random.default_rng(7)


def _float64_config(node):
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" or node.get("module") == "keras" and "DTypePolicy" in str(
                node.get("class_name")):
            return {**node, "config": {**node["config"], "name": "float64"}}
        return {key: ("float64" if key == "dtype" and value == "float32" else _float64_config(value))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_float64_config(item) for item in node]
    return node


def float64_twin(path):
    """The saved model rebuilt in float64 by Keras alone: the reference's function."""
    import keras

    model = keras.models.load_model(path, compile=False)
    twin = keras.Model.from_config(_float64_config(json.loads(json.dumps(model.get_config()))))
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    assert all(w.dtype == "float64" for w in twin.weights)
    return twin


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(3)
    folder = tmp_path_factory.mktemp("tensor_models")
    image = keras.Input((6, 6, 1), name="image")
    hidden = keras.layers.Conv2D(3, 3, activation="tanh")(image)
    hidden = keras.layers.AveragePooling2D(2)(hidden)
    logits = keras.layers.Dense(4, name="logits")(keras.layers.Flatten()(hidden))
    keras.Model(image, keras.layers.Softmax()(logits)).save(folder / "cnn.keras")
    series = keras.Input((5, 2), name="series")
    keras.Model(series, keras.layers.Dense(1)(keras.layers.GRU(3)(series))).save(folder / "gru.keras")
    picture = keras.Input((4, 4, 1), name="picture")
    features = keras.Input((3,), name="feat")
    joined = keras.layers.Concatenate()([keras.layers.Flatten()(keras.layers.Conv2D(2, 2, activation="softplus")(picture)),
                                         features])
    keras.Model([picture, features], keras.layers.Dense(2, activation="tanh")(joined)).save(folder / "two.keras")
    return folder


def jacobian(model, inputs):
    import tensorflow as tf

    tensors = [tf.constant(x) for x in inputs]
    with tf.GradientTape(persistent=True) as tape:
        for t in tensors:
            tape.watch(t)
        y = model(tensors if len(tensors) > 1 else tensors[0], training=False)
    return y.numpy(), [tape.batch_jacobian(y, t).numpy() for t in tensors]


def test_an_image_model_is_named_by_index_and_takes_its_images_in_their_shape(cli, models, tmp_path):
    images = RNG.uniform(-1, 1, (7, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images)
    result = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--dtype", "float64", "-f", "csv",
                 "--inputs")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    names = list(table)
    assert names[:3] == ["x[0,0,0]", "x[0,1,0]", "x[0,2,0]"] and names[35] == "x[5,5,0]"
    assert names[36:40] == ["y0", "y1", "y2", "y3"] and names[40] == "dy0/dx[0,0,0]"
    values, (jac,) = jacobian(float64_twin(models / "cnn.keras"), [images])
    np.testing.assert_array_equal(np.stack([table[f"x[{i},{j},0]"] for i in range(6) for j in range(6)], 1),
                                  images.reshape(7, 36))
    for output in range(4):
        np.testing.assert_allclose(table[f"y{output}"], values[:, output], rtol=1e-12)
        for i, j in [(0, 0), (3, 2), (5, 5), (2, 4)]:
            np.testing.assert_allclose(table[f"dy{output}/dx[{i},{j},0]"], jac[:, output, i, j, 0],
                                       rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("arrays", [
    lambda images: {"x": images},                                  # a single input's array may be x
    lambda images: {"pixels": images},                             # or the file's only array
    lambda images: {"image": np.asfortranarray(images)},           # column-major, as MATLAB and Fortran write
    lambda images: {"x": images.reshape(len(images), -1)},         # flat rows keep working
])
def test_every_way_to_give_images_in_an_npz_is_the_same_points(cli, models, tmp_path, arrays):
    images = RNG.uniform(-1, 1, (3, 6, 6, 1))
    np.savez(tmp_path / "reference.npz", image=images)
    np.savez(tmp_path / "given.npz", **arrays(images))
    expected = cli("grad", models / "cnn.keras", "--npz", tmp_path / "reference.npz", "-f", "csv")
    given = cli("grad", models / "cnn.keras", "--npz", tmp_path / "given.npz", "-f", "csv")
    assert given.exit_code == 0, given.stderr
    assert given.stdout == expected.stdout


def test_one_image_without_the_batch_axis_is_one_point(cli, models, tmp_path):
    image = RNG.uniform(-1, 1, (6, 6, 1))
    np.savez(tmp_path / "one.npz", image=image)
    np.savez(tmp_path / "batch.npz", image=image[None])
    one = cli("eval", models / "cnn.keras", "--npz", tmp_path / "one.npz", "-f", "csv")
    assert one.exit_code == 0 and one.stdout == cli("eval", models / "cnn.keras", "--npz", tmp_path / "batch.npz",
                                                     "-f", "csv").stdout
    assert len(one.stdout.splitlines()) == 2


def test_an_array_of_the_wrong_shape_says_which_shapes_the_input_takes(cli, models, tmp_path):
    np.savez(tmp_path / "bad.npz", image=np.zeros((3, 36, 1)))
    result = cli("grad", models / "cnn.keras", "--npz", tmp_path / "bad.npz")
    assert result.exit_code == 1
    assert "array 'image' has shape (3, 36, 1); input 'image' takes (N, 6, 6, 1) for N points, or (6, 6, 1) for one" \
        in result.stderr


def test_second_derivatives_of_a_sequence_model_by_index(cli, models, tmp_path):
    """Orders 2 and 3 through a GRU, with respect to elements of a (5, 2) series, against nested tapes."""
    import tensorflow as tf

    series = RNG.uniform(-1, 1, (4, 5, 2))
    np.savez(tmp_path / "series.npz", series=series)
    result = cli("deriv", models / "gru.keras", "--npz", tmp_path / "series.npz", "--dtype", "float64", "-f", "csv",
                 "--partial", "x[1,0]^2", "--partial", "x[0,1],x[4,0]", "--partial", "x[2,1]^2,x[3,0]")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table)[-3:] == ["d2y/dx[1,0]^2", "d2y/dx[0,1]dx[4,0]", "d3y/dx[2,1]^2dx[3,0]"]
    twin = float64_twin(models / "gru.keras")
    x = tf.constant(series)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(x)
        with tf.GradientTape(persistent=True) as middle:
            middle.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = tf.reduce_sum(twin(x, training=False))
            first = inner.gradient(y, x)
            picked = {"10": tf.reduce_sum(first[:, 1, 0]), "01": tf.reduce_sum(first[:, 0, 1]),
                      "21": tf.reduce_sum(first[:, 2, 1])}
        second = {key: middle.gradient(value, x) for key, value in picked.items()}
        third_of = tf.reduce_sum(second["21"][:, 2, 1])
    third = outer.gradient(third_of, x)
    np.testing.assert_allclose(table["d2y/dx[1,0]^2"], second["10"][:, 1, 0].numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["d2y/dx[0,1]dx[4,0]"], second["01"][:, 4, 0].numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["d3y/dx[2,1]^2dx[3,0]"], third[:, 3, 0].numpy(), rtol=1e-9, atol=1e-12)


def test_two_inputs_of_different_ranks_by_name(cli, models, tmp_path):
    pictures, features = RNG.uniform(-1, 1, (5, 4, 4, 1)), RNG.uniform(-1, 1, (5, 3))
    np.savez(tmp_path / "two.npz", picture=pictures, feat=features)
    result = cli("grad", models / "two.keras", "--npz", tmp_path / "two.npz", "--dtype", "float64", "-f", "csv",
                 "--wrt", "picture", "--inputs")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    names = list(table)
    assert names[:17] == [f"picture[{i},{j},0]" for i in range(4) for j in range(4)] + ["feat0"]
    assert not any(name.startswith("dy0/dfeat") for name in names)  # --wrt picture: the image alone
    assert sum(name.startswith("dy1/dpicture[") for name in names) == 16
    _, (picture_jacobian, _) = jacobian(float64_twin(models / "two.keras"), [pictures, features])
    np.testing.assert_allclose(table["dy1/dpicture[2,3,0]"], picture_jacobian[:, 1, 2, 3, 0], rtol=1e-10, atol=1e-13)


def test_expressions_and_errors_name_elements_by_index(cli, models, tmp_path):
    images = RNG.uniform(-1, 1, (2, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images)
    source = ["--npz", tmp_path / "images.npz", "--dtype", "float64", "-f", "csv"]
    grad = read_csv(cli("grad", models / "cnn.keras", *source).stdout)
    op = cli("op", models / "cnn.keras", *source, "--expr", "g=D(y2, x[3,2,0]) + 0*y0", "--expr", "v=x[1,1,0]")
    assert op.exit_code == 0, op.stderr
    table = read_csv(op.stdout)
    np.testing.assert_allclose(table["g"], grad["dy2/dx[3,2,0]"], rtol=1e-12)
    np.testing.assert_array_equal(table["v"], images[:, 1, 1, 0])
    unknown = cli("grad", models / "cnn.keras", *source, "--wrt", "z")
    assert unknown.exit_code == 2
    assert "'z' is not an input (inputs: x[0,0,0] … x[5,5,0] (36 elements))" in unknown.stderr
    out_of_range = cli("op", models / "cnn.keras", *source, "--expr", "D(y2, x[6,0,0])")
    assert out_of_range.exit_code == 2 and "x[0,0,0] … x[5,5,0] (36 elements)" in out_of_range.stderr


def test_info_shows_a_tensor_input_by_its_first_and_last_element(cli, models):
    result = cli("info", models / "cnn.keras")
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("input"))
    assert "(None, 6, 6, 1)" in line and "x[0,0,0] … x[5,5,0] (36 elements)" in line
    described = json.loads(cli("info", models / "cnn.keras", "--format", "json").stdout)
    assert len(described["inputs"][0]["coordinates"]) == 36


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_npz_and_hdf5_results_keep_the_model_shapes(cli, models, tmp_path, suffix):
    """The images come back as one array, each gradient of an output as one array in the image's shape."""
    from derivcli.writers import read_columns

    images = RNG.uniform(-1, 1, (5, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images, )
    out = tmp_path / f"grad{suffix}"
    result = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--dtype", "float64", "-o", out)
    assert result.exit_code == 0, result.stderr
    arrays = read_columns(str(out))
    assert sorted(arrays) == sorted(["x", "y0", "y1", "y2", "y3", "dy0/dx", "dy1/dx", "dy2/dx", "dy3/dx"])
    np.testing.assert_array_equal(arrays["x"], images)
    values, (jac,) = jacobian(float64_twin(models / "cnn.keras"), [images])
    for output in range(4):
        assert arrays[f"dy{output}/dx"].shape == (5, 6, 6, 1)
        np.testing.assert_allclose(arrays[f"dy{output}/dx"], jac[:, output], rtol=1e-10, atol=1e-13)


def test_a_hessian_of_a_sequence_input_is_one_block_of_shape_n_shape_shape(cli, models, tmp_path):
    import tensorflow as tf

    series = RNG.uniform(-1, 1, (3, 5, 2))
    np.savez(tmp_path / "series.npz", series=series)
    out = tmp_path / "hessian.npz"
    result = cli("hessian", models / "gru.keras", "--npz", tmp_path / "series.npz", "--dtype", "float64", "-o", out)
    assert result.exit_code == 0, result.stderr
    with np.load(out) as arrays:
        assert sorted(arrays.files) == ["d2y/dx^2", "x", "y"]
        block = arrays["d2y/dx^2"]
    twin = float64_twin(models / "gru.keras")
    x = tf.constant(series)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = tf.reduce_sum(twin(x, training=False))
        gradient = inner.gradient(y, x)
    reference = outer.batch_jacobian(gradient, x).numpy()  # (N, 5, 2, 5, 2)
    assert block.shape == (3, 5, 2, 5, 2)
    np.testing.assert_allclose(block, reference, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(block, block.transpose(0, 3, 4, 1, 2))  # the lower triangle is the upper's


def test_shaped_shards_merge_to_the_whole_run(cli, models, tmp_path):
    images = RNG.uniform(-1, 1, (11, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images, label=np.arange(11) % 4, onehot=np.eye(4)[np.arange(11) % 4])
    base = ["grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--batch-size", "4", "--target", "label"]
    assert cli(*base, "-o", tmp_path / "whole.npz").exit_code == 0
    assert sorted(np.load(tmp_path / "whole.npz").files) == ["dy/dx", "label", "onehot", "target", "x", "y"]
    for k in range(3):
        assert cli(*base, "--shard", f"{k}/3", "-o", tmp_path / f"part{k}.npz").exit_code == 0
    merged = cli("merge", *[tmp_path / f"part{k}.npz" for k in range(3)], "-o", tmp_path / "merged.npz")
    assert merged.exit_code == 0, merged.stderr
    assert (tmp_path / "merged.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()


def test_text_formats_stay_one_column_per_element(cli, models, tmp_path):
    images = RNG.uniform(-1, 1, (2, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images)
    text = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-f", "csv", "--dtype", "float64")
    binary = tmp_path / "grad.npz"
    assert cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-o", binary,
               "--dtype", "float64").exit_code == 0
    table = read_csv(text.stdout)
    with np.load(binary) as arrays:
        for i, j in [(0, 0), (4, 1), (5, 5)]:
            assert table[f"dy3/dx[{i},{j},0]"].tolist() == arrays["dy3/dx"][:, i, j, 0].tolist()


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    """An Embedding over int32 token ids beside two float features, and points for it."""
    import keras

    keras.utils.set_random_seed(5)
    folder = tmp_path_factory.mktemp("tokens")
    tokens, features = keras.Input((4,), name="tokens", dtype="int32"), keras.Input((2,), name="feat")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(50, 3, name="embedding")(tokens))
    hidden = keras.layers.Dense(3, activation="tanh")(keras.layers.Concatenate()([embedded, features]))
    keras.Model([tokens, features], keras.layers.Dense(1)(hidden)).save(folder / "tokens.keras")
    ids, values = np.array([[1, 2, 3, 4], [5, 6, 7, 49], [0, 0, 9, 9]], dtype=np.int32), RNG.uniform(-1, 1, (3, 2))
    np.savez(folder / "points.npz", tokens=ids, feat=values)
    return folder, ids, values


def test_integer_inputs_are_held_and_never_differentiated(cli, token_model):
    import tensorflow as tf

    folder, ids, values = token_model
    source = ["--npz", folder / "points.npz", "--dtype", "float64", "-f", "csv"]
    result = cli("grad", folder / "tokens.keras", *source)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "tokens0,tokens1,tokens2,tokens3,feat0,feat1,y,dy/dfeat0,dy/dfeat1"
    table = read_csv(result.stdout)
    assert [table[f"tokens{k}"].tolist() for k in range(4)] == ids.T.tolist()  # written back as whole numbers
    assert result.stdout.splitlines()[2].startswith("5,6,7,49,")
    twin = float64_twin(folder / "tokens.keras")
    x = tf.constant(values)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = twin([tf.constant(ids), x], training=False)
    np.testing.assert_allclose(table["y"], y.numpy()[:, 0], rtol=1e-12)
    gradient = tape.gradient(y, x).numpy()
    np.testing.assert_allclose(np.stack([table["dy/dfeat0"], table["dy/dfeat1"]], 1), gradient, rtol=1e-10)
    hessian = read_csv(cli("hessian", folder / "tokens.keras", *source).stdout)
    assert [name for name in hessian if name.startswith("d2")] == ["d2y/dfeat0^2", "d2y/dfeat0dfeat1", "d2y/dfeat1^2"]
    laplacian = cli("laplacian", folder / "tokens.keras", *source)
    assert laplacian.exit_code == 0 and laplacian.stdout.splitlines()[0].endswith(",y,laplacian(y)")


@pytest.mark.parametrize("options", [
    ["grad", "--wrt", "tokens"], ["grad", "--wrt", "tokens2,feat0"], ["deriv", "--partial", "tokens1"],
    ["deriv", "--direction", "tokens0=1,feat0=1"], ["op", "--expr", "D(y, tokens3) + y"],
])
def test_naming_an_integer_input_for_a_derivative_is_a_usage_error(cli, token_model, options):
    folder, _, _ = token_model
    command, *rest = options
    result = cli(command, folder / "tokens.keras", "--npz", folder / "points.npz", *rest)
    assert result.exit_code == 2, result.stderr
    assert "is a discrete input (int32: token ids, categories or labels), and a derivative with respect to a discrete input " \
           "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_token_ids_are_never_rounded(cli, token_model, tmp_path):
    """float32 carries whole numbers exactly to 2**24: a larger id is refused, never rounded; float64 carries it,
    and the model's own lookup then says it is outside the vocabulary."""
    folder, _, _ = token_model
    np.savez(tmp_path / "big.npz", tokens=np.array([[1, 2, 3, 2**24 + 1]], dtype=np.int64), feat=np.zeros((1, 2)))
    np.savez(tmp_path / "half.npz", tokens=np.array([[1, 2, 3.5, 4]]), feat=np.zeros((1, 2)))
    refused = cli("eval", folder / "tokens.keras", "--npz", tmp_path / "big.npz")
    assert refused.exit_code == 1
    assert "tokens3=1.67772e+07 (point 1) is not a value of the int32 input: it takes whole numbers up to 16777216 " \
           "in float32; use --dtype float64" in refused.stderr
    outside = cli("eval", folder / "tokens.keras", "--npz", tmp_path / "big.npz", "--dtype", "float64")
    assert outside.exit_code == 1 and "holds 16777217" in outside.stderr and "outside the 50 rows" in outside.stderr
    half = cli("eval", folder / "tokens.keras", "--npz", tmp_path / "half.npz")
    assert half.exit_code == 1 and "tokens2=3.5 (point 1) is not a value of the int32 input" in half.stderr


def test_check_and_doctor_leave_integer_inputs_out(cli, token_model):
    folder, _, _ = token_model
    checked = cli("check", folder / "tokens.keras", "--npz", folder / "points.npz", "-f", "csv")
    assert checked.exit_code == 0, checked.stderr
    assert [line.split(",")[0] for line in checked.stdout.splitlines()[1:]] == [
        "dy/dfeat0", "dy/dfeat1", "d2y/dfeat0^2", "d2y/dfeat0dfeat1", "d2y/dfeat1^2"]
    doctor = cli("doctor", folder / "tokens.keras")
    assert doctor.exit_code == 0, doctor.stderr
    assert "32 random points in [-1, 1]^2, ids 0 or 1 for the 4 discrete coordinate(s)" in doctor.stdout


def test_target_top_and_index_differentiate_one_class_per_image(cli, models, tmp_path):
    images = RNG.uniform(-1, 1, (9, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images)
    source = ["--npz", tmp_path / "images.npz", "--dtype", "float64", "-f", "csv"]
    result = cli("grad", models / "cnn.keras", *source, "--target", "top")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table)[:3] == ["y", "target", "dy/dx[0,0,0]"]  # the pixels left out of text, by default
    values, (jac,) = jacobian(float64_twin(models / "cnn.keras"), [images])
    top = values.argmax(axis=1)
    assert len(set(top)) > 1  # the points do not all pick one class
    np.testing.assert_array_equal(table["target"], top)
    np.testing.assert_allclose(table["y"], values.max(axis=1), rtol=1e-12)
    picked = jac[np.arange(9), top]  # (9, 6, 6, 1)
    for i, j in [(0, 0), (2, 3), (5, 1)]:
        np.testing.assert_allclose(table[f"dy/dx[{i},{j},0]"], picked[:, i, j, 0], rtol=1e-10, atol=1e-13)
    fixed = read_csv(cli("grad", models / "cnn.keras", *source, "--target", "2").stdout)
    assert set(fixed["target"]) == {2}
    np.testing.assert_allclose(fixed["dy/dx[4,4,0]"], jac[:, 2, 4, 4, 0], rtol=1e-10, atol=1e-13)


def test_logits_leave_out_a_softmax_layer_or_activation(cli, models, tmp_path):
    import keras

    images = RNG.uniform(-1, 1, (4, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images)
    result = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--dtype", "float64", "-f", "csv",
                 "--logits", "--target", "top")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    twin = float64_twin(models / "cnn.keras")
    logits_model = keras.Model(twin.inputs, twin.get_layer("logits").output)
    values, (jac,) = jacobian(logits_model, [images])
    top = values.argmax(axis=1)
    np.testing.assert_array_equal(table["target"], top)
    np.testing.assert_allclose(table["y"], values.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(table["dy/dx[1,2,0]"], jac[np.arange(4), top, 1, 2, 0], rtol=1e-10, atol=1e-13)
    # A Dense layer's own softmax activation: its pre-activation, computed here from the weights.
    keras.utils.set_random_seed(2)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    keras.Model(inputs, keras.layers.Dense(4, activation="sigmoid")(hidden)).save(tmp_path / "dense.keras")
    weights = float64_twin(tmp_path / "dense.keras").get_weights()
    point = np.array([[0.3, -0.2, 0.7]])
    logits = np.tanh(point @ weights[0] + weights[1]) @ weights[2] + weights[3]
    dense = read_csv(cli("eval", tmp_path / "dense.keras", "--at", "0.3,-0.2,0.7", "--logits", "--dtype", "float64",
                         "-f", "csv").stdout)
    np.testing.assert_allclose([dense[f"y{k}"][0] for k in range(4)], logits[0], rtol=1e-12)


@pytest.mark.parametrize(("options", "status", "fragment"), [
    (["--logits"], 2, "ends in no softmax or sigmoid to leave out (its output layers: dense"),
    (["--target", "5"], 2, "--target 5: the model has 1 output elements"),
    (["--target", "-1"], 2, "give top (the largest output element at each point), an output index"),
    (["--target", "x"], 2, "--target x: 'x' names an input or an output"),
    (["--target", "top", "--output-names", "u"], 2, "leave out --output-names"),
])
def test_target_and_logits_errors(cli, models, options, status, fragment):
    result = cli("grad", models / "gru.keras", "--at", ",".join(["0.1"] * 10), *options)
    assert result.exit_code == status, result.stderr
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_target_name_takes_each_points_class_from_its_labels(cli, models, tmp_path):
    images, labels = RNG.uniform(-1, 1, (6, 6, 6, 1)), np.array([0, 3, 1, 2, 3, 0], dtype=np.int32)
    np.savez(tmp_path / "images.npz", image=images, label=labels)
    result = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--dtype", "float64", "-f", "csv",
                 "--target", "label")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table)[:4] == ["label", "y", "target", "dy/dx[0,0,0]"]  # the labels, held as the points' own
    assert "dy/dlabel" not in table
    values, (jac,) = jacobian(float64_twin(models / "cnn.keras"), [images])
    np.testing.assert_array_equal(table["target"], labels)
    np.testing.assert_allclose(table["y"], values[np.arange(6), labels], rtol=1e-12)
    for i, j in [(0, 0), (3, 4), (5, 5)]:
        np.testing.assert_allclose(table[f"dy/dx[{i},{j},0]"], jac[np.arange(6), labels, i, j, 0], rtol=1e-10, atol=1e-13)
    # The same labels as a CSV column, read from standard input, and their second derivatives.
    text = "a,b,label\n0.3,-0.2,2\n0.1,0.5,0\n"
    import keras

    keras.utils.set_random_seed(4)
    inputs = keras.Input((2,))
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(4, activation="tanh")(inputs))
                ).save(tmp_path / "vector.keras")
    csv_result = cli("hessian", tmp_path / "vector.keras", "--csv", "-", "--target", "label", "--logits", "--dtype",
                     "float64", "--names", "a,b", "-f", "csv", input=text)
    assert csv_result.exit_code == 0, csv_result.stderr
    hessians = read_csv(csv_result.stdout)
    weights = float64_twin(tmp_path / "vector.keras").get_weights()
    for row, (point, label) in enumerate([([0.3, -0.2], 2), ([0.1, 0.5], 0)]):
        h = np.tanh(np.array(point) @ weights[0] + weights[1])  # logit = sum_k w2[k, label] tanh(a_k)
        curvature = -2 * h * (1 - h**2) * weights[2][:, label]  # d2 tanh(a) / da2 = -2 tanh (1 - tanh^2)
        expected = (weights[0] * curvature) @ weights[0].T
        assert hessians["target"][row] == label
        np.testing.assert_allclose([hessians["d2y/da^2"][row], hessians["d2y/dadb"][row], hessians["d2y/db^2"][row]],
                                   [expected[0, 0], expected[0, 1], expected[1, 1]], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"label": np.array([0, 4])}, "label=4 (point 2) is not an output index: --target label picks one of the model's "
                                  "4 output elements (0 to 3)"),
    ({"label": np.array([0, 1.5])}, "label=1.5 (point 2) is not an output index"),
    ({}, "no array named 'label'"),
])
def test_labels_that_are_not_output_indices_are_one_line_errors(cli, models, tmp_path, arrays, fragment):
    np.savez(tmp_path / "images.npz", image=RNG.uniform(-1, 1, (2, 6, 6, 1)), **arrays)
    result = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--target", "label", "-f", "csv")
    assert result.exit_code == 1 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_other_arrays_pass_through_in_their_dtype_and_shape(cli, models, tmp_path, suffix):
    import h5py

    images = RNG.uniform(-1, 1, (5, 6, 6, 1))
    arrays = {"image": images, "ids": np.arange(2**40, 2**40 + 5, dtype=np.int64), "mask": np.eye(5, 3, dtype=bool),
              "weight": np.linspace(0, 1, 5, dtype=np.float32), "classes": np.arange(4)}
    points = tmp_path / f"points{suffix}"
    if suffix == ".npz":
        np.savez(points, **arrays)
    else:
        with h5py.File(points, "w") as handle:
            for name, array in arrays.items():
                handle[name] = array
    option = "--npz" if suffix == ".npz" else "--hdf5"
    text = cli("eval", models / "cnn.keras", option, points, "--target", "top", "-f", "csv")
    assert text.exit_code == 0, text.stderr
    assert "array 'classes' of shape (4,) is not one row per point (5 points)" in text.stderr
    table = read_csv(text.stdout)
    assert list(table) == ["ids", "mask0", "mask1", "mask2", "weight", "y", "target"]
    assert text.stdout.splitlines()[1].split(",")[0] == str(2**40)  # not through float32
    assert list(table["mask1"]) == ["false", "true", "false", "false", "false"]
    np.testing.assert_array_equal(table["weight"].astype(np.float32), arrays["weight"])
    out = tmp_path / f"out{suffix}"
    binary = cli("grad", models / "cnn.keras", option, points, "--target", "top", "-o", out)
    assert binary.exit_code == 0, binary.stderr
    from derivcli.writers import read_columns

    result = read_columns(str(out))
    for name in ("ids", "mask", "weight"):
        assert result[name].dtype == arrays[name].dtype and result[name].shape == arrays[name].shape, name
        np.testing.assert_array_equal(result[name], arrays[name])
    assert result["target"].dtype == np.int64 and "classes" not in result
    assert result["dy/dx"].shape == (5, 6, 6, 1)
    jsonl = cli("eval", models / "cnn.keras", option, points, "--target", "top", "-f", "jsonl")
    first = json.loads(jsonl.stdout.splitlines()[0])
    assert first["ids"] == 2**40 and first["mask0"] is True and first["target"] in range(4)


def test_the_index_target_picked_has_no_derivative(cli, models, tmp_path):
    np.savez(tmp_path / "images.npz", image=RNG.uniform(-1, 1, (2, 6, 6, 1)))
    result = cli("op", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--target", "top",
                 "--expr", "D(target, x[0,0,0])")
    assert result.exit_code == 2 and "target is the index --target picked" in result.stderr
    checked = cli("check", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--target", "top", "--logits",
                  "--partial", "x[2,2,0]", "--partial", "x[2,2,0]^2")
    assert checked.exit_code == 0, checked.stderr + checked.stdout


def test_an_exported_savedmodel_with_an_image_input(cli, models, tmp_path):
    import keras

    exported = tmp_path / "exported"
    keras.models.load_model(models / "cnn.keras").export(exported, verbose=False)
    images = RNG.uniform(-1, 1, (3, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images)
    source = ["--npz", tmp_path / "images.npz", "--dtype", "float64", "-f", "csv", "--target", "top"]
    saved = cli("grad", exported, *source, "--inputs")
    assert saved.exit_code == 0, saved.stderr
    table = read_csv(saved.stdout)
    assert list(table)[:2] == ["x[0,0,0]", "x[0,1,0]"]
    values, (jac,) = jacobian(float64_twin(models / "cnn.keras"), [images])
    top = values.argmax(axis=1)
    np.testing.assert_array_equal(table["target"], top)
    np.testing.assert_allclose(table["dy/dx[3,3,0]"], jac[np.arange(3), top, 3, 3, 0], rtol=1e-9, atol=1e-12)
    # --logits: the graph's final Softmax op is left out; the logits' derivatives, from the float64 twin's logits
    # layer, for each image's labelled class.
    labels = np.array([2, 0, 3])
    np.savez(tmp_path / "labelled.npz", image=images, label=labels)
    logits = cli("hessian", exported, "--npz", tmp_path / "labelled.npz", "--dtype", "float64", "-f", "csv",
                 "--target", "label", "--logits", "--wrt", "x[1,1,0],x[2,3,0]")
    assert logits.exit_code == 0, logits.stderr
    table = read_csv(logits.stdout)
    twin = float64_twin(models / "cnn.keras")
    logits_model = keras.Model(twin.inputs, twin.get_layer("logits").output)
    values, (jac,) = jacobian(logits_model, [images])
    np.testing.assert_allclose(table["y"], values[np.arange(3), labels], rtol=1e-12)
    import tensorflow as tf

    x = tf.constant(images)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            picked = tf.gather(logits_model(x, training=False), labels, axis=1, batch_dims=1)
        gradient = inner.gradient(picked, x)[:, 2, 3, 0]
    second = outer.gradient(gradient, x).numpy()
    np.testing.assert_allclose(table["d2y/dx[1,1,0]dx[2,3,0]"], second[:, 1, 1, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["d2y/dx[2,3,0]^2"], second[:, 2, 3, 0], rtol=1e-9, atol=1e-12)
    linear = tmp_path / "linear"
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).export(linear, verbose=False)
    refused = cli("eval", linear, "--at", "1,2,3", "--logits")
    assert refused.exit_code == 2 and "ends in no softmax or sigmoid to leave out (its graph ends in BiasAdd" \
        in refused.stderr


def nth_pure_derivative(function, x, index, order):
    """d^order function / dx[index]^order per point, by `order` nested plain GradientTapes."""
    import tensorflow as tf

    if order == 0:
        return function(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        lower = tf.reduce_sum(nth_pure_derivative(function, x, index, order - 1))  # points are independent
    return tape.gradient(lower, x)[(slice(None), *index)]


@pytest.mark.parametrize("engine", ["taylor", "auto"])
def test_the_taylor_engine_covers_convolution_and_average_pooling(cli, engine):
    """bars_cnn (Conv2D, tanh, AveragePooling2D, Dense, Softmax) at orders 2 and 3 by Taylor series."""
    import tensorflow as tf

    from conftest import SAMPLES

    model, points = SAMPLES / "bars_cnn.keras", SAMPLES / "bars.npz"
    result = cli("deriv", model, "--npz", points, "--dtype", "float64", "-f", "csv", "--engine", engine,
                 "--partial", "x[3,3,0]^3", "--partial", "x[2,3,0]^2", "--target", "1")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    twin = float64_twin(model)
    images = tf.constant(np.load(points)["image"].astype(np.float64))
    second = nth_pure_derivative(lambda x: twin(x, training=False)[:, 1], images, (2, 3, 0), 2).numpy()
    third = nth_pure_derivative(lambda x: twin(x, training=False)[:, 1], images, (3, 3, 0), 3).numpy()
    np.testing.assert_allclose(table["d2y/dx[2,3,0]^2"], second, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["d3y/dx[3,3,0]^3"], third, rtol=1e-9, atol=1e-12)


def test_the_taylor_engine_covers_max_pooling_and_embeddings(cli, tmp_path, token_model):
    """Max pooling (each window's largest entry, picked where the value's maximum is) and an Embedding over held
    token ids, at orders 3 and in a Laplacian, against nested plain GradientTapes on the float64 twins."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(6)
    image = keras.Input((6, 6, 1))
    pooled = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(2, 3, activation="tanh")(image))
    keras.Model(image, keras.layers.Dense(1)(keras.layers.Flatten()(pooled))).save(tmp_path / "maxpool.keras")
    images = RNG.uniform(-1, 1, (5, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images)
    source = ["--npz", tmp_path / "images.npz", "--dtype", "float64", "-f", "csv", "--engine", "taylor"]
    result = cli("deriv", tmp_path / "maxpool.keras", *source, "--partial", "x[2,2,0]^3", "--partial", "x[1,3,0]^2")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    twin = float64_twin(tmp_path / "maxpool.keras")
    x = tf.constant(images)
    np.testing.assert_allclose(table["d3y/dx[2,2,0]^3"],
                               nth_pure_derivative(lambda v: twin(v)[:, 0], x, (2, 2, 0), 3).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["d2y/dx[1,3,0]^2"],
                               nth_pure_derivative(lambda v: twin(v)[:, 0], x, (1, 3, 0), 2).numpy(), rtol=1e-9, atol=1e-12)
    timed = cli("laplacian", tmp_path / "maxpool.keras", *source[:-2], "--timings")
    assert "engine: Taylor series" in timed.stderr, timed.stderr
    laplacian = read_csv(timed.stdout)["laplacian(y)"]
    expected = sum(nth_pure_derivative(lambda v: twin(v)[:, 0], x, (i, j, 0), 2).numpy()
                   for i in range(6) for j in range(6))
    np.testing.assert_allclose(laplacian, expected, rtol=1e-9, atol=1e-12)
    folder, ids, values = token_model
    tokens = cli("deriv", folder / "tokens.keras", "--npz", folder / "points.npz", "--dtype", "float64", "-f", "csv",
                 "--engine", "taylor", "--partial", "feat0^3")
    assert tokens.exit_code == 0, tokens.stderr
    embedded = float64_twin(folder / "tokens.keras")
    third = nth_pure_derivative(lambda v: embedded([tf.constant(ids), v])[:, 0], tf.constant(values), (0,), 3)
    np.testing.assert_allclose(read_csv(tokens.stdout)["d3y/dfeat0^3"], third.numpy(), rtol=1e-9, atol=1e-12)


def test_a_224x224x3_input_streams_and_its_limits_are_one_line_errors(cli, tmp_path):
    """150,528 coordinates: values, chosen derivatives and the whole gradient (one block, not a column per
    input) stream to NPZ; a text table of more than 10,000 columns and a full Hessian (150,528 squared
    multi-index entries) are usage errors, not the OOM killer."""
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((224, 224, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 8, strides=8, activation="tanh")(image))
    keras.Model(image, keras.layers.Dense(3, activation="softmax")(pooled)).save(tmp_path / "big.keras")
    images = RNG.uniform(0, 1, (2, 224, 224, 3)).astype(np.float32)
    np.savez(tmp_path / "images.npz", image=images)
    source = [tmp_path / "big.keras", "--npz", tmp_path / "images.npz", "--target", "top"]
    chosen = cli("grad", *source, "--wrt", "x[0,0,0],x[111,37,2]", "-o", tmp_path / "out.npz")
    assert chosen.exit_code == 0, chosen.stderr
    with np.load(tmp_path / "out.npz") as arrays:
        assert arrays["x"].shape == (2, 224, 224, 3) and arrays["dy/dx[111,37,2]"].shape == (2,)
        np.testing.assert_array_equal(arrays["x"], images)
    text = cli("eval", *source, "-f", "csv")  # the pixels left out of text: the outputs alone
    assert text.exit_code == 0 and "left out of the text output" in text.stderr
    text = cli("eval", *source, "-f", "csv", "--inputs")
    assert text.exit_code == 2  # the ways out that help eval: not --wrt, which on main at 755183a it was offered
    assert "150,530 columns is more than a text table takes (10,000): write NPZ or HDF5" in text.stderr
    assert "--no-inputs" in text.stderr and "--wrt" not in text.stderr
    gradient = cli("grad", *source, "-f", "csv")
    assert gradient.exit_code == 2 and "restrict the inputs differentiated with --wrt" in gradient.stderr
    assert "--no-inputs" not in gradient.stderr  # the pixels are left out already
    whole = cli("grad", *source, "--logits", "-o", tmp_path / "gradient.npz")
    assert whole.exit_code == 0, whole.stderr
    with np.load(tmp_path / "gradient.npz") as arrays:
        gradient, target = arrays["dy/dx"], arrays["target"]
    assert gradient.shape == (2, 224, 224, 3)
    # The logit is a mean of tanh(conv) over 28 x 28 patches: each pixel's derivative, by a float64 tape.
    import tensorflow as tf

    twin = float64_twin(tmp_path / "big.keras")
    logits = keras.Model(twin.inputs, twin.layers[-1].input)
    head = twin.layers[-1]
    x = tf.constant(images.astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(x)
        picked = tf.gather(tf.matmul(logits(x), head.kernel) + head.bias, target, axis=1, batch_dims=1)
    # float32 against float64: sums of 192 (the conv) and 784 (the mean) terms, each off by under 1e-5 relative.
    np.testing.assert_allclose(gradient, tape.gradient(picked, x).numpy(), rtol=2e-4, atol=1e-7)
    hessian = cli("hessian", *source, "-o", tmp_path / "hessian.npz")
    assert hessian.exit_code == 2 and "derivative columns over 150,528 inputs is more than" in hessian.stderr
    assert not (tmp_path / "hessian.npz").exists()


def test_a_jacobian_in_gradient_blocks_is_the_jacobian_column_by_column(cli, models, tmp_path, monkeypatch):
    """Over GRADIENT_BLOCK_FROM inputs a Jacobian is one gradient per output: the same columns, names and bits
    as a column per input, with --wrt subsets, several outputs, a NaN value and shaped results."""
    import derivcli.run

    images = RNG.uniform(-1, 1, (5, 6, 6, 1))
    images[3, 2, 2, 0] = np.nan
    np.savez(tmp_path / "images.npz", image=images)
    runs = [("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-f", "csv"),
            ("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-f", "csv", "--wrt", "x[5,5,0],x[0,1,0]",
             "--outputs", "y2,y0"),
            ("grad", models / "two.keras", "--at", ",".join(["0.3"] * 19), "-f", "csv", "--dtype", "float64")]
    by_column = [cli(*run) for run in runs]
    shaped = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-o", tmp_path / "columns.npz")
    monkeypatch.setattr(derivcli.run, "GRADIENT_BLOCK_FROM", 1)
    for run, expected in zip(runs, by_column):
        blocked = cli(*run)
        assert expected.exit_code == 0 and blocked.exit_code == 0, blocked.stderr
        assert blocked.stdout == expected.stdout
    assert "nan" in by_column[0].stdout.splitlines()[4]
    assert shaped.exit_code == 0 and cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-o",
                                         tmp_path / "blocks.npz").exit_code == 0
    assert (tmp_path / "blocks.npz").read_bytes() == (tmp_path / "columns.npz").read_bytes()


def test_hdf5_points_are_read_as_npz_arrays_are(cli, models, tmp_path):
    import h5py

    images = RNG.uniform(-1, 1, (9, 6, 6, 1))
    np.savez(tmp_path / "images.npz", image=images, label=np.arange(9))  # the labels pass through in both
    with h5py.File(tmp_path / "images.h5", "w") as handle:
        handle["image"] = images
        handle["label"] = np.arange(9)
        handle.create_group("extra")["image"] = np.zeros(3)
    expected = cli("grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-f", "csv")
    given = cli("grad", models / "cnn.keras", "--hdf5", tmp_path / "images.h5", "-f", "csv")
    assert given.exit_code == 0, given.stderr
    assert given.stdout == expected.stdout
    # Shards read their own rows by slice, and merge to the whole run.
    base = ["grad", models / "cnn.keras", "--hdf5", tmp_path / "images.h5", "--batch-size", "4"]
    assert cli(*base, "-o", tmp_path / "whole.csv").exit_code == 0
    for k in range(2):
        assert cli(*base, "--shard", f"{k}/2", "-o", tmp_path / f"part{k}.csv").exit_code == 0
    assert cli("merge", tmp_path / "part0.csv", tmp_path / "part1.csv", "-o", tmp_path / "merged.csv").exit_code == 0
    assert (tmp_path / "merged.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_hdf5_that_reads_other_files_or_is_not_hdf5_is_refused(cli, models, tmp_path):
    import h5py

    with h5py.File(tmp_path / "elsewhere.h5", "w") as handle:
        handle["image"] = np.zeros((2, 6, 6, 1))
    with h5py.File(tmp_path / "linked.h5", "w") as handle:
        handle["image"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "image")
    with h5py.File(tmp_path / "virtual.h5", "w") as handle:
        layout = h5py.VirtualLayout(shape=(2, 6, 6, 1), dtype="f8")
        layout[:] = h5py.VirtualSource(str(tmp_path / "elsewhere.h5"), "image", shape=(2, 6, 6, 1))
        handle.create_virtual_dataset("image", layout)
    (tmp_path / "text.h5").write_text("not hdf5")
    for name, fragment in [("linked.h5", "no arrays named"), ("virtual.h5", "reads other files"),
                           ("text.h5", "not an HDF5 file")]:
        result = cli("grad", models / "cnn.keras", "--hdf5", tmp_path / name)
        assert result.exit_code == 1 and fragment in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    special = cli("grad", models / "cnn.keras", "--hdf5", "/dev/zero")
    assert special.exit_code == 1 and "not a regular file" in special.stderr
    both = cli("grad", models / "cnn.keras", "--hdf5", tmp_path / "elsewhere.h5", "--at", "1")
    assert both.exit_code == 2 and "--at and --hdf5 given together" in both.stderr


def test_plot_draws_the_first_images_and_their_gradients(cli, models, tmp_path, monkeypatch):
    images, labels = RNG.uniform(-1, 1, (6, 6, 6, 1)), np.array([3, 1, 0, 2, 2, 1])
    np.savez(tmp_path / "images.npz", image=images, label=labels)
    base = ["grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--target", "label", "--logits"]
    picture = cli(*base, "--plot", tmp_path / "p.png", "-o", tmp_path / "out.npz")
    assert picture.exit_code == 0, picture.stderr
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    result = np.load(tmp_path / "out.npz")
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "200")
    terminal = cli(*base, "--plot", "-", "-o", tmp_path / "again.npz")
    assert terminal.exit_code == 0, terminal.stderr
    titles = [line for line in terminal.stdout.splitlines() if line.startswith("point ")]
    expected = []
    for k in range(4):  # the first four points, each its image and the gradient of its labelled logit
        for name, array in (("x", result["x"][k]), ("dy/dx", result["dy/dx"][k])):
            expected.append(f"point {k + 1}, target {labels[k]} {name}: {array.min():.4g} to {array.max():.4g}")
    assert titles == expected
    assert "     row=0 " in terminal.stdout and "     row=5 " in terminal.stdout  # row 0 of the image at the top
    assert terminal.stdout.index("row=0") < terminal.stdout.index("row=5")
    vector = cli("grad", models / "gru.keras", "--npz", tmp_path / "images.npz", "--plot", "p.png")
    assert vector.exit_code in (1, 2) and len(vector.stderr.strip().splitlines()) == 1


def test_names_rename_tensor_inputs_whole(cli, models, tmp_path):
    """--names with one name per input names a tensor's elements by index, its arrays in points and results."""
    pictures, features = RNG.uniform(-1, 1, (3, 4, 4, 1)), RNG.uniform(-1, 1, (3, 3))
    np.savez(tmp_path / "points.npz", photo=pictures, extra=features)
    renamed = cli("grad", models / "two.keras", "--npz", tmp_path / "points.npz", "--names", "photo,extra",
                  "-o", tmp_path / "renamed.npz", "--dtype", "float64")
    assert renamed.exit_code == 0, renamed.stderr
    np.savez(tmp_path / "original.npz", picture=pictures, feat=features)
    original = cli("grad", models / "two.keras", "--npz", tmp_path / "original.npz", "-o", tmp_path / "original_out.npz",
                   "--dtype", "float64")
    assert original.exit_code == 0, original.stderr
    new, old = np.load(tmp_path / "renamed.npz"), np.load(tmp_path / "original_out.npz")
    assert sorted(new.files) == sorted(f.replace("picture", "photo").replace("feat", "extra") for f in old.files)
    np.testing.assert_array_equal(new["dy1/dphoto"], old["dy1/dpicture"])
    np.testing.assert_array_equal(new["dy0/dextra1"], old["dy0/dfeat1"])
    text = cli("grad", models / "two.keras", "--npz", tmp_path / "points.npz", "--names", "photo,extra", "-f", "csv",
               "--wrt", "photo[3,2,0],extra2")
    assert text.stdout.splitlines()[0].endswith('"dy0/dphoto[3,2,0]",dy0/dextra2,"dy1/dphoto[3,2,0]",dy1/dextra2')
    wrong = cli("grad", models / "two.keras", "--npz", tmp_path / "points.npz", "--names", "a,b,c")
    assert wrong.exit_code == 2 and "3 name(s) for 19 input coordinates" in wrong.stderr and "or 2 input(s)" in wrong.stderr


def test_text_output_leaves_an_image_s_pixels_out_by_default_and_says_so(cli, models, tmp_path):
    """On main at 755183a `eval` of an image model wrote every pixel as a column, and on a 64x64x3 image failed with
    '12,298 columns is more than a text table takes ... restrict --wrt', a hint that does not help `eval`."""
    np.savez(tmp_path / "images.npz", image=RNG.uniform(-1, 1, (3, 6, 6, 1)))
    args = ["grad", models / "cnn.keras", "--npz", tmp_path / "images.npz", "-f", "csv"]
    default = cli(*args)
    assert default.exit_code == 0, default.stderr
    assert list(read_csv(default.stdout))[:5] == ["y0", "y1", "y2", "y3", "dy0/dx[0,0,0]"]
    assert "the elements of the tensor input x (6x6x1) are left out of the text output; --inputs puts them in" \
        in default.stderr
    assert "left out" not in cli(*args, "--quiet").stderr
    everything = read_csv(cli(*args, "--inputs").stdout)
    assert list(everything)[0] == "x[0,0,0]" and len(everything) == len(read_csv(default.stdout)) + 36
    binary = cli(*args[:-2], "-o", tmp_path / "r.npz")
    assert binary.exit_code == 0 and "left out" not in binary.stderr  # NPZ keeps the images, in their shapes
    assert np.load(tmp_path / "r.npz")["x"].shape == (3, 6, 6, 1)


def test_no_inputs_leaves_out_a_vector_input_too(cli):
    result = cli("grad", "sample_models/softplus_2d.keras", "--at", "0.5,1", "--no-inputs", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert list(read_csv(result.stdout)) == ["y", "dy/dx0", "dy/dx1"]


def test_doctor_samples_an_image_s_coordinates_and_takes_wrt(cli, models, tmp_path):
    """On main at 755183a doctor failed on image models ('... derivative columns ... restrict --wrt') and had no
    --wrt."""
    np.savez(tmp_path / "images.npz", image=RNG.uniform(-1, 1, (3, 6, 6, 1)))
    sampled = cli("doctor", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--format", "json", "--order", "1")
    assert sampled.exit_code == 0, sampled.stderr
    findings = {f["check"]: f for f in json.loads(sampled.stdout)["findings"]}
    assert findings["coordinates"]["message"].startswith("the derivative checks take 16 of the 36 coordinates, "
                                                         "sampled: x[")
    assert findings["nan"]["severity"] == "ok" and findings["float32"]["severity"] == "ok"
    chosen = cli("doctor", models / "cnn.keras", "--npz", tmp_path / "images.npz", "--wrt", "x[0,0,0],x[5,5,0]",
                 "--order", "2", "--format", "json")
    assert chosen.exit_code == 0, chosen.stderr
    findings = {f["check"]: f for f in json.loads(chosen.stdout)["findings"]}
    assert "coordinates" not in findings and "up to order 2" in findings["float32"]["message"]
    wrong = cli("doctor", models / "cnn.keras", "--wrt", "x[9,9,0]")
    assert wrong.exit_code == 2 and "x[9,9,0]" in wrong.stderr
