"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd of Debian's slurm-wlm,
run as root with every file (key, socket, state, spool, logs) under one temporary folder.

`start_cluster` returns None with the reason when it cannot start one (not root, no packages and no
apt-get, a daemon that does not come up); the fixture in `test_slurm.py` skips with that reason.
`.ci/run` installs the packages, so CI runs the real thing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


@dataclass
class Cluster:
    """A running cluster: its folder, and the environment that points sbatch and squeue at it."""

    folder: Path
    environment: dict[str, str]

    def run(self, command: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
        """A shell command (sbatch, squeue…) against this cluster, from `cwd`."""
        return subprocess.run(["bash", "-c", command], cwd=cwd, env=self.environment, capture_output=True,
                              text=True, timeout=timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Until no job runs (pending jobs whose dependency can never be met do not count)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.run("squeue -h -o '%T %r'", Path(self.folder)).stdout.split("\n")
            if all(not line.strip() or "DependencyNeverSatisfied" in line for line in states):
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        """Cancels every job and ends the daemons."""
        self.run("scancel --user=root", self.folder)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.folder / f"{name}.pid"
            with contextlib.suppress(OSError, ValueError, IndexError):  # never started, or gone already
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        time.sleep(1)


def _installed() -> bool:
    return all(shutil.which(name) or Path("/usr/sbin", name).exists() for name in DAEMONS)


def _install() -> str | None:
    """Installs the packages with apt-get where this is root; the reason it could not, else None."""
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install slurm-wlm and munge"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], capture_output=True, text=True,
                          env=environment, timeout=900)
    if done.returncode != 0 or not _installed():
        return f"apt-get install {' '.join(PACKAGES)} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def start_cluster(folder: Path, extra_path: str) -> tuple[Cluster | None, str]:
    """Starts munged, slurmctld and slurmd under `folder`; returns the cluster, or None and why not.

    `extra_path` goes first on the jobs' PATH (the folder of the installed `derivcli`): sbatch
    hands its environment to the jobs.
    """
    if not _installed():
        reason = _install()
        if reason:
            return None, reason
    if os.geteuid() != 0:
        return None, "a test cluster runs its daemons as root (SlurmUser=root); this is not root"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # munged refuses a key or socket in a folder that others can write
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = folder / "munge.socket"
    started = subprocess.run(
        [_sbin("munged"), f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
         f"--log-file={folder / 'log' / 'munged.log'}", f"--seed-file={folder / 'munge.seed'}", "--force"],
        capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        return None, f"munged did not start: {started.stderr.strip()[-300:]}"
    host = socket.gethostname().split(".")[0]
    cores = os.cpu_count() or 1
    (folder / "slurm.conf").write_text(f"""\
ClusterName=derivcli-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}
SlurmdLogFile={folder / 'log' / 'slurmd.log'}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cores} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    environment = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"),
                   "PATH": f"{extra_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    cluster = Cluster(folder, environment)
    for daemon in ("slurmctld", "slurmd"):
        started = subprocess.run([_sbin(daemon), "-f", str(folder / "slurm.conf")], capture_output=True, text=True,
                                 env=environment, timeout=60)
        if started.returncode != 0:
            cluster.stop()
            return None, f"{daemon} did not start: {started.stderr.strip()[-300:]}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if cluster.run("sinfo -h -o %T", folder).stdout.strip() == "idle":
            return cluster, ""
        time.sleep(0.5)
    log = (folder / "log" / "slurmd.log").read_text(errors="replace")[-300:] if (folder / "log" / "slurmd.log").exists() else ""
    cluster.stop()
    return None, f"the test cluster's node never became idle: {log}"
