"""Differential-operator expressions (`op --expr`), parsed, never evaluated as Python.

An expression is parsed with Python's `ast` and every node is checked against
a whitelist: numbers, `+ - * / **`, parentheses, `pi` and `e`, the functions
`sin cos tan exp log sqrt tanh abs`, input names (coordinates), output names
(values), `D(y, x)`, `D(y, x^2)`, `D(y, x, t)`, `lap(y)`, and subscripts
`u_t`, `u_xx` when every input name is one letter. Anything else is a
`UsageError` that quotes the expression and points at the offending part.

The parsed tree evaluates with any array library whose arrays support the
Python operators: TensorFlow inside the kernel, NumPy in the tests.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from derivcli.errors import UsageError
from derivcli.naming import summarized

FUNCTIONS = ("sin", "cos", "tan", "exp", "log", "sqrt", "tanh", "abs")
CONSTANTS = {"pi": math.pi, "e": math.e}
OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
NAME_PREFIX = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)")


# The leaves of a parsed expression.
@dataclass(frozen=True)
class Coordinate:
    position: int


@dataclass(frozen=True)
class Derivative:
    """`output` differentiated `index` times (all zeros: the output's value)."""

    output: int
    index: tuple[int, ...]


@dataclass(frozen=True)
class Laplacian:
    output: int


@dataclass
class Expression:
    """A parsed `--expr`: its column name, its text and its checked tree."""

    name: str
    text: str
    tree: ast.expr
    leaves: dict[int, Any]  # id(node) -> Coordinate | Derivative | Laplacian | float

    def evaluate(self, resolve: Callable[[Any], Any], functions: dict[str, Callable[[Any], Any]]) -> Any:
        """Evaluates the tree; `resolve` turns a leaf into an array, `functions` maps names."""

        def walk(node: ast.expr) -> Any:
            if id(node) in self.leaves:
                return resolve(self.leaves[id(node)])
            if isinstance(node, ast.BinOp):
                return OPERATORS[type(node.op)](walk(node.left), walk(node.right))
            if isinstance(node, ast.UnaryOp):
                value = walk(node.operand)
                return -value if isinstance(node.op, ast.USub) else value
            assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            return functions[node.func.id](walk(node.args[0]))

        return walk(self.tree)

    @property
    def derivatives(self) -> list[Any]:
        return [leaf for leaf in self.leaves.values() if isinstance(leaf, (Derivative, Laplacian))]


class _Checker:
    """Walks an `ast` tree and accepts only the whitelisted language."""

    def __init__(self, spec: str, text: str, offset: int, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        self.spec = spec  # the option's whole value, quoted in errors
        self.text = text
        self.offset = offset  # where the expression starts in the option's value
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.leaves: dict[int, Any] = {}
        self.subscripts = all(len(name) == 1 for name in inputs)

    def fail(self, node: ast.AST | None, problem: str, fix: str = "") -> UsageError:
        if node is not None and hasattr(node, "col_offset"):
            start = node.col_offset
            end = getattr(node, "end_col_offset", None) or start + 1
            where = f" at position {self.offset + start + 1}: {self.text[start:end]!r}"
        else:
            where = ""
        return UsageError(f"--expr {self.spec!r}: {problem}{where}{fix}")

    def check(self, node: ast.expr) -> None:
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.BitXor):
                raise self.fail(node, "'^' is a power only inside D(...); write ** for a power")
            if type(node.op) not in OPERATORS:
                raise self.fail(node, f"operator {type(node.op).__name__} is not allowed (use + - * / **)")
            self.check(node.left)
            self.check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise self.fail(node, "only + and - may stand before a term")
            self.check(node.operand)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.fail(node, "only numbers are allowed as constants")
            if isinstance(node.value, int) and abs(node.value) > 1e308:
                raise self.fail(node, "the number is beyond the float range (1.8e308)")
            self.leaves[id(node)] = float(node.value)
        elif isinstance(node, ast.Name):
            self.leaves[id(node)] = self.name(node)
        elif isinstance(node, ast.Call):
            self.call(node)
        elif isinstance(node, ast.Attribute):
            raise self.fail(node, "attribute access is not allowed")
        elif isinstance(node, ast.Subscript):
            element = self.element(node)
            if element is None or element not in self.inputs + self.outputs:
                raise self.fail(node, "subscripts are allowed only for the elements of a tensor input or output, "
                                f"such as x[0,2,1] (inputs: {summarized(self.inputs)}; outputs: "
                                f"{summarized(self.outputs)})")
            self.leaves[id(node)] = self.name(ast.Name(element, ctx=ast.Load()))
        elif isinstance(node, ast.Lambda):
            raise self.fail(node, "lambda is not allowed")
        else:
            raise self.fail(node, f"{type(node).__name__.lower()} is not allowed")

    def name(self, node: ast.Name) -> Any:
        name = node.id
        if name in self.inputs:
            return Coordinate(self.inputs.index(name))
        if name in self.outputs:
            return Derivative(self.outputs.index(name), (0,) * len(self.inputs))
        if name in CONSTANTS:
            return CONSTANTS[name]
        output, _, letters = name.rpartition("_")
        if output in self.outputs and letters:
            if not self.subscripts:
                raise self.fail(node, "subscripts like u_x need one-letter input names; write D(u, x)")
            unknown = [c for c in letters if c not in self.inputs]
            if unknown:
                raise self.fail(node, f"{unknown[0]!r} in the subscript is not an input ({', '.join(self.inputs)})")
            index = [0] * len(self.inputs)
            for letter in letters:
                index[self.inputs.index(letter)] += 1
            return Derivative(self.outputs.index(output), tuple(index))
        if name in FUNCTIONS or name in ("D", "lap"):
            raise self.fail(node, f"{name} is a function: call it, {name}(...)")
        raise self.fail(
            node,
            f"unknown name {name!r} (inputs: {summarized(self.inputs)}; outputs: {summarized(self.outputs)}; "
            "constants: pi, e)", self._rename_hint(name),
        )

    def _rename_hint(self, name: str) -> str:
        """How to give the outputs the name the expression uses: `u_t` or `u` while they are still y, y0...

        Only while every output has its default name: a user who named them chose already.
        """
        if not all(re.fullmatch(r"y\d*", output) for output in self.outputs):
            return ""
        output, _, letters = name.partition("_")
        if not (letters and set(letters) <= set(self.inputs)):
            if len(name) > 1:
                return ""  # a word such as `bad` is a typo more often than an output's name
            output = name
        if output in self.inputs or not output.isidentifier():
            return ""
        names = ",".join([output, *self.outputs[1:]]) if len(self.outputs) > 1 else output
        return f"; to call the output {output}, add --output-names {names}"

    def call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute):
            raise self.fail(node.func, "attribute access is not allowed")
        if not isinstance(node.func, ast.Name):
            raise self.fail(node.func, "only the listed functions may be called")
        function = node.func.id
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, f"{function}() takes plain arguments only")
        if function in FUNCTIONS:
            if len(node.args) != 1:
                raise self.fail(node, f"{function}() takes one argument")
            self.check(node.args[0])
        elif function == "D":
            self.leaves[id(node)] = self.derivative(node)
        elif function == "lap":
            if len(node.args) != 1:
                raise self.fail(node, "lap() takes one output, lap(u)")
            self.leaves[id(node)] = Laplacian(self.output_of(node.args[0]))
        else:
            raise self.fail(node.func, f"unknown function {function!r} (functions: {', '.join(FUNCTIONS)}, D, lap)")

    @staticmethod
    def element(node: ast.expr) -> str | None:
        """The name an element of a tensor is known by (`x[3,2,0]`), or that of a plain name; None for anything else."""
        if isinstance(node, ast.Name):
            return node.id
        if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)):
            return None
        indices = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if not all(isinstance(i, ast.Constant) and type(i.value) is int and i.value >= 0 for i in indices):
            return None
        return f"{node.value.id}[{','.join(str(i.value) for i in indices)}]"  # type: ignore[attr-defined]

    def output_of(self, node: ast.expr) -> int:
        name = self.element(node)
        if name not in self.outputs:
            raise self.fail(node, f"expected an output name ({summarized(self.outputs)})")
        return self.outputs.index(name)

    def derivative(self, node: ast.Call) -> Derivative:
        if len(node.args) < 2:
            raise self.fail(node, "D() takes an output and at least one input, D(u, x) or D(u, x^2)")
        output = self.output_of(node.args[0])
        index = [0] * len(self.inputs)
        for argument in node.args[1:]:
            power = 1
            if isinstance(argument, ast.BinOp) and isinstance(argument.op, (ast.BitXor, ast.Pow)):
                exponent = argument.right
                if not (isinstance(exponent, ast.Constant) and type(exponent.value) is int and exponent.value >= 1):
                    raise self.fail(exponent, "the power of an input must be a positive whole number")
                power = exponent.value
                argument = argument.left
            name = self.element(argument)
            if name not in self.inputs:
                raise self.fail(argument, f"expected an input name ({summarized(self.inputs)})")
            index[self.inputs.index(name)] += power
        return Derivative(output, tuple(index))


