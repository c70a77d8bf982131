"""How coordinates and result columns are named: flat (`x0`, `dy/dx0`) and indexed (`x[3,2,0]`, `dy2/dx[3,2,0]`).

Every reader of points and every writer of results takes its names from here, so
that a name a table prints is the name an option takes back.

- A model with one input of shape (None, d) has coordinates `x` (d = 1) or `x0 … x{d-1}`;
  several inputs use their own names, suffixed `0 …` when an input has several features.
- An input of shape (None, d1, …, dk) with k ≥ 2 (an image, a sequence) keeps its shape: its
  coordinates are named by index, `x[3,2,0]` (single input) or `image[3,2,0]`, in C order.
- Outputs are `y`, or `y0 … y{m-1}` over all outputs flattened; one output of rank ≥ 2 is `y[i,j]`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# A name, with an index when it names one element of a tensor: x0, u, image[3,2,0].
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*(\[\d+(,\d+)*\])?\Z")
MultiIndex = tuple[int, ...]


class Shaped(Protocol):
    name: str
    shape: tuple[int, ...]


def element_names(name: str, shape: Sequence[int]) -> list[str]:
    """The names of a tensor's elements: `name` alone for a scalar, `name0 …` for a vector, `name[i,j]` beyond.

    Example:
        >>> element_names("x", (2,))
        ['x0', 'x1']
        >>> element_names("image", (1, 2, 1))
        ['image[0,0,0]', 'image[0,1,0]']
    """
    if len(shape) >= 2:
        return [f"{name}[{','.join(map(str, index))}]" for index in itertools.product(*map(range, shape))]
    size = shape[0] if shape else 1
    return [name] if size == 1 else [f"{name}{i}" for i in range(size)]


def coordinate_names(inputs: Sequence[Shaped]) -> list[str]:
    """One name per scalar input, in model order (`x` stands for a single input's own name)."""
    if len(inputs) == 1:
        return element_names("x", inputs[0].shape)
    return [name for info in inputs for name in element_names(info.name, info.shape)]


def output_names(outputs: Sequence[Shaped]) -> list[str]:
    """One name per scalar output: `y`, `y0 …`, or `y[i,j]` for one output of rank 2 and more."""
    if len(outputs) == 1 and len(outputs[0].shape) >= 2:
        return element_names("y", outputs[0].shape)
    total = sum(math.prod(info.shape) for info in outputs)
    return ["y"] if total == 1 else [f"y{i}" for i in range(total)]


def split_names(text: str) -> list[str]:
    """`text` split at the commas outside brackets: `x[0,1],t` is `x[0,1]` and `t`.

    Example:
        >>> split_names("x[0,1]^2, t")
        ['x[0,1]^2', ' t']
    """
    parts, depth, start = [], 0, 0
    for position, character in enumerate(text):
        depth += (character == "[") - (character == "]")
        if character == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    parts.append(text[start:])
    return parts


def derivative_column(output: str, index: MultiIndex, input_names: Sequence[str]) -> str:
    """The column name of a derivative, as CLI.md fixes it.

    Example:
        >>> derivative_column("y", (1, 2), ["x0", "x1"])
        'd3y/dx0dx1^2'
        >>> derivative_column("u", (0, 1), ["t", "x"])
        'du/dx'
        >>> derivative_column("y2", (0, 1), ["x[0,0]", "x[0,1]"])
        'dy2/dx[0,1]'
    """
    order = sum(index)
    denominator = "".join(
        f"d{name}^{power}" if power > 1 else f"d{name}"
        for name, power in zip(input_names, index)
        if power
    )
    prefix = "d" if order == 1 else f"d{order}"
    return f"{prefix}{output}/{denominator}"


def laplacian_column(output: str) -> str:
    """The column name of a Laplacian: `laplacian(y)`."""
    return f"laplacian({output})"


def direction_column(output: str, vector: Sequence[float], order: int) -> str:
    """The column name of a derivative along a vector: `dy/d(1,1)`, `d3y/d(1,2)^3`."""
    spelled = ",".join(f"{v:g}" if float(f"{v:g}") == v else repr(v) for v in vector)
    return f"d{output}/d({spelled})" if order == 1 else f"d{order}{output}/d({spelled})^{order}"


def expand_tensors(names: Sequence[str], known: Sequence[str]) -> list[str]:
    """`names` with each input's own name (`image`, `feat`, or `x` of a single input) replaced by its elements."""
    expanded: list[str] = []
    known_names = set(known)
    for name in names:
        element = re.compile(re.escape(name) + r"(\[[\d,]+\]|\d+)\Z")
        members = [] if name in known_names else [candidate for candidate in known if element.match(candidate)]
        expanded += members or [name]
    return expanded


def summarized(names: Sequence[str]) -> str:
    """`names` for a message: a tensor's elements as one entry, `image[0,0,0] … image[5,5,0]` (36 elements).

    Example:
        >>> summarized(["t", "x[0,0]", "x[0,1]", "x[1,0]", "x[1,1]"])
        't, x[0,0] … x[1,1] (4 elements)'
    """
    parts: list[str] = []
    for base, group in itertools.groupby(names, key=lambda name: name.partition("[")[0] if "[" in name else None):
        members = list(group)
        if base is None or len(members) <= 3:
            parts += members
        else:
            parts.append(f"{members[0]} … {members[-1]} ({len(members):,} elements)")
    return ", ".join(parts)


@dataclass(frozen=True)
class ShapedArray:
    """Columns that NPZ and HDF5 write as one array with a shape per row (an image, a Hessian block).

    Attributes:
        name: the array's key: `x`, `image`, `y`, `dy2/dx`, `d2y/dx^2`, `d2y/dimagedfeat`.
        columns: the positions of its elements among the layout's float columns, in C order
            (a Hessian block of one input repeats its upper triangle's columns below the diagonal).
        shape: the shape of one row's elements.
    """

    name: str
    columns: tuple[int, ...]
    shape: tuple[int, ...]


def shaped_arrays(
    tensor_inputs: Sequence[tuple[str, tuple[int, ...], int]],
    tensor_output: tuple[str, tuple[int, ...], Sequence[int]] | None,
    derivatives: Sequence[tuple[int, str, tuple[int, ...]]],
    gradient_name: Callable[[str, str], str] = lambda output, name: f"d{output}/d{name}",
) -> list[ShapedArray]:
    """The arrays in the model's shapes that a table's columns make up.

    Args:
        tensor_inputs: each input of rank >= 2 as (its name in columns: `x` or `image`, shape, position of its
            first coordinate); coordinate positions are also float-column positions.
        tensor_output: (name, shape, float positions of its elements' values) for one output of rank >= 2
            whose every element is in the table, else None.
        derivatives: (float position, output name, the inputs differentiated, by position, with repeats) of each
            derivative column of order 1 or 2.
        gradient_name: the name of the array of an output's first derivatives with respect to a tensor input
            (`dy2/dx`; attributions are `attr(y2)/x`).

    Returns:
        The input arrays, the output array, each gradient of an output with respect to a whole tensor input
        (`dy2/dx`, shape of the input), and each Hessian block between two whole tensor inputs
        (`d2y/dx^2`: (*shape, *shape); `d2y/dadb`: (*shape_a, *shape_b)).
    """
    arrays = [ShapedArray(name, tuple(range(first, first + math.prod(shape))), tuple(shape))
              for name, shape, first in tensor_inputs]
    if tensor_output is not None:
        name, shape, positions = tensor_output
        arrays.append(ShapedArray(name, tuple(positions), tuple(shape)))
    first_order: dict[tuple[str, int], int] = {}
    second_order: dict[tuple[str, int, int], int] = {}
    for position, output, differentiated in derivatives:
        if len(differentiated) == 1:
            first_order[(output, differentiated[0])] = position
        elif len(differentiated) == 2:
            second_order[(output, *differentiated)] = position
    outputs = list(dict.fromkeys(output for _, output, _ in derivatives))
    for output in outputs:
        for name, shape, first in tensor_inputs:
            wanted = [first_order.get((output, first + k)) for k in range(math.prod(shape))]
            if all(p is not None for p in wanted):
                arrays.append(ShapedArray(gradient_name(output, name), tuple(wanted), tuple(shape)))  # type: ignore[arg-type]
        pairs = sum(1 for key in second_order if key[0] == output)
        for a, (name_a, shape_a, first_a) in enumerate(tensor_inputs):
            for name_b, shape_b, first_b in tensor_inputs[a:]:
                size_a, size_b = math.prod(shape_a), math.prod(shape_b)
                if pairs < (size_a * (size_a + 1) // 2 if name_a == name_b else size_a * size_b):
                    continue  # not the whole block: its columns stay alone (and a 224x224x3 block is never listed)
                wanted = [second_order.get((output, *sorted((first_a + i, first_b + j))))
                          for i in range(math.prod(shape_a)) for j in range(math.prod(shape_b))]
                if all(p is not None for p in wanted):
                    block = f"d2{output}/d{name_a}^2" if name_a == name_b else f"d2{output}/d{name_a}d{name_b}"
                    arrays.append(ShapedArray(block, tuple(wanted), (*shape_a, *shape_b)))  # type: ignore[arg-type]
    return arrays
