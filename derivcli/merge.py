"""`derivcli merge`: join the outputs of `--shard K/N` runs into the unsharded output.

Every shard file carries a record (`shards.ShardRecord`: inside NPZ/HDF5
files, in `FILE.shard` beside text files). Merge reads them all first and
refuses a set that is incomplete, holds a shard twice, mixes runs, or holds a
file changed since its run wrote it; then it joins the shards in K order,
whatever the order given (a shell glob puts part10 before part2): text with
the header once, NPZ/HDF5 with the grid's shape restored.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from derivcli.errors import RunError, UsageError
from derivcli.shards import ShardRecord, file_sha256, record_path
from derivcli.writers import (
    EXTENSIONS,
    GRID_SHAPE_KEY,
    SHARD_KEY,
    SHARD_RECORD_KEY,
    AtomicFile,
    read_columns,
    write_hdf5,
    write_npz,
)

NO_RECORD = "write every shard with --shard K/N -o FILE"


def text_record(path: str) -> ShardRecord:
    """The record beside a text shard, checked against the file's bytes."""
    beside = record_path(path)
    if not beside.is_file():
        raise RunError(f"merge: {path} has no shard record ({beside.name} is missing); {NO_RECORD}")
    record = ShardRecord.from_json(beside.read_text(encoding="utf-8", errors="replace"), str(beside))
    if record.sha256 != file_sha256(path):
        raise RunError(f"merge: {path} is not the file shard {record.index}/{record.count} wrote (changed since; "
                       f"{beside.name} does not match it): rerun that shard")
    return record


def binary_record(path: str, columns: dict[str, np.ndarray]) -> ShardRecord:
    """The record inside an NPZ/HDF5 shard, checked against its arrays' lengths."""
    if SHARD_RECORD_KEY not in columns:
        raise RunError(f"merge: {path} has no shard record; {NO_RECORD}")
    record = ShardRecord.from_json(str(np.ravel(columns[SHARD_RECORD_KEY])[0]), path)
    lengths = {len(array) for name, array in columns.items()
               if name not in (SHARD_KEY, GRID_SHAPE_KEY, SHARD_RECORD_KEY, "grid_axes")}
    if lengths != {record.rows} and lengths:
        raise RunError(f"merge: {path} holds {sorted(lengths)[0]} rows, its record says {record.rows}: rerun that shard")
    return record


# What each part of a run's identity is, for the message about a shard of another run.
RUN_PARTS = {"model": "another model (its file's bytes differ)", "points": "other points",
             "columns": "other columns (names or derivatives asked)", "dtype": "another --dtype"}


