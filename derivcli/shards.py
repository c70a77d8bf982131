"""`--shard K/N`: balanced slices of the points, the scheduler's K and N, and shard records.

Shard K of N holds the points [K M / N, (K+1) M / N) of the M points of the
run (integer division), so every shard has ⌊M/N⌋ or ⌈M/N⌉ of them. Each
shard file carries a record (inside NPZ/HDF5 files, in `FILE.shard` beside
text files) that `derivcli merge` checks: K, N, the run's identity, the
shard's rows, and for text the SHA-256 of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from derivcli.errors import RunError, UsageError
from derivcli.specs import parse_shard

RECORD_SUFFIX = ".shard"
RECORD_FORMAT = "derivcli shard record"
# The environment of the array jobs `--shard auto` understands, in the order they are tried.
SCHEDULERS = "SLURM_ARRAY_TASK_ID (Slurm), JOB_COMPLETION_INDEX (Kubernetes), AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch)"


def shard_range(total: int, shard: tuple[int, int]) -> tuple[int, int]:
    """The points [start, stop) of shard K/N of `total` points: ⌊M/N⌋ or ⌈M/N⌉ of them."""
    index, count = shard
    return index * total // count, (index + 1) * total // count


def aligned_cuts(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) cut where the unsharded run cuts its batches: at multiples of `batch_size`.

    Only a shard's first and last batch differ from the unsharded run's.
    """
    position = start
    while position < stop:
        end = min(stop, (position // batch_size + 1) * batch_size)
        yield position, end
        position = end


def parse_shard_option(text: str, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """`--shard K/N`, `--shard auto` or `--shard auto/N` (K, and N where it can, from the scheduler).

    Raises:
        UsageError: a malformed value, or `auto` outside an array job.
    """
    stripped = text.strip().lower()
    if stripped != "auto" and not stripped.startswith("auto/"):
        return parse_shard(text)
    count: int | None = None
    if stripped.startswith("auto/"):
        given = stripped[len("auto/"):].strip()
        if not (given.isascii() and given.isdigit()) or int(given) < 1:
            raise UsageError(f"--shard {text!r}: expected auto, auto/N with N >= 1, or K/N")
        count = int(given)
    return shard_from_environment(count, os.environ if environ is None else environ)


def _integer(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise UsageError(f"--shard auto: {name}={value!r} is not a whole number")
    return int(value)


def shard_from_environment(count: int | None, environ: Mapping[str, str]) -> tuple[int, int]:
    """K and N of an array job: Slurm, Kubernetes Indexed Jobs or AWS Batch.

    `count` is N from `--shard auto/N`; where the scheduler also says N, the two must agree.
    `DERIVCLI_SHARD_COUNT` gives N where the scheduler does not (Kubernetes).
    """
    task = _integer(environ, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        minimum = _integer(environ, "SLURM_ARRAY_TASK_MIN") or 0
        step = _integer(environ, "SLURM_ARRAY_TASK_STEP") or 1
        told = _integer(environ, "SLURM_ARRAY_TASK_COUNT")
        maximum = _integer(environ, "SLURM_ARRAY_TASK_MAX")
        if told is None and maximum is not None:
            told = (maximum - minimum) // step + 1
        if (task - minimum) % step:
            raise UsageError(f"--shard auto: SLURM_ARRAY_TASK_ID={task} is not on the array's range "
                             f"{minimum}-{maximum}:{step}; use --array=0-{(told or 1) - 1} or give --shard K/N")
        return _checked((task - minimum) // step, told, count, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    index = _integer(environ, "JOB_COMPLETION_INDEX")
    if index is not None:
        return _checked(index, _integer(environ, "DERIVCLI_SHARD_COUNT"), count, "JOB_COMPLETION_INDEX",
                        "DERIVCLI_SHARD_COUNT (set it to the Job's completions) or --shard auto/N")
    index = _integer(environ, "AWS_BATCH_JOB_ARRAY_INDEX")
    if index is not None:
        told = _integer(environ, "AWS_BATCH_JOB_ARRAY_SIZE") or _integer(environ, "DERIVCLI_SHARD_COUNT")
        return _checked(index, told, count, "AWS_BATCH_JOB_ARRAY_INDEX",
                        "AWS_BATCH_JOB_ARRAY_SIZE, DERIVCLI_SHARD_COUNT or --shard auto/N")
    raise UsageError(f"--shard auto: not in an array job: none of {SCHEDULERS} is set; "
                     "give --shard K/N (in a GitHub Actions matrix: --shard ${{ matrix.shard }}/N)")


def _checked(index: int, told: int | None, count: int | None, index_name: str, count_name: str) -> tuple[int, int]:
    if told is not None and count is not None and told != count:
        raise UsageError(f"--shard auto/{count}: the scheduler runs {told} tasks ({count_name.split()[0]})")
    total = count if count is not None else told
    if total is None:
        raise UsageError(f"--shard auto: {index_name}={index} gives K but not N: set {count_name}")
    if not 0 <= index < total:
        raise UsageError(f"--shard auto: {index_name}={index} is not below the {total} tasks of the job")
    return index, total


@dataclass(frozen=True)
class ShardRecord:
    """What `merge` needs of one shard file.

    Attributes:
        index, count: K and N.
        run: the run's identity (model, points, columns, dtype), equal in every shard of one run.
        parts: the identity's parts, each on its own (`run_identity`): what differs in a shard of another run.
        total_rows: M, the points of the whole run.
        rows: the rows this shard holds.
        sha256: of the shard file's bytes (text formats; NPZ/HDF5 hold the record inside).
    """

    index: int
    count: int
    run: str
    total_rows: int
    rows: int = 0
    sha256: str | None = None
    parts: dict[str, str] = field(default_factory=dict)  # a digest of each of model, points, columns, dtype
    summary: dict[str, Any] | None = None  # --summary: the shard's moments (`summary.Moments`) and its points

    def to_json(self) -> str:
        return json.dumps({"format": RECORD_FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardRecord:
        try:
            data = json.loads(text)
            if data.pop("format") != RECORD_FORMAT:
                raise ValueError
            record = cls(**data)
            if not (isinstance(record.index, int) and isinstance(record.count, int) and 0 <= record.index < record.count):
                raise ValueError
        except (ValueError, TypeError, KeyError, AttributeError):
            raise RunError(f"merge: {where} is not a shard record written by derivcli") from None
        return record

    @property
    def points(self) -> int:
        """The points the shard holds: its rows, or, for a --summary shard, the points it summarizes."""
        return int(self.summary["points"]) if self.summary is not None else self.rows

    @property
    def expected_rows(self) -> int:
        start, stop = shard_range(self.total_rows, (self.index, self.count))
        return stop - start


def record_path(output: str | Path) -> Path:
    """Where a text shard's record lies: `part3.csv.shard` beside `part3.csv`.

    The suffix is not an output extension, so `merge part*.csv` never takes a record for a shard.
    """
    return Path(str(output) + RECORD_SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def run_identity(model_path: str, parts: dict[str, object]) -> tuple[str, dict[str, str]]:
    """A digest of the model's bytes and of what shapes the table (`parts`: points, columns, dtype), and one
    digest of each (`model` and the parts), so that merge can say which differs.

    Shards of one run agree on it; a shard of another model, grid, CSV or
    request does not, and merge refuses to join it.
    """
    digest = hashlib.sha256()
    model = Path(model_path)
    files = sorted(p for p in model.rglob("*") if p.is_file()) if model.is_dir() else [model]
    for path in files:
        digest.update(str(path.relative_to(model) if model.is_dir() else "").encode())
        digest.update(file_sha256(path).encode())
    each = {"model": digest.hexdigest()[:16]}
    each.update({name: hashlib.sha256(json.dumps(str(part)).encode()).hexdigest()[:16] for name, part in parts.items()})
    whole = hashlib.sha256(json.dumps(each, sort_keys=True).encode()).hexdigest()[:32]
    return whole, each
