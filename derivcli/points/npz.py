"""`--npz FILE` (and the base of `--hdf5 FILE`): named arrays read by offset, only the rows of each batch."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derivcli.errors import RunError
from derivcli.naming import summarized
from derivcli.points.base import PointBatch, PointSource


class ArrayFileSource(PointSource):
    """Points from named arrays of a file (NPZ, HDF5): one per input in its own shape, one 1-D array per
    coordinate, or one `x` of shape (N, d). Each batch reads its own rows, so memory stays flat and a
    shard near the end starts there. Subclasses open the file and its arrays (`open_array`)."""

    kind = "arrays"
    path: str

    passthrough_arrays: list[Any]
    notes: list[str]

    def open_array(self, name: str, column: bool, passthrough: bool = False) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def choose_arrays(self, files: list[str], input_names: Sequence[str],
                      tensors: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        """Finds the input arrays among `files` (see the class); sets `arrays`, `total`, `dimension`.

        Raises:
            RunError: no arrays for the inputs, or arrays of the wrong shapes or lengths.
        """
        path = self.path
        shaped = self._in_model_shapes(files, tensors)
        if shaped is not None:
            self.arrays = shaped
        elif all(name in files for name in input_names):
            self.arrays = [self.open_array(name, column=True) for name in input_names]
            lengths = {a.length for a in self.arrays}
            if len(lengths) > 1:
                raise RunError(
                    f"{path}: the input arrays have different lengths "
                    f"({', '.join(f'{n}: {a.length}' for n, a in zip(input_names, self.arrays))})"
                )
        elif "x" in files:
            whole = self.open_array("x", column=False)
            width = whole.shape[1] if len(whole.shape) == 2 else None
            if not (width == len(input_names) or (len(whole.shape) == 1 and len(input_names) == 1)):
                raise RunError(
                    f"{path}: array 'x' has shape {whole.shape}, expected "
                    f"(N, {len(input_names)}) for inputs {summarized(input_names)}"
                )
            self.arrays = [whole]
        else:
            missing = [name for name, _ in tensors if name not in files]
            if 0 < len(missing) < len(tensors):
                raise RunError(f"{path}: no array named {missing[0]!r} for input {missing[0]!r} "
                               f"(arrays: {', '.join(files)})")
            raise RunError(
                f"{path}: no arrays named {summarized(input_names)} and no array 'x' "
                f"(arrays: {', '.join(files) or 'none'})"
            )
        self.dimension = len(input_names)
        self.total = self.arrays[0].length
        self._choose_passthrough([name for name in files if name not in {a.name for a in self.arrays}])

    def _choose_passthrough(self, others: list[str]) -> None:
        """The file's other arrays of one row per point (labels, ids) pass through to the output, in their dtype
        and shape; in text an array of more than one dimension is one column per element (`onehot3`)."""
        from derivcli.naming import element_names

        self.passthrough_arrays, self.passthrough_names, self.notes = [], [], []
        for name in others:
            array = self.open_array(name, column=False, passthrough=True)
            if self.total == 1 and array.shape == () and self.arrays[0].shape[0] == 1:
                array.one_point()
            if not array.shape or array.shape[0] != self.total:
                self.notes.append(f"{self.path}: array {name!r} of shape {array.shape} is not one row per point "
                                  f"({self.total:,} points): it is not passed through to the output")
                continue
            self.passthrough_arrays.append(array)
            self.passthrough_names += element_names(name, array.shape[1:])
        self.passthrough_shapes = [(a.name, a.dtype, a.shape[1:]) for a in self.passthrough_arrays]

    def _in_model_shapes(self, files: list[str], tensors: Sequence[tuple[str, tuple[int, ...]]]) -> list[Any] | None:
        """One array per input in its own shape, (N, *shape) or the shape alone for one point; None when the
        file holds no array by an input's name (then flat arrays are looked for).

        A single input's array may also be called `x`, or be the file's only array.
        """
        if not tensors:
            return None
        if len(tensors) == 1:
            name, shape = tensors[0]
            found = next((n for n in (name, "x") if n in files), files[0] if len(files) == 1 else None)
            chosen = [(found, name, shape)] if found is not None else []
        else:
            chosen = [(name, name, shape) for name, shape in tensors if name in files]
        if not chosen:
            return None
        if len(chosen) < len(tensors):  # some inputs by name only: the flat arrays may hold the rest
            return None
        arrays = []
        for array_name, input_name, shape in chosen:
            array = self.open_array(array_name, column=False)
            if array.shape == shape:  # one point: the input's shape alone
                array.one_point()
            elif array.shape[1:] != shape and not (len(array.shape) == 2 and array.shape[1] == math.prod(shape)) \
                    and not (shape in ((), (1,)) and len(array.shape) == 1):
                raise RunError(f"{self.path}: array {array_name!r} has shape {array.shape}; input {input_name!r} "
                               f"takes (N, {', '.join(map(str, shape))}) for N points, or {shape} for one")
            arrays.append(array)
        lengths = {a.length for a in arrays}
        if len(lengths) > 1:
            raise RunError(f"{self.path}: the input arrays have different lengths "
                           f"({', '.join(f'{a.name}: {a.length}' for a in arrays)})")
        return arrays

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        return self.rows(0, self.total or 0, batch_size)

    def rows(self, start: int, stop: int, batch_size: int) -> Iterator[PointBatch]:
        from derivcli.shards import aligned_cuts

        try:
            for low, high in aligned_cuts(start, stop, batch_size):
                parts = [array.read(low, high).reshape(high - low, -1) for array in self.arrays]
                passthrough = [column for array in self.passthrough_arrays
                               for column in array.read_raw(low, high).reshape(high - low, -1).T]
                yield PointBatch(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0], passthrough)
        finally:
            self.close()

    def identity(self) -> list[object]:
        return [self.kind.lower(), [(a.name, a.shape, str(a.dtype)) for a in self.arrays],
                Path(self.path).stat().st_size]


def refuse_special_file(path: str, kind: str) -> None:
    """A device (/dev/zero) would be read without end, and a FIFO cannot seek: these files are read by offset."""
    if Path(path).exists() and not Path(path).is_file():
        raise RunError(f"cannot read {kind} {path}: not a regular file; an {kind} is read by the offsets of its "
                       "arrays, so save it to a file first")


def checked_dtype(path: str, name: str, dtype: np.dtype, passthrough: bool = False) -> None:
    """Refuses arrays that hold anything but integers and floats (and, passed through, booleans and text).

    Raises:
        RunError: Python objects (loading them would unpickle, which derivcli never does), text, dates...
    """
    if dtype.kind == "O":
        raise RunError(f"{path}: array {name!r} holds Python objects; save it as an array of numbers")
    if passthrough and dtype.kind in "biufUS":
        return
    if passthrough:
        raise RunError(f"{path}: array {name!r} holds {KINDS.get(dtype.kind, str(dtype))} (dtype {dtype}); arrays "
                       "passed through to the output hold numbers, booleans or text")
    if dtype.kind not in "iuf":
        raise RunError(f"{path}: array {name!r} holds {KINDS.get(dtype.kind, str(dtype))} "
                       f"(dtype {dtype}); points are real numbers (integer or float arrays)")


KINDS = {"c": "complex numbers", "U": "text", "S": "bytes", "V": "records", "M": "dates", "m": "durations",
         "b": "booleans", "O": "Python objects"}


def column_shape(path: str, name: str, shape: tuple[int, ...], column: bool) -> tuple[int, ...]:
    """An array's shape, (N, 1) read as (N,) for a coordinate's column, which must be 1-D."""
    if column and len(shape) == 2 and shape[1] == 1:
        shape = (shape[0],)
    if column and len(shape) != 1:
        raise RunError(f"{path}: array {name!r} has shape {shape}, expected a 1-D array")
    return tuple(shape)


class NpzSource(ArrayFileSource):
    """Arrays of an `.npz` file; only their headers are read when it is opened."""

    kind = "NPZ"

    def __init__(self, path: str, input_names: Sequence[str], tensors: Sequence[tuple[str, tuple[int, ...]]] = ()) -> None:
        self.path = path
        refuse_special_file(path, "NPZ")
        try:
            archive = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise RunError(f"cannot read NPZ {path}: no such file") from None
        except zipfile.BadZipFile:
            if Path(path).is_file() and Path(path).read_bytes()[:6] == b"\x93NUMPY":
                raise RunError(f"{path} is a single .npy array, not an .npz archive of named arrays") from None
            raise RunError(f"cannot read NPZ {path}: not a zip archive (.npz files are written by numpy.savez)") from None
        except OSError as error:
            raise RunError(f"cannot read NPZ {path}: {error.strerror or error}") from None
        self.archive = archive
        self.choose_arrays([name[:-4] for name in archive.namelist() if name.endswith(".npy")], input_names, tensors)

    def open_array(self, name: str, column: bool, passthrough: bool = False) -> _NpyRows:
        return _NpyRows(self.archive, self.path, name, column, passthrough)

    def close(self) -> None:
        self.archive.close()


class _NpyRows:
    """Rows of one array in an `.npz`, read by offset; validated from its header alone.

    A stored (uncompressed, as `numpy.savez` writes) member is read at the rows'
    byte offset; a compressed one is decompressed up to them, a fast scan.
    """

    def __init__(self, archive: zipfile.ZipFile, path: str, name: str, column: bool, passthrough: bool = False) -> None:
        self.archive, self.path, self.name = archive, path, name
        self.info = archive.getinfo(name + ".npy")
        self.stored_at: int | None = None  # the array's first byte in the archive file (stored members)
        try:
            with archive.open(self.info) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, self.fortran, self.dtype = read_header(member)
                self.data_start = member.tell()
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            raise RunError(f"cannot read NPZ {path}: array {name!r}: {error}") from None
        checked_dtype(path, name, self.dtype, passthrough)
        shape = column_shape(path, name, tuple(shape), column)
        self.shape = tuple(shape)
        self.length = shape[0] if shape else 0
        self.width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        needed = self.data_start + math.prod(shape) * self.dtype.itemsize
        if self.info.file_size < needed:
            raise RunError(f"cannot read NPZ {path}: array {name!r} is truncated "
                           f"({self.info.file_size} bytes, its header says {needed})")

    def one_point(self) -> None:
        """Reads the whole array as one point (an input's shape alone, without the N axis)."""
        self.shape = (1, *self.shape)
        self.length, self.width = 1, math.prod(self.shape)
        self.fortran = self.fortran and self.width > 1

    def read(self, low: int, high: int) -> np.ndarray:
        """Rows [low, high) as float64, of shape (high - low, width), each row's elements in C order."""
        return self.read_raw(low, high).astype(np.float64)

    def read_raw(self, low: int, high: int) -> np.ndarray:
        """Rows [low, high) in the array's dtype, of shape (high - low, width), each row's elements in C order."""
        size = self.dtype.itemsize
        if self.fortran and self.width > 1:  # column-major: each column's rows lie apart
            columns = [self._bytes((j * self.length + low) * size, (high - low) * size) for j in range(self.width)]
            stacked = np.stack([np.frombuffer(c, self.dtype) for c in columns], axis=1)
            # The columns run over the trailing axes in Fortran order: back to C order.
            trailing = self.shape[1:]
            stacked = stacked.reshape(high - low, *trailing[::-1]).transpose(0, *range(len(trailing), 0, -1))
            return stacked.reshape(high - low, self.width)
        raw = self._bytes(low * self.width * size, (high - low) * self.width * size)
        return np.frombuffer(raw, self.dtype).reshape(high - low, self.width)

    def _bytes(self, offset: int, count: int) -> bytes:
        try:
            if self.info.compress_type == zipfile.ZIP_STORED:
                handle = self.archive.fp
                assert handle is not None
                if self.stored_at is None:  # where the array's bytes begin, past the member's local header
                    handle.seek(self.info.header_offset)
                    local = handle.read(30)  # the local header ends with its name's and extra field's lengths
                    self.stored_at = (self.info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                                      + int.from_bytes(local[28:30], "little") + self.data_start)
                handle.seek(self.stored_at + offset)
                data = handle.read(count)
            else:
                with self.archive.open(self.info) as member:
                    member.seek(self.data_start + offset)
                    data = member.read(count)
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            raise RunError(f"cannot read NPZ {self.path}: array {self.name!r}: {error}") from None
        if len(data) != count:
            raise RunError(f"cannot read NPZ {self.path}: array {self.name!r} is truncated")
        return data
