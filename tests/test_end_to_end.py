"""The installed `derivcli` in real subprocesses: pipes, head -1, signals, start-up time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, derivcli_executable, read_csv, run_installed

pytestmark = pytest.mark.slow


def test_help_and_version_do_not_import_tensorflow():
    code = "import sys, derivcli.cli; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False"
    for args in (["--version"], ["--help"], ["grad", "--help"]):
        started = time.perf_counter()
        done = run_installed(*args)
        assert done.returncode == 0, done.stderr
        assert time.perf_counter() - started < 10  # generous: a loaded CI box; typically 0.3 s
    assert run_installed("--version").stdout.decode().startswith("derivcli ")


def test_an_installed_jax_is_not_imported_with_tensorflow(tmp_path):
    """TensorFlow Lite imports JAX if it can (0.35 s of start-up): derivcli hides it during the import."""
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text("raise SystemExit('jax was imported')\n")
    code = ("import sys; from derivcli.models import import_tensorflow; import_tensorflow(); "
            "print('jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.stdout.strip() == "False", result.stderr[-500:]


def test_python_dash_m_is_the_same_program():
    result = subprocess.run([sys.executable, "-m", "derivcli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    assert result.stdout == run_installed("--version").stdout.decode()


def test_gradient_of_the_shifted_square_sample_at_half():
    """The mission's first story: dy/dx of a regression net at x = 0.5, in one command."""
    result = run_installed("grad", "sample_models/shifted_square.h5", "--at", "0.5")
    assert result.returncode == 0, result.stderr
    table = read_csv(result.stdout.decode())
    # The net was fitted to (x - 5)^2 / 25, whose slope at 0.5 is -0.36; the fit is good to 0.02.
    assert abs(table["dy/dx"][0] - (-0.36)) < 0.02


def test_csv_from_a_real_pipe():
    producer = subprocess.Popen(
        [sys.executable, "-c", "print('x0,x1,id'); [print(f'{i/10},{-i/10},{i}') for i in range(50)]"],
        stdout=subprocess.PIPE,
    )
    result = subprocess.run(
        [derivcli_executable(), "grad", "sample_models/softplus_2d.keras", "--csv", "-"],
        stdin=producer.stdout, capture_output=True, cwd=ROOT, timeout=120,
    )
    producer.wait()
    assert result.returncode == 0, result.stderr
    table = read_csv(result.stdout.decode())
    np.testing.assert_array_equal(table["id"], np.arange(50))
    assert result.stderr == b""


def test_closed_pipe_ends_quietly():
    command = f"{derivcli_executable()} grad sample_models/softplus_2d.keras --grid -3:3:400 --batch-size 1000 | head -1"
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, cwd=ROOT, timeout=120)
    assert result.stdout == b"x0,x1,y,dy/dx0,dy/dx1\n"
    assert result.stderr == b""
    assert result.returncode == 0


def test_merge_into_a_closed_pipe_ends_quietly(tmp_path):
    for k in range(2):
        run_installed("eval", "sample_models/softplus_2d.keras", "--grid", "-1:1:200", "--shard", f"{k}/2",
                      "-o", str(tmp_path / f"part{k}.csv"))  # 40,000 rows: more than a pipe's buffer
    command = f"{derivcli_executable()} merge {tmp_path}/part0.csv {tmp_path}/part1.csv | head -2"
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, cwd=ROOT, timeout=120)
    assert result.stdout.startswith(b"x0,x1,y\n") and result.stdout.count(b"\n") == 2
    assert result.stderr == b"" and result.returncode == 0


