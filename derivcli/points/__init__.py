"""Point sources (`--at`, `--grid`, `--csv`, `--npz`) as streams of batches, and `--shard` of any of them.

A source knows the input names it must fill and yields `PointBatch`es of at
most `batch_size` rows, so that memory does not grow with the number of
points. Sources use NumPy (and Arrow for CSV); nothing here imports TensorFlow.
One module per source; `source.open_source` opens the one a command line gives.
"""

from derivcli.points.at import AtSource
from derivcli.points.base import PointBatch, PointSource, rebatch
from derivcli.points.csvfile import MAX_LINE_BYTES, CsvSource
from derivcli.points.grid import MAX_GRID_POINTS, GridSource, linspace_at
from derivcli.points.npz import NpzSource
from derivcli.points.shard import ShardSource
from derivcli.points.source import check_one_source, count_csv_rows, open_source, refuse_unshardable

__all__ = [
    "MAX_GRID_POINTS", "MAX_LINE_BYTES", "AtSource", "CsvSource", "GridSource", "NpzSource", "PointBatch",
    "PointSource", "ShardSource", "check_one_source", "count_csv_rows", "linspace_at", "open_source", "rebatch",
    "refuse_unshardable",
]
