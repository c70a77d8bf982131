"""`--at`: points given one by one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from derivcli.errors import UsageError
from derivcli.naming import summarized
from derivcli.points.base import PointBatch, PointSource
from derivcli.specs import AtPoint


class AtSource(PointSource):
    """Points given one by one with `--at`."""

    def __init__(self, points: Sequence[AtPoint], input_names: Sequence[str]) -> None:
        rows = []
        for point in points:
            spelled = ",".join(
                f"{n}={v:g}" for n, v in zip(point.names, point.values)
            ) if point.names else ",".join(f"{v:g}" for v in point.values)
            if point.names is None:
                if len(point.values) != len(input_names):
                    raise UsageError(
                        f"--at {spelled!r}: {len(point.values)} value(s) for "
                        f"{len(input_names)} input(s) ({summarized(input_names)})"
                    )
                rows.append(point.values)
            else:
                unknown = [n for n in point.names if n not in input_names]
                missing = [n for n in input_names if n not in point.names]
                if unknown or missing:
                    problem = (
                        f"{', '.join(unknown)} is not an input" if unknown
                        else f"no value for {', '.join(missing)}"
                    )
                    raise UsageError(
                        f"--at {spelled!r}: {problem} (inputs: {summarized(input_names)})"
                    )
                by_name = dict(zip(point.names, point.values))
                rows.append(tuple(by_name[n] for n in input_names))
        self.coordinates = np.array(rows, dtype=np.float64).reshape(len(rows), len(input_names))
        self.passthrough_names = []
        self.total = len(rows)

    def batches(self, batch_size: int) -> Iterator[PointBatch]:
        return self.rows(0, self.total or 0, batch_size)

    def rows(self, start: int, stop: int, batch_size: int) -> Iterator[PointBatch]:
        from derivcli.shards import aligned_cuts

        for low, high in aligned_cuts(start, stop, batch_size):
            yield PointBatch(self.coordinates[low:high])

    def identity(self) -> list[object]:
        return ["at", self.coordinates.tolist()]