# Limits that keep parsing and tracing bounded: a residual of a PDE is a few hundred characters.
MAX_EXPRESSION_LENGTH = 4000
MAX_EXPRESSION_DEPTH = 200


def parse_expression(
    spec: str, inputs: Sequence[str], outputs: Sequence[str], default_name: str = "op"
) -> Expression:
    """Parses one `--expr [NAME=]EXPR` against the model's names.

    Args:
        spec: the option's value.
        inputs: the coordinate names, in model order.
        outputs: the output names.
        default_name: the column name when the spec has no `NAME=`.

    Returns:
        The checked expression.

    Raises:
        UsageError: a syntax error or anything outside the language, quoting
            the expression and pointing at the offending part.

    Example:
        >>> parse_expression("res=u_t + u*u_x", ["t", "x"], ["u"]).name
        'res'
    """
    match = NAME_PREFIX.match(spec)
    name, offset = (match.group(1), match.end()) if match else (default_name, 0)
    body = spec[offset:]
    stripped = body.strip()
    offset += len(body) - len(body.lstrip())
    checker = _Checker(spec, stripped, offset, inputs, outputs)
    if not stripped:
        raise UsageError(f"--expr {spec!r}: the expression is empty")
    if len(stripped) > MAX_EXPRESSION_LENGTH:
        raise UsageError(f"--expr: an expression of {len(stripped):,} characters is longer than the "
                         f"{MAX_EXPRESSION_LENGTH:,} allowed")
    try:
        tree = ast.parse(stripped, mode="eval").body
    except SyntaxError as error:
        # Python reports offset 0 when the text ends too early: point past its end.
        column = error.offset if error.offset and 0 < error.offset <= len(stripped) else len(stripped) + 1
        detail = "" if error.msg == "invalid syntax" else f" ({error.msg})"
        raise UsageError(f"--expr {spec!r}: syntax error{detail} at position {offset + column}") from None
    if _depth(tree) > MAX_EXPRESSION_DEPTH:
        raise UsageError(f"--expr {spec!r}: nested more than {MAX_EXPRESSION_DEPTH} levels deep (a sum of many "
                         "terms nests one level per term); split it into several --expr")
    checker.check(tree)
    return Expression(name, stripped, tree, checker.leaves)


def _depth(tree: ast.AST) -> int:
    """The depth of a syntax tree, found without recursion (the tree may be deeper than Python's stack)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def parse_expressions(specs: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> list[Expression]:
    """Parses every `--expr`; unnamed ones are `op`, or `op1 op2 ...` when there are several."""
    expressions = [
        parse_expression(spec, inputs, outputs, "op" if len(specs) == 1 else f"op{k}")
        for k, spec in enumerate(specs, start=1)
    ]
    names = [e.name for e in expressions]
    clashes = sorted({n for n in names if names.count(n) > 1} | (set(names) & (set(inputs) | set(outputs))))
    if clashes:
        raise UsageError(f"--expr: the column name {clashes[0]!r} is used twice; name each expression NAME=EXPR")
    return expressions
