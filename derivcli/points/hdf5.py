"""`--hdf5 FILE`: the datasets at an HDF5 file's root, as `--npz` takes arrays, each batch's rows read by slice."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from derivcli.errors import RunError
from derivcli.points.npz import ArrayFileSource, checked_dtype, column_shape, refuse_special_file


class Hdf5Source(ArrayFileSource):
    """Datasets at the root of an HDF5 file, named like `--npz`'s arrays.

    Only datasets stored in the file itself are read: an external link, a virtual dataset or external
    storage would read other files, and is refused.
    """

    kind = "HDF5"

    def __init__(self, path: str, input_names: Sequence[str], tensors: Sequence[tuple[str, tuple[int, ...]]] = ()) -> None:
        import h5py

        self.path = path
        refuse_special_file(path, "HDF5")
        try:
            self.handle = h5py.File(path, "r")
        except FileNotFoundError:
            raise RunError(f"cannot read HDF5 {path}: no such file") from None
        except OSError as error:
            raise RunError(f"cannot read HDF5 {path}: not an HDF5 file ({str(error).split(';')[0]})") from None
        names = [name for name in self.handle
                 if isinstance(self.handle.get(name, getlink=True), h5py.HardLink)
                 and isinstance(self.handle[name], h5py.Dataset)]
        self.choose_arrays(names, input_names, tensors)

    def open_array(self, name: str, column: bool, passthrough: bool = False) -> _DatasetRows:
        return _DatasetRows(self.handle, self.path, name, column, passthrough)

    def close(self) -> None:
        self.handle.close()


class _DatasetRows:
    """Rows of one HDF5 dataset, read by slice (`_NpyRows`'s interface)."""

    def __init__(self, handle: Any, path: str, name: str, column: bool, passthrough: bool = False) -> None:
        self.path, self.name = path, name
        self.dataset = handle[name]
        if self.dataset.is_virtual or self.dataset.external:
            raise RunError(f"{path}: dataset {name!r} reads other files (a virtual dataset or external storage); "
                           "derivcli reads data stored in the file itself")
        self.dtype = np.dtype(self.dataset.dtype)
        checked_dtype(path, name, self.dtype, passthrough)
        self.shape = column_shape(path, name, tuple(self.dataset.shape), column)
        self.length = self.shape[0] if self.shape else 0
        self.width = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        self.single = False

    def one_point(self) -> None:
        """Reads the whole dataset as one point (an input's shape alone, without the N axis)."""
        self.shape = (1, *self.shape)
        self.length, self.width, self.single = 1, math.prod(self.shape), True

    def read(self, low: int, high: int) -> np.ndarray:
        """Rows [low, high) as float64, of shape (high - low, width)."""
        return self.read_raw(low, high).astype(np.float64)

    def read_raw(self, low: int, high: int) -> np.ndarray:
        """Rows [low, high) in the dataset's dtype, of shape (high - low, width)."""
        try:
            data = self.dataset[()][None] if self.single else self.dataset[low:high]
        except OSError as error:
            raise RunError(f"cannot read HDF5 {self.path}: dataset {self.name!r}: {error}") from None
        return np.asarray(data).reshape(high - low, self.width)
