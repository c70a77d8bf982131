"""Model paths and archives are inspected before TensorFlow or Keras opens them."""

from __future__ import annotations

import os
import struct
import zipfile

import pytest

from conftest import SAMPLES
from test_errors import assert_one_line_error


def test_a_model_path_that_is_not_a_regular_file_is_refused_before_opening(cli, tmp_path):
    """A FIFO once blocked for ever; a device would be read without end."""
    fifo = tmp_path / "model.keras"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        assert_one_line_error(cli("info", path), 1, "not a regular file or a directory")


def rebuilt(tmp_path, extra: list[tuple[zipfile.ZipInfo | str, bytes]]):
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(SAMPLES / "square_tanh.keras") as source, zipfile.ZipFile(path, "w") as target:
        for member in source.infolist():
            target.writestr(member, source.read(member))
        for info, data in extra:
            target.writestr(info, data)
    return path


def declared_size(path, member: str, size: int) -> None:
    """Rewrites the uncompressed size the central directory declares for `member`."""
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x01\x02")
    while True:
        name_length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46 : start + 46 + name_length].decode() == member:
            struct.pack_into("<I", data, start + 24, size)
            break
        extra, comment = struct.unpack_from("<HH", data, start + 30)
        start = data.index(b"PK\x01\x02", start + 46 + name_length + extra + comment)
    path.write_bytes(bytes(data))


def link_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    return info


@pytest.mark.parametrize(("extra", "message"), [
    ([("../escape.txt", b"x")], "points outside the archive"),
    ([("/etc/escape.txt", b"x")], "points outside the archive"),
    ([(link_member("assets/link"), b"/etc/passwd")], "is a symbolic link"),
    ([(f"assets/{i}", b"") for i in range(10_001)], "members; a .keras model has a few"),
])
def test_archives_that_could_escape_or_explode_are_refused(cli, tmp_path, extra, message):
    path = rebuilt(tmp_path, extra)
    assert_one_line_error(cli("info", path), 1, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


@pytest.mark.parametrize(("member", "size", "message"), [
    ("model.weights.h5", 0xFFFFFFF0, "far beyond what weights compress to; a zip bomb is refused"),
    ("config.json", 2 << 30, "config.json declares"),
])
def test_absurd_declared_sizes_are_refused_before_extraction(cli, tmp_path, member, size, message):
    """A 3.6 MB file declaring 3.5 GiB of weights once took 8 GB of memory."""
    path = rebuilt(tmp_path, [])
    declared_size(path, member, size)
    assert_one_line_error(cli("info", path), 1, message)


def test_control_characters_from_files_are_escaped_in_messages(cli, tmp_path):
    """An ESC sequence in a CSV header once reached the terminal raw."""
    points = tmp_path / "points.csv"
    points.write_text("x0\x1b[2J\tz,x1\n1,2\n")
    result = cli("grad", SAMPLES / "softplus_2d.keras", "--csv", points)
    assert_one_line_error(result, 1, "x0\\x1b[2J\\tz")
    assert "\x1b" not in result.stderr and "\t" not in result.stderr


def test_the_installed_keras_has_every_published_safe_mode_fix():
    """keras 3.13.2 fixes the last published safe-mode bypass (CVE-2026-1462, TFSMLayer)."""
    import re
    from importlib.metadata import version
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"keras>=3.13.2' in pyproject
    installed = tuple(int(part) for part in re.findall(r"\d+", version("keras"))[:3])
    assert installed >= (3, 13, 2)


def test_table_cells_and_headers_are_plain_text(cli, tmp_path):
    """A CSV id `[/bold]` once crashed the table; `[x]` and `[b]old` were eaten as markup."""
    points = tmp_path / "points.csv"
    points.write_text("x0,x1,id\n1,2,[/bold]\n3,4,[x] \x1b[31mred\n5,6,[b]old\n")
    result = cli("grad", SAMPLES / "softplus_2d.keras", "--csv", points, "--format", "table")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "[/bold]" in lines[1] and "[x] \\x1b[31mred" in lines[2] and "[b]old" in lines[3]
    assert "\x1b" not in result.stdout


def lambda_model(function, path):
    import keras

    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Lambda(function, output_shape=(1,))(inputs)))
    model.save(path)
    return path


