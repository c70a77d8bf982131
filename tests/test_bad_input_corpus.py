"""A corpus of bad inputs through the installed command: status, one-line message, no file left."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest

from conftest import ROOT, derivcli_executable, run_installed

pytestmark = pytest.mark.slow
SAMPLE = str(ROOT / "sample_models" / "softplus_2d.keras")


def make_corpus(folder):
    """(name, arguments, status, fragment) for every bad input, built in `folder`."""
    import h5py
    import keras

    (folder / "truncated.keras").write_bytes((ROOT / "sample_models" / "softplus_2d.keras").read_bytes()[:2000])
    (folder / "random.h5").write_bytes(bytes(range(256)) * 16)
    with h5py.File(folder / "no_config.h5", "w") as handle:
        handle.create_group("model_weights")
    broken = folder / "no_variables"
    shutil.copytree(ROOT / "sample_models" / "square_tanh_savedmodel", broken)
    shutil.rmtree(broken / "variables")
    inputs = keras.Input((1,), name="x")
    keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs)).save(folder / "lambda.keras")
    (folder / "bad.csv").write_text("x0,x1\n1,2\n3,four\n")
    return [
        ("truncated-keras", [folder / "truncated.keras", "--at", "1"], 1, "corrupt or truncated"),
        ("random-bytes-h5", [folder / "random.h5", "--at", "1"], 1, "not a .keras (zip), HDF5 or SavedModel"),
        ("h5-without-model-config", [folder / "no_config.h5", "--at", "1"], 1, "cannot load"),
        ("savedmodel-without-variables", [broken, "--at", "1"], 1, "no variables folder"),
        ("lambda-without-unsafe", [folder / "lambda.keras", "--at", "1"], 1, "--unsafe"),
        ("missing-model", [folder / "none.keras", "--at", "1"], 1, "no such file"),
        ("non-numeric-csv-cell", [SAMPLE, "--csv", folder / "bad.csv"], 1, "row 3, column 'x1'"),
        ("bad-grid", [SAMPLE, "--grid", "0:1"], 2, "START:STOP:NUM"),
        ("hostile-expression", [SAMPLE, "--at", "1,2", "--expr", "y.__class__"], 2, "attribute access"),
    ]


def test_every_bad_input_is_one_line_and_leaves_no_file(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, arguments, status, fragment in make_corpus(inputs):
        output = tmp_path / "out"
        output.mkdir()
        command = "op" if "--expr" in arguments else "grad"
        result = run_installed(command, *map(str, arguments), "-o", str(output / "result.csv"))
        stderr = result.stderr.decode()
        assert result.returncode == status, (name, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("derivcli: error: "), (name, stderr)
        assert fragment in stderr, (name, stderr)
        assert "Traceback" not in stderr, name
        assert list(output.iterdir()) == [], f"{name} left {list(output.iterdir())}"
        shutil.rmtree(output)


def write_zip(path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip archive from raw members (name, data as stored, method, crc32, uncompressed size), written
    by hand so that a deflated member can be repeated full-flush segments: a 3.5 GiB bomb in 3.7 MB."""
    local, central = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        encoded = name.encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                               len(encoded), 0, 0, 0, 0, 0, len(local)) + encoded
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size,
                             len(encoded), 0) + encoded + data
    path.write_bytes(bytes(local + central) + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                                                        len(central), len(local), 0))


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return name, data, 0, zlib.crc32(data), len(data)


def zip_bomb(path) -> None:
    """softplus_2d.keras with its model.weights.h5 replaced by 3.5 GiB of zeros deflated to 3.7 MB (about 1000:1)."""
    with zipfile.ZipFile(ROOT / "sample_models" / "softplus_2d.keras") as sample:
        config, metadata = sample.read("config.json"), sample.read("metadata.json")
    mebibyte = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = compressor.compress(mebibyte) + compressor.flush(zlib.Z_FULL_FLUSH)  # decodes alone, every time
    count = 3584
    crc = 0
    for _ in range(count // 64):
        crc = zlib.crc32(mebibyte * 64, crc)
    data = segment * count + b"\x03\x00"  # an empty final block
    write_zip(path, [stored("metadata.json", metadata), stored("config.json", config),
                     ("model.weights.h5", data, 8, crc, count << 20)])


def keras_with_config(path, config: bytes) -> None:
    with zipfile.ZipFile(ROOT / "sample_models" / "softplus_2d.keras") as sample:
        members = [stored(name, sample.read(name)) for name in ("metadata.json", "model.weights.h5")]
    write_zip(path, [*members, stored("config.json", config)])


MEASURED_CHILD = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True); "
                  "sys.stderr.buffer.write(done.stderr); "
                  "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def test_hostile_files_are_one_line_errors_in_bounded_memory(tmp_path):
    """A zip bomb inside a .keras, a points file that never ends, and configs that break Python's JSON reader:
    each is refused in one line that says what is wrong, and the bomb before anything inflates it."""
    zip_bomb(tmp_path / "bomb.keras")
    keras_with_config(tmp_path / "deep.keras", b"[" * 100_000 + b"]" * 100_000)
    keras_with_config(tmp_path / "deep_but_readable.keras", b"[" * 500 + b"]" * 500)
    keras_with_config(tmp_path / "latin1.keras", '{"class_name": "Dense", "name": "caf\u00e9"}'.encode("latin-1"))
    cases = [
        ([tmp_path / "bomb.keras", "--at", "1,2"], "archive member 'model.weights.h5' inflates 3,7"),
        ([SAMPLE, "--npz", "/dev/zero"], "cannot read NPZ /dev/zero: not a regular file"),
        ([tmp_path / "deep.keras", "--at", "1,2"], "its config.json nests deeper than Python can read"),
        ([tmp_path / "deep_but_readable.keras", "--at", "1,2"], "its config.json nests more than 200 levels deep"),
        ([tmp_path / "latin1.keras", "--at", "1,2"], "its config.json is not UTF-8 text (byte 0xe9 at offset 36)"),
    ]
    for arguments, fragment in cases:
        measured = subprocess.run([sys.executable, "-c", MEASURED_CHILD, derivcli_executable(), "grad",
                                   *map(str, arguments)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        status, peak_kib = map(int, measured.stdout.split())
        assert status == 1, measured.stderr
        assert measured.stderr.startswith("derivcli: error: cannot ") and measured.stderr.count("\n") == 1
        assert fragment in measured.stderr, measured.stderr
        assert peak_kib < 1_500_000, (arguments, peak_kib)  # TensorFlow itself is about 0.5 GiB; the bomb is 3.5