def in_shard_order(paths: Sequence[str], records: Sequence[ShardRecord]) -> list[int]:
    """The positions of `paths` in K order, once the records prove one whole run.

    Raises:
        RunError: shards of another run or count, a shard twice, a shard missing, or a
            shard without the rows its slice holds.
    """
    first, first_path = records[0], paths[0]
    for path, record in zip(paths, records):
        if record.count != first.count:
            raise RunError(f"merge: {path} is shard {record.index}/{record.count} and {first_path} is "
                           f"{first.index}/{first.count}: the shards of one run share N")
        if record.run != first.run or record.total_rows != first.total_rows:
            differ = [what for key, what in RUN_PARTS.items() if record.parts.get(key) != first.parts.get(key)]
            if record.total_rows != first.total_rows and "other points" not in differ:
                differ.append(f"other points ({record.total_rows:,} against {first.total_rows:,})")
            raise RunError(f"merge: {path} is from another run than {first_path}: "
                           f"{', '.join(differ) or 'another model, points, columns or dtype'}; merge the shards of one run")
        if record.points != record.expected_rows:
            raise RunError(f"merge: {path} holds {record.points} rows; shard {record.index}/{record.count} of "
                           f"{record.total_rows} points holds {record.expected_rows}: rerun it")
        if (record.summary is None) != (first.summary is None):
            raise RunError(f"merge: {path} and {first_path} are not both --summary shards; merge the shards of one run")
    seen: dict[int, str] = {}
    for path, record in zip(paths, records):
        if record.index in seen:
            raise RunError(f"merge: shard {record.index}/{first.count} is given twice ({seen[record.index]} and {path})")
        seen[record.index] = path
    missing = [k for k in range(first.count) if k not in seen]
    if missing:
        shown = ", ".join(f"{k}/{first.count}" for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise RunError(f"merge: {len(missing)} shard(s) missing ({shown}); give all of 0/{first.count} to "
                       f"{first.count - 1}/{first.count}")
    return sorted(range(len(paths)), key=lambda i: records[i].index)


def shard_format(paths: Sequence[str]) -> str:
    """The one format of all shard files, from their extensions."""
    formats = {EXTENSIONS.get(Path(p).suffix.lower()) for p in paths}
    if None in formats or len(formats) != 1:
        raise UsageError(
            f"merge: shards must share one extension of {' '.join(EXTENSIONS)}; got "
            f"{', '.join(sorted({Path(p).suffix or '(none)' for p in paths}))}"
        )
    for path in paths:
        if not Path(path).is_file():
            raise RunError(f"merge: cannot read {path}: no such file")
    return formats.pop()  # type: ignore[return-value]


def merge_text(paths: Sequence[str], format_name: str, stream: IO[str]) -> None:
    """Joins text shards: one header (csv/tsv), the rows of each shard in order."""
    if format_name == "json":
        bodies = []
        for path in paths:
            text = Path(path).read_text(encoding="utf-8")
            if not (text.startswith("[") and text.endswith("]\n")):
                raise RunError(f"merge: {path} is not a JSON array written by derivcli")
            body = text[1:-2].strip("\n")
            if body:
                bodies.append(body)
        stream.write("[\n" + ",\n".join(bodies) + "\n]\n" if bodies else "[]\n")
        return
    header: str | None = None
    for path in paths:
        with open(path, encoding="utf-8", newline="") as handle:
            if format_name in ("csv", "tsv"):
                first = handle.readline()
                if header is None:
                    header = first
                    stream.write(first)
                elif first != header:
                    raise RunError(f"merge: {path} has another header than {paths[0]}")
            for line in handle:
                stream.write(line)


def merge_binary(shards: Sequence[dict[str, np.ndarray]], format_name: str, target: Path) -> None:
    """Joins npz/hdf5 shards (their arrays, in K order), grid reshaped."""
    ordered = list(shards)
    grid_shape = tuple(int(v) for v in ordered[0][GRID_SHAPE_KEY]) if GRID_SHAPE_KEY in ordered[0] else None
    arrays = []
    for name in ordered[0]:
        if name in (SHARD_KEY, GRID_SHAPE_KEY, SHARD_RECORD_KEY):
            continue
        if name == "grid_axes":
            arrays.append((name, ordered[0][name]))
            continue
        joined = np.concatenate([columns[name] for columns in ordered])
        arrays.append((name, joined.reshape(*grid_shape, *joined.shape[1:]) if grid_shape else joined))
    (write_npz if format_name == "npz" else write_hdf5)(target, arrays)


def merge_summaries(records: Sequence[Any], format_name: str, output: str | None) -> None:
    """`--summary` shards: the whole run's summary, from each shard's moments (Chan's parallel update)."""
    from derivcli.summary import MOMENTS, SUMMARY_COLUMNS, Moments, write_summary
    from derivcli.writers import Layout, open_writer

    moments = Moments.from_dict(records[0].summary)
    for record in records[1:]:
        other = Moments.from_dict(record.summary)
        if other.names != moments.names:
            raise RunError("merge: the --summary shards summarize other columns; merge the shards of one run")
        moments.fold({key: getattr(other, key) for key in MOMENTS})
    layout = Layout([], ["column"], list(SUMMARY_COLUMNS), np.dtype(np.float64), total_rows=len(moments.names),
                    table_digits=6)
    write_summary(open_writer(format_name, layout, output), moments)


def merge(paths: Sequence[str], output: str | None) -> None:
    """Merges shard files into `output` (atomically), or to standard output for text."""
    format_name = shard_format(paths)
    binary = format_name in ("npz", "hdf5")
    shards = [read_columns(path) for path in paths] if binary else []
    records = [binary_record(path, columns) for path, columns in zip(paths, shards)] if binary \
        else [text_record(path) for path in paths]
    order = in_shard_order(paths, records)
    paths, shards, records = [paths[i] for i in order], [shards[i] for i in order] if binary else [], \
        [records[i] for i in order]
    if output not in (None, "-") and EXTENSIONS.get(Path(output).suffix.lower()) != format_name:
        suffix = {"hdf5": ".h5"}.get(format_name, f".{format_name}")
        raise UsageError(f"merge: the shards are {format_name.upper()}, and -o {output} would be another format: "
                         f"write -o {Path(output).with_suffix(suffix)} (merge joins shards, it does not convert them)")
    if output in (None, "-") and binary:
        raise UsageError(f"merge: {format_name} shards merge into a file: add -o FILE")
    if records[0].summary is not None:  # --summary shards: their moments, folded
        merge_summaries(records, format_name, output)
        return
    if output in (None, "-"):
        from derivcli.run import PipeClosed

        try:
            merge_text(paths, format_name, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `merge ... | head`: the reader has what it wanted; the command line ends quietly
            raise PipeClosed() from None
        return
    target = AtomicFile(output)
    try:
        if binary:
            merge_binary(shards, format_name, target.temporary)
        else:
            with open(target.temporary, "w", encoding="utf-8", newline="") as stream:
                merge_text(paths, format_name, stream)
        target.commit()
    except BaseException:
        target.discard()
        raise