def test_lambda_layers_are_refused_whatever_their_function_and_run_with_unsafe(cli, tmp_path):
    import json
    import shutil

    marker = tmp_path / "marker"
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")  # noqa: S307 (the test's own code)
    bytecode = lambda_model(payload, tmp_path / "bytecode.keras")
    import keras

    named = lambda_model(keras.ops.sin, tmp_path / "named.keras")
    for path in (bytecode, named):
        assert_one_line_error(cli("eval", path, "--at", "0.5"), 1, "Lambda layer", "--unsafe")
    assert not marker.exists()
    # A config naming a function outside Keras (os.system as an activation) is an unknown class.
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(SAMPLES / "square_tanh.keras") as archive:
        archive.extractall(folder)
    config = json.loads((folder / "config.json").read_text())
    dense = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")
    dense["config"]["activation"] = {"module": "os", "class_name": "function", "config": "system",
                                     "registered_name": "function"}
    (folder / "config.json").write_text(json.dumps(config))
    hostile = shutil.make_archive(str(tmp_path / "os_system"), "zip", folder)
    os.rename(hostile, tmp_path / "os_system.keras")
    assert_one_line_error(cli("eval", tmp_path / "os_system.keras", "--at", "0.5"), 1, "unknown class 'function'")
    # TFSMLayer loads a SavedModel from any path, whose load-time ops would run: refused like Lambda.
    dense["config"]["activation"] = "tanh"
    dense["class_name"] = "TFSMLayer"
    (folder / "config.json").write_text(json.dumps(config))
    os.rename(shutil.make_archive(str(tmp_path / "tfsm"), "zip", folder), tmp_path / "tfsm.keras")
    assert_one_line_error(cli("eval", tmp_path / "tfsm.keras", "--at", "0.5"), 1, "TFSMLayer layer", "--unsafe")
    # With --unsafe the harmless payload runs: the marker works.
    assert cli("eval", bytecode, "--at", "0.5", "--unsafe").exit_code == 0
    assert marker.read_text() == "ran"


def hostile_saved_models(folder, marker):
    """SavedModels whose graphs write `marker` when loaded or evaluated, and one that calls Python."""
    import tensorflow as tf

    class WritesOnLoad(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant([0]), tf.constant([1])), default_value=0)
            self.scale = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * self.scale}

    class WritingResource(tf.saved_model.experimental.TrackableResource):
        """A resource whose initializer, run when TensorFlow loads the SavedModel, writes the marker."""

        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

        def _initialize(self):
            tf.io.write_file(str(marker), "ran")
            return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)

    class InitializerWrites(tf.Module):
        def __init__(self):
            super().__init__()
            self.resource = WritingResource()

        @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * tf.raw_ops.ReadVariableOp(resource=self.resource.resource_handle, dtype=tf.float32)}

    class WritesOnCall(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32, name="x")])
        def serve(self, x):
            tf.io.write_file(str(marker), "ran")
            return {"y": x * 2.0}

    class PrintsToFile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32, name="x")])
        def serve(self, x):
            tf.print("ran", output_stream=f"file://{marker}")
            return {"y": x * 2.0}

    class CallsPython(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.py_function(lambda v: v * 2.0, [x], tf.float32)}

    made = {}
    for name, module in [("writes_on_call", WritesOnCall()), ("prints_to_file", PrintsToFile()),
                         ("calls_python", CallsPython()), ("lookup_table", WritesOnLoad()),
                         ("initializer_writes", InitializerWrites())]:
        path = folder / name
        tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
        made[name] = path
    return made


