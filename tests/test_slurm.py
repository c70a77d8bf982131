"""The README's Slurm recipe, verbatim, on a real single-node Slurm cluster (`slurm_cluster.py`).

The cluster is started once for this module; where it cannot be (not root, no packages), the tests
skip and say why. `.ci/run` installs slurm-wlm and munge, so CI runs them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from slurm_cluster import start_cluster

from conftest import ROOT, derivcli_executable

pytestmark = pytest.mark.slow


def readme_recipe() -> list[str]:
    """The commands of the README's Slurm example, as a user would paste them."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Slurm, eight tasks and a merge that waits for them:\n\n```console\n(.*?)```", text, re.S)
    assert block, "the README's Slurm example is gone"
    return [line.removeprefix("$ ") for line in block.group(1).splitlines() if line.startswith("$ ")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started, reason = start_cluster(tmp_path_factory.mktemp("slurm"), str(Path(derivcli_executable()).parent))
    if started is None:
        pytest.skip(f"no Slurm cluster: {reason}")
    yield started
    started.stop()


def submit(cluster, commands: list[str], folder: Path) -> list[str]:
    """Runs the commands in one shell in `folder` (the first sets $jobid); returns the job ids submitted."""
    shutil.copy(ROOT / "sample_models" / "softplus_2d.keras", folder / "net.keras")
    done = cluster.run("set -e\n" + "\n".join(commands) + "\necho $jobid", folder)
    assert done.returncode == 0, done.stderr
    *merge_lines, array_id = done.stdout.split()[-5:]
    return [array_id, re.findall(r"\d+", " ".join(merge_lines))[-1]]


def test_the_readme_array_job_and_its_merge_equal_the_unsharded_run_bit_for_bit(cluster, tmp_path):
    recipe = readme_recipe()
    assert recipe[0].startswith("jobid=$(sbatch --parsable --array=0-7 --wrap 'derivcli ")
    assert "--shard auto" in recipe[0] and "--dependency=afterok:$jobid" in recipe[1]
    submit(cluster, recipe, tmp_path)
    assert cluster.wait_idle(timeout=600), cluster.run("squeue", tmp_path).stdout
    logs = {path.name: path.read_text() for path in tmp_path.glob("slurm-*.out")}
    assert len(logs) == 9 and all(text == "" for text in logs.values()), logs  # 8 tasks and the merge, all silent
    assert sorted(path.name for path in tmp_path.glob("part*.npz")) == [f"part{k}.npz" for k in range(8)]
    # The unsharded run at the shards' batch size (what --batch-size auto means under --shard).
    command = re.search(r"--wrap '(derivcli hessian .*?) --shard auto", recipe[0]).group(1).split()[1:]
    whole = subprocess.run([derivcli_executable(), *command, "--batch-size", "4096", "-o", "whole.npz"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert (tmp_path / "hessian.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()


def test_a_failing_task_keeps_the_merge_from_running_and_its_error_is_in_its_output(cluster, tmp_path):
    recipe = readme_recipe()
    bad_grid = "$([ $SLURM_ARRAY_TASK_ID = 3 ] && echo -3:3 || echo -3:3:2001)"  # element 3 only: start:stop
    failing = [recipe[0].replace("--grid -3:3:2001", f"--grid {bad_grid}"), recipe[1]]
    assert failing[0] != recipe[0]
    array_id, merge_id = submit(cluster, failing, tmp_path)
    assert cluster.wait_idle(timeout=600), cluster.run("squeue", tmp_path).stdout
    state = cluster.run(f"squeue -h -j {merge_id} -o '%T %r'", tmp_path).stdout.strip()
    assert state == "PENDING DependencyNeverSatisfied", state
    cluster.run(f"scancel {merge_id}", tmp_path)
    assert not (tmp_path / "hessian.npz").exists()
    assert not (tmp_path / f"slurm-{merge_id}.out").exists()  # the merge never started
    error = (tmp_path / f"slurm-{array_id}_3.out").read_text()
    assert error.startswith("derivcli: error: --grid") and len(error.splitlines()) == 1, error
    for k in (0, 1, 2, 4, 5, 6, 7):
        assert (tmp_path / f"slurm-{array_id}_{k}.out").read_text() == ""
    assert not (tmp_path / "part3.npz").exists()
    assert exit_code_of(cluster, array_id, 3, tmp_path) in ("2:0", None)


def exit_code_of(cluster, array_id: str, task: int, folder: Path) -> str | None:
    """The task's exit code as Slurm kept it (scontrol remembers finished jobs for MinJobAge), if it still does."""
    shown = cluster.run(f"scontrol show job {array_id}_{task}", folder).stdout
    found = re.search(r"ExitCode=(\S+)", shown)
    return found.group(1) if found else None