def default_interrupt() -> None:
    """SIGINT back to its default in the child: a suite started as a background job of a
    non-interactive shell inherits SIGINT ignored, and Python (rightly) keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_leaves_no_partial_file(tmp_path, sig, status):
    target = tmp_path / "out.csv"
    process = subprocess.Popen(
        [derivcli_executable(), "grad", "sample_models/softplus_2d.keras", "--grid", "-3:3:3000",
         "--batch-size", "2000", "-o", str(target)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_interrupt,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.iterdir()):
        time.sleep(0.05)  # wait until the run has opened its temporary file
    time.sleep(0.5)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert list(tmp_path.iterdir()) == []
    assert b"Traceback" not in stderr
    assert len(stderr.decode().strip().splitlines()) == 1


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_while_waiting_on_an_open_pipe(tmp_path, sig, status):
    """The reader thread is blocked on a pipe whose writer stays open: the signal still ends the run cleanly."""
    target = tmp_path / "out.csv"
    producer = subprocess.Popen([sys.executable, "-c", "print('x0,x1\\n1,2', flush=True); import time; time.sleep(60)"],
                                stdout=subprocess.PIPE)
    process = subprocess.Popen(
        [derivcli_executable(), "grad", "sample_models/softplus_2d.keras", "--csv", "-", "-o", str(target)],
        cwd=ROOT, stdin=producer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_interrupt,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    producer.kill()
    assert process.returncode == status, stderr
    assert list(tmp_path.iterdir()) == []
    assert len(stderr.decode().strip().splitlines()) == 1, stderr


def test_tensorflow_startup_noise_stays_off_stderr():
    result = run_installed("eval", "sample_models/square_tanh.keras", "--at", "0.5")
    assert result.returncode == 0
    assert result.stderr == b""


def test_stdout_is_csv_when_piped_and_quiet_warnings(tmp_path):
    result = run_installed("deriv", "sample_models/square_relu.keras", "--at", "1", "--partial", "x^2")
    assert result.stdout.decode().splitlines() == ["x,y,d2y/dx^2", result.stdout.decode().splitlines()[1]]
    assert "piecewise linear" in result.stderr.decode()
    quiet = run_installed("deriv", "sample_models/square_relu.keras", "--at", "1", "--partial", "x^2", "--quiet")
    assert quiet.stderr == b""


def wait_for_traced_functions(temporary: Path, deadline: float) -> None:
    """Until AutoGraph has written a generated module under `temporary` (the run has traced its kernels)."""
    while time.time() < deadline and not any(temporary.rglob("__autograph_generated_file*")):
        time.sleep(0.05)


RUN_ENDINGS = {
    "success": (["grad", "sample_models/softplus_2d.keras", "--at", "0.5,0.5"], 0),
    "usage error": (["grad", "sample_models/softplus_2d.keras", "--grid", "-1:1"], 2),
    # the second batch's row is bad: the first batch has been traced and computed by then
    "failed run": (["grad", "sample_models/softplus_2d.keras", "--csv", "-", "--batch-size", "2"], 1),
    "failed check": (["check", "sample_models/softplus_2d.keras", "--at", "0.5,0.5", "--rtol", "1e-30",
                      "--atol", "0"], 3),
    "failed gate": (["grad", "sample_models/softplus_2d.keras", "--at", "0.5,0.5", "--max-abs", "0.1"], 3),
}


@pytest.mark.parametrize("ending", list(RUN_ENDINGS))
def test_a_run_leaves_its_temporary_folder_as_it_found_it(tmp_path, ending):
    """AutoGraph's generated modules are deleted by an atexit handler that the fast exit skips: the
    run keeps them in a folder of its own, removed however it ends."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    arguments, status = RUN_ENDINGS[ending]
    done = subprocess.run([derivcli_executable(), *arguments], input=b"x0,x1\n1,2\n3,4\nfive,6\n", capture_output=True,
                          cwd=ROOT, timeout=180, env={**os.environ, "TMPDIR": str(temporary)})
    assert done.returncode == status, done.stderr
    assert list(temporary.iterdir()) == []


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_leaves_the_temporary_folder_as_it_found_it(tmp_path, sig, status):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    process = subprocess.Popen(
        [derivcli_executable(), "hessian", "sample_models/softplus_2d.keras", "--grid", "-3:3:3000",
         "--batch-size", "1000", "-o", str(tmp_path / "out.csv")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_interrupt,
        env={**os.environ, "TMPDIR": str(temporary)},
    )
    wait_for_traced_functions(temporary, time.time() + 120)
    assert any(temporary.rglob("__autograph_generated_file*")), "the run never traced a function"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert list(temporary.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tmp"]


def test_a_closed_pipe_leaves_the_temporary_folder_as_it_found_it(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    command = f"{derivcli_executable()} grad sample_models/softplus_2d.keras --grid -3:3:2000 --batch-size 1000 | head -1"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "TMPDIR": str(temporary)})
    assert (done.returncode, done.stdout, done.stderr) == (0, b"x0,x1,y,dy/dx0,dy/dx1\n", b"")
    assert list(temporary.iterdir()) == []
