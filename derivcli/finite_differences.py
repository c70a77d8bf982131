"""Central finite differences in float64 with Richardson extrapolation (for `check`).

The partial derivative with multi-index alpha is approximated by the tensor
product of second-order central stencils, one per input, at steps h, h/2,
h/4 and h/8; Richardson extrapolation removes the h^2 and h^4 terms, and the
difference between the last two extrapolations is the error estimate (the
approach of numdifftools). This is the only place derivcli uses finite
differences: every derivative it prints is exact automatic differentiation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

# Relative base step: large, because Richardson extrapolation cancels the
# truncation error and a large step keeps float64 round-off small at high orders.
BASE_STEP = 0.05
LEVELS = 4


@cache
def central_stencil(order: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Offsets and weights of the second-order central difference for d^order/dx^order (step 1)."""
    half = (order + 1) // 2
    offsets = np.arange(-half, half + 1)
    vandermonde = np.vander(offsets, increasing=True).T.astype(np.float64)
    rhs = np.zeros(len(offsets))
    rhs[order] = float(np.prod(np.arange(1, order + 1)))
    weights = np.linalg.solve(vandermonde, rhs)
    return tuple(int(o) for o in offsets), tuple(float(w) for w in weights)


@dataclass
class FiniteDifference:
    """An extrapolated estimate of one partial derivative at every point.

    Attributes:
        value: the Richardson-extrapolated derivative, shape (N,).
        error: the estimate of its error, shape (N,).
        levels: the plain central differences at h, h/2, h/4, h/8, shape (LEVELS, N).
        rounding: the round-off of the finest level, shape (N,).
    """

    value: np.ndarray
    error: np.ndarray
    levels: np.ndarray
    rounding: np.ndarray


def finite_difference(
    function: Callable[[np.ndarray], np.ndarray],
    points: np.ndarray,
    index: tuple[int, ...],
    output: int,
    base_step: float = BASE_STEP,
) -> FiniteDifference:
    """Estimates d^index y_output at `points` (N, D) with float64 central differences.

    Args:
        function: the model in float64, (M, D) -> (M, outputs).
        points: where to differentiate.
        index: the multi-index of the partial derivative.
        output: which output.
        base_step: the largest step, relative to max(1, |x|).
    """
    points = np.asarray(points, dtype=np.float64)
    steps = base_step * np.maximum(1.0, np.abs(points))  # (N, D)
    stencils = [central_stencil(k) if k else ((0,), (1.0,)) for k in index]
    offsets = list(itertools.product(*[s[0] for s in stencils]))
    weights = np.array([np.prod(w) for w in itertools.product(*[s[1] for s in stencils])])
    levels = []
    for level in range(LEVELS):
        h = steps / 2**level
        shifted = np.concatenate([points + np.array(o) * h for o in offsets])  # (S*N, D)
        values = np.asarray(function(shifted))[:, output].reshape(len(offsets), len(points))
        scale = np.prod(h ** np.array(index), axis=1)
        levels.append(weights @ values.astype(np.float64) / scale)
        # Round-off of the finest level: each value carries half an ulp of its dtype.
        rounding = np.finfo(values.dtype).eps * (np.abs(weights) @ np.abs(values)) / scale
    levels_array = np.array(levels)
    first = (4 * levels_array[1:] - levels_array[:-1]) / 3  # h^2 removed
    second = (16 * first[1:] - first[:-1]) / 15  # h^4 removed
    error = np.abs(second[-1] - second[-2]) + 10 * rounding
    return FiniteDifference(second[-1], error, levels_array, rounding)
