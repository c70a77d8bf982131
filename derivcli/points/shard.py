"""`--shard K/N` of any source: its points [K M / N, (K+1) M / N), cut where the unsharded run cuts them."""

from __future__ import annotations

from collections.abc import Iterator

from derivcli.errors import UsageError
from derivcli.points.base import PointBatch, PointSource


class ShardSource(PointSource):
    """Shard K of N of another source (`--shard K/N`): its points [K M / N, (K+1) M / N).

    Batches are cut where the unsharded run cuts them (`shards.aligned_cuts`), so
    that only a shard's first and last batch are smaller than the unsharded run's.
    """

    def __init__(self, source: PointSource, shard: tuple[int, int], batch_size: int) -> None:
        from derivcli.shards import shard_range

        if source.total is None:
            raise UsageError("--shard needs a source whose size is known: a file, not standard input")
        self.source = source
        self.shard = shard
        self.batch_size = batch_size
        self.start, self.stop = shard_range(source.total, shard)
        self.whole_total = source.total
        self.total = self.stop - self.start
        self.passthrough_names = source.passthrough_names
        self.passthrough_shapes = source.passthrough_shapes
        self.notes = source.notes
        self.grid_shape = source.grid_shape
        self.grid_axes = source.grid_axes

    @property
    def run_total(self) -> int | None:
        return self.whole_total

    @property
    def size_in_advance(self) -> int | None:
        return self.source.size_in_advance

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        if batch_size != self.batch_size:
            raise ValueError("a shard is cut for one batch size")
        return self.source.rows(self.start, self.stop, batch_size)

    def identity(self) -> list[object]:
        return self.source.identity()