def test_savedmodels_with_side_effects_are_refused_before_loading(cli, tmp_path):
    marker = tmp_path / "marker"
    made = hostile_saved_models(tmp_path, marker)
    expected = {"writes_on_call": ("WriteFile",), "prints_to_file": ("PrintV2", "StringFormat"),
                "calls_python": ("EagerPyFunc",), "lookup_table": ("HashTableV2", "LookupTableImportV2"),
                "initializer_writes": ("WriteFile",)}
    for name, path in made.items():
        result = cli("info" if name == "initializer_writes" else "eval", path,
                     *([] if name == "initializer_writes" else ["--at", "0.5"]))
        assert_one_line_error(result, 1, "can touch files or run code", "--unsafe")
        assert any(f"op {op} " in result.stderr for op in expected[name]), result.stderr
        assert not marker.exists(), name
    # With --unsafe the harmless payloads run: the markers work, at load time and at call time.
    assert cli("info", made["initializer_writes"], "--unsafe").exit_code == 0
    assert marker.read_text() == "ran"
    marker.unlink()
    assert cli("eval", made["writes_on_call"], "--at", "0.5", "--unsafe").exit_code == 0
    assert marker.read_text() == "ran"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []


def test_every_savedmodel_keras_and_tensorflow_export_passes_the_allowlist(tmp_path):
    """Dense, Conv, LSTM/GRU, attention and normalization models, exported both ways, and the sample."""
    import tensorflow as tf

    from derivcli.safety import check_saved_model

    from zoo import ZOO

    check_saved_model(SAMPLES / "square_tanh_savedmodel")
    for entry in ZOO:
        if entry.custom_objects:
            continue
        model = entry.build()
        model.export(tmp_path / f"{entry.name}_export", verbose=False)
        tf.saved_model.save(model, str(tmp_path / f"{entry.name}_tf"))
        check_saved_model(tmp_path / f"{entry.name}_export")
        check_saved_model(tmp_path / f"{entry.name}_tf")


@pytest.mark.parametrize(("sample", "name"), [("shifted_square.h5", "model.keras"), ("square_tanh.keras", "model.h5"),
                                              ("square_tanh.keras", "model.bin")])
def test_a_model_file_is_read_by_its_bytes_not_its_name(cli, tmp_path, sample, name):
    """An HDF5 file named .keras once gave "File not found" for a file that exists."""
    import shutil

    shutil.copy(SAMPLES / sample, tmp_path / name)
    renamed = cli("eval", tmp_path / name, "--at", "0.5")
    assert renamed.exit_code == 0, renamed.stderr
    assert renamed.stdout == cli("eval", SAMPLES / sample, "--at", "0.5").stdout


def test_a_keras2_lambda_in_an_h5_file_is_refused(cli, tmp_path):
    import tf_keras

    marker = tmp_path / "marker"
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")  # noqa: S307 (the test's own code)
    model = tf_keras.Sequential([tf_keras.layers.Lambda(payload, input_shape=(1,)), tf_keras.layers.Dense(1)])
    model.save(tmp_path / "keras2.h5")
    marker.unlink(missing_ok=True)  # building the model here ran the payload once
    assert_one_line_error(cli("eval", tmp_path / "keras2.h5", "--at", "0.5"), 1, "Lambda layer", "--unsafe")
    assert not marker.exists()


def test_a_failed_load_leaves_nothing_in_the_temporary_folder(tmp_path):
    import subprocess

    from conftest import derivcli_executable

    corrupt = tmp_path / "corrupt.keras"
    with zipfile.ZipFile(SAMPLES / "square_tanh.keras") as source, zipfile.ZipFile(corrupt, "w") as target:
        for member in source.infolist():
            data = source.read(member)
            target.writestr(member, data[: len(data) // 2] if member.filename.endswith(".h5") else data)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run([derivcli_executable(), "eval", str(corrupt), "--at", "0.5"], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(temporary)}, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(temporary.iterdir()) == []
