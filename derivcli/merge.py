"""`derivcli merge`: join the outputs of `--shard K/N` runs into the unsharded output.

Text shards (csv, tsv, jsonl, json) are joined in the order given, the header
once; npz/hdf5 shards carry their `shard` = [K, N] (and the grid's shape), so
they are checked for a complete set and put back in order, grid reshaped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from derivcli.errors import RunError, UsageError
from derivcli.writers import (
    EXTENSIONS,
    GRID_SHAPE_KEY,
    SHARD_KEY,
    AtomicFile,
    read_columns,
    write_hdf5,
    write_npz,
)


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


def merge_binary(paths: Sequence[str], format_name: str, target: Path) -> None:
    """Joins npz/hdf5 shards, checked for a complete set 0..N-1, in shard order."""
    shards = [read_columns(path) for path in paths]
    numbers = []
    for path, columns in zip(paths, shards):
        if SHARD_KEY not in columns:
            raise RunError(f"merge: {path} has no shard metadata; write shards with --shard K/N")
        numbers.append(tuple(int(v) for v in columns[SHARD_KEY]))
    count = numbers[0][1]
    if sorted(numbers) != [(k, count) for k in range(count)]:
        raise RunError(
            f"merge: the shards are {', '.join(f'{k}/{n}' for k, n in numbers)}; "
            f"give all of 0/{count} to {count - 1}/{count}"
        )
    ordered = [columns for _, columns in sorted(zip(numbers, shards), key=lambda pair: pair[0])]
    grid_shape = tuple(int(v) for v in ordered[0][GRID_SHAPE_KEY]) if GRID_SHAPE_KEY in ordered[0] else None
    arrays = []
    for name in ordered[0]:
        if name in (SHARD_KEY, GRID_SHAPE_KEY):
            continue
        if name == "grid_axes":
            arrays.append((name, ordered[0][name]))
            continue
        joined = np.concatenate([columns[name] for columns in ordered])
        arrays.append((name, joined.reshape(grid_shape) if grid_shape else joined))
    (write_npz if format_name == "npz" else write_hdf5)(target, arrays)


def merge(paths: Sequence[str], output: str | None) -> None:
    """Merges shard files into `output` (atomically), or to standard output for text."""
    format_name = shard_format(paths)
    if output not in (None, "-") and EXTENSIONS.get(Path(output).suffix.lower()) != format_name:
        raise UsageError(f"merge: -o {output} must have the shards' format ({format_name})")
    if output in (None, "-"):
        if format_name in ("npz", "hdf5"):
            raise UsageError(f"merge: {format_name} shards merge into a file: add -o FILE")
        merge_text(paths, format_name, sys.stdout)
        return
    target = AtomicFile(output)
    try:
        if format_name in ("npz", "hdf5"):
            merge_binary(paths, format_name, target.temporary)
        else:
            with open(target.temporary, "w", encoding="utf-8", newline="") as stream:
                merge_text(paths, format_name, stream)
        target.commit()
    except BaseException:
        target.discard()
        raise
