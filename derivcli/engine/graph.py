"""The function a model computes, as a frozen graph free of gradient conventions.

A model's traced graph carries choices made for training, not mathematics:
`tf.stop_gradient` (Keras and `tf.nn.moments` compute a variance around
`stop_gradient(mean)`), `PreventGradient`, and gradient overrides
(`tf.custom_gradient`, `gradient_override_map`, `RegisterGradient` under a
`_gradient_op_type` attribute, restored SavedModel custom gradients). None of
them changes a value; each can change a derivative, often only from order 2 on.

`freeze` traces the model once, turns its variables into constants, and
rewrites the graph so that differentiating it differentiates the function:
- StopGradient and PreventGradient become Identity;
- gradient overrides are dropped, so every op gets its own registered gradient;
- ops whose registered gradient is a training estimate rather than the
  derivative (fake quantization's straight-through gradient) are refused.

Both engines run the rewritten graph: the nested tapes differentiate it, and
the Taylor engine interprets its ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from derivcli.errors import RunError

# Ops that pass their value through and only change the gradient: made plain Identity.
GRADIENT_BLOCKING_OPS = ("StopGradient", "PreventGradient")
# The attribute by which tf.custom_gradient and gradient_override_map replace an op's gradient.
GRADIENT_OVERRIDE_ATTRIBUTE = "_gradient_op_type"
# Ops whose registered gradient is the straight-through estimator: the function is
# piecewise constant, its derivative 0 almost everywhere, and the gradient is 1.
STRAIGHT_THROUGH_OPS = {
    "FakeQuantWithMinMaxArgs", "FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel",
    "QuantizeAndDequantize", "QuantizeAndDequantizeV2", "QuantizeAndDequantizeV3", "QuantizeAndDequantizeV4",
}
LOW_PRECISION_FLOATS = {tf.float32.as_datatype_enum, tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum}


@dataclass
class FrozenFunction:
    """A model as a frozen GraphDef, (batch, D) -> (batch, M), rewritten to differentiate its function.

    Attributes:
        graph_def: the rewritten graph, variables as constants, function calls inlined
            (loops and conditionals stay functional, so they can be differentiated to any order).
        source / target: the input placeholder's and the output's tensor names.
        rewritten: how many ops of each kind were rewritten ("StopGradient", "gradient override", ...).
        low_precision: ops that hold or make a float tensor narrower than float64 (for `--dtype float64`).
        parameters: for a live function (`freeze(..., live=True)`), the constants that hold the model's
            variables, as (tensor name, variable): every run reads the variables in their place, so the
            result follows training and an outer tape differentiates it with respect to them.
    """

    graph_def: Any
    source: str
    target: str
    rewritten: dict[str, int] = field(default_factory=dict)
    low_precision: list[str] = field(default_factory=list)
    parameters: list[tuple[str, Any]] = field(default_factory=list)
    _runnable: Any = field(default=None, repr=False, compare=False)

    def operations(self) -> list[Any]:
        """The graph's ops, imported into a graph of their own, in graph order (for reading, not running)."""
        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(self.graph_def, name="")
        return list(graph.get_operations())

    @tf.autograph.experimental.do_not_convert
    def __call__(self, coordinates: tf.Tensor) -> tf.Tensor:
        """Evaluates the graph on `coordinates`; traceable, and differentiable to any order.

        Under a gradient tape (training: `derivcli.training`), the imported ops are recorded on it.
        """
        from tensorflow.python.eager import record

        graph_def = self.runnable()
        recorded = [node.name for node in graph_def.node] if record.could_possibly_record() else []
        output, *imported = tf.graph_util.import_graph_def(
            graph_def, input_map={self.source: coordinates, **self.parameter_values()},
            return_elements=[self.target, *recorded], name="model"
        )
        record_on_tapes(imported)
        return output

    def parameter_values(self) -> dict[str, tf.Tensor]:
        return read_parameters(self.parameters)

    def runnable(self) -> Any:
        """The graph to import into a kernel: its input Placeholder made an Identity of a constant.

        The input is mapped onto the kernel's own tensor when imported, but the node stays in
        the graph, and XLA compiles no Placeholder; an unused Identity of a constant it does.
        """
        if self._runnable is None:
            graph_def = type(self.graph_def)()
            graph_def.CopyFrom(self.graph_def)
            name = self.source.split(":")[0]
            node = next(n for n in graph_def.node if n.name == name)
            dtype = node.attr["dtype"].type
            width = node.attr["shape"].shape.dim[-1].size
            constant = graph_def.node.add()
            constant.CopyFrom(_zeros_node(f"{name}/unused_input", dtype, width))
            node.op = "Identity"
            node.ClearField("attr")
            node.attr["T"].type = dtype
            node.input.append(constant.name)
            self._runnable = graph_def
        return self._runnable


def read_parameters(parameters: Sequence[tuple[str, Any]]) -> dict[str, tf.Tensor]:
    """A live function's variables' current values, by the name of the constant each replaces (reads tapes see)."""
    return {name: tf.convert_to_tensor(variable) for name, variable in parameters}


def record_on_tapes(operations: Sequence[Any]) -> None:
    """Records graph ops made outside TensorFlow's op wrappers (imported, or copied by the Taylor engine) on the
    active gradient tapes, as the wrappers record the ops they make, so that a tape differentiates through them.

    Each op's registered gradient serves, as `tf.gradients` would use it; an op with none raises
    LookupError when differentiated, as it does there.
    """
    from tensorflow.python.eager import record
    from tensorflow.python.framework import ops as framework

    if not record.could_possibly_record():
        return
    for op in operations:
        if not op.inputs or not op.outputs:
            continue
        try:
            gradient = framework.get_gradient_function(op)
        except LookupError:
            gradient = _no_gradient
        if gradient is None:
            continue

        def backward(*output_gradients: tf.Tensor, op: Any = op, gradient: Any = gradient) -> list[Any]:
            result = gradient(op, *output_gradients)
            return list(result) if isinstance(result, (list, tuple)) else [result]

        record.record_operation(op.type, list(op.outputs), list(op.inputs), backward)


def _no_gradient(op: Any, *output_gradients: tf.Tensor) -> None:
    raise LookupError(f"No gradient defined for operation '{op.name}' (op type: {op.type})")


def _zeros_node(name: str, dtype: int, width: int) -> Any:
    """A Const NodeDef of zeros, shape (1, width)."""
    from tensorflow.core.framework import node_def_pb2

    node = node_def_pb2.NodeDef(name=name, op="Const")
    node.attr["dtype"].type = dtype
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.zeros((1, width)), tf.as_dtype(dtype)))
    return node


def freeze(function: Callable[[tf.Tensor], tf.Tensor], dimension: int, dtype: str, live: bool = False) -> FrozenFunction:
    """Traces `function` on (None, dimension) inputs of `dtype` and rewrites it (see the module's doc).

    With `live`, the constants that hold the function's variables are listed in `parameters`, to be
    replaced by the variables' values on every run (training: `derivcli.training`).

    Raises:
        RunError: the model uses an op whose gradient is not its derivative.
    """
    concrete = tf.function(function).get_concrete_function(tf.TensorSpec((None, dimension), tf.as_dtype(dtype)))
    graph_def = _with_constants(concrete)
    rewritten: dict[str, int] = {}
    # Grappler inlines every call but those marked for XLA or not to inline: Keras wraps grouped convolutions
    # (ConvNeXt's, RegNet's) in such a function, because TensorFlow has no CPU kernel for their gradients.
    from derivcli.engine.surgery import inline_calls, ungroup_convolutions

    inline_calls(graph_def, rewritten)
    ungroup_convolutions(graph_def, rewritten)
    low_precision: list[str] = []
    for nodes in [graph_def.node, *(f.node_def for f in graph_def.library.function)]:
        for node in nodes:
            _rewrite(node, rewritten)
            if dtype == "float64" and _is_low_precision(node):
                low_precision.append(f"{node.op} ({node.name})")
    parameters: list[tuple[str, Any]] = []
    if live:
        # Freezing turns each captured variable handle into a constant of the same name, read through an
        # Identity where the graph read the variable.
        variables = {id(variable.handle): variable for variable in concrete.graph.variables}
        constants = {node.name for node in graph_def.node if node.op == "Const"}
        parameters = [(internal.op.name + ":0", variables[id(external)]) for external, internal in concrete.graph.captures
                      if id(external) in variables and internal.op.name in constants]
    return FrozenFunction(graph_def, concrete.inputs[0].name, concrete.outputs[0].name, rewritten, low_precision,
                          parameters)


def _with_constants(concrete: Any) -> Any:
    """The concrete function's GraphDef with its variables made constants and its function calls inlined.

    What `convert_variables_to_constants_v2` computes, without the new concrete function it then
    builds and prunes from the GraphDef (a third of the freeze on an EfficientNet, and unused here):
    the GraphDef keeps the traced input's and output's names.
    """
    from tensorflow.python.framework import convert_to_constants

    converter = convert_to_constants._FunctionConverterDataInEager(func=concrete, lower_control_flow=False,
                                                                    aggressive_inlining=False)
    graph_def, _ = convert_to_constants._replace_variables_by_constants(converter_data=converter)
    return graph_def


# Ops a frozen output passes through unchanged in value on the way from a final squash (`without_final_squash`).
PASS_THROUGH_OPS = {"Identity", "IdentityN", "Reshape", "Cast", "Squeeze", "ExpandDims"}
SQUASH_OPS = {"Softmax": "softmax", "Sigmoid": "sigmoid"}


def without_final_squash(frozen: FrozenFunction) -> tuple[FrozenFunction | None, str]:
    """`--logits` for a graph: the frozen function with the softmax or sigmoid its output ends in made an Identity
    (None when it ends in neither), and the op it ends in.

    The output is followed back through ops that only reshape or rename it; a squash applied to
    only part of the output (one of several heads concatenated) is not looked for.
    """
    graph_def = type(frozen.graph_def)()
    graph_def.CopyFrom(frozen.graph_def)
    by_name = {node.name: node for node in graph_def.node}
    node = by_name.get(frozen.target.split(":")[0])
    while node is not None and node.op in PASS_THROUGH_OPS and node.input:
        node = by_name.get(node.input[0].split(":")[0].lstrip("^"))
    if node is None or node.op not in SQUASH_OPS:
        return None, f"{node.op} ({node.name})" if node is not None else "an op outside the graph"
    kind = SQUASH_OPS[node.op]
    node.op = "Identity"
    for attribute in list(node.attr):
        if attribute not in ("T", "_output_shapes"):
            del node.attr[attribute]
    return FrozenFunction(graph_def, frozen.source, frozen.target, dict(frozen.rewritten),
                          list(frozen.low_precision), list(frozen.parameters)), f"{kind} ({node.name})"


def _rewrite(node: Any, rewritten: dict[str, int]) -> None:
    if node.op in STRAIGHT_THROUGH_OPS:
        raise RunError(
            f"the model uses {node.op} ({node.name}), a quantization whose derivative is 0 almost "
            "everywhere; its training gradient (straight-through) is not a derivative of the function"
        )
    if node.op in GRADIENT_BLOCKING_OPS:
        rewritten[node.op] = rewritten.get(node.op, 0) + 1
        node.op = "Identity"
        for attribute in list(node.attr):
            if attribute not in ("T", "_output_shapes"):
                del node.attr[attribute]
    if GRADIENT_OVERRIDE_ATTRIBUTE in node.attr:
        rewritten["gradient override"] = rewritten.get("gradient override", 0) + 1
        del node.attr[GRADIENT_OVERRIDE_ATTRIBUTE]


def _is_low_precision(node: Any) -> bool:
    """Whether a node of a float64 graph computes in float32 (or narrower), holds a float32 constant
    that lost digits, or has a float attribute (32 bits) that sets its math.

    A float32 constant whose every value reads back from its shortest decimal (1.0 in
    `tf.nn.silu`'s beta, 0.5, 6.0) lost nothing; one like float32(0.044715) did. Casts
    are judged by the constants they read.
    """
    if node.op == "Cast":
        return False
    if node.op == "Const":
        if node.attr["dtype"].type not in LOW_PRECISION_FLOATS:
            return False
        values = tf.make_ndarray(node.attr["value"].tensor).ravel()
        return not all(float(str(value)) == float(value) for value in values[:1000])
    for name, value in node.attr.items():
        if name.startswith("_"):
            continue
        if value.type in LOW_PRECISION_FLOATS or any(t in LOW_PRECISION_FLOATS for t in value.list.type):
            return True
        if value.WhichOneof("value") == "f" and value.f not in (0.0, 1.0):
            return True  # a float attribute (LeakyRelu's alpha) is 32 bits whatever the op's dtype
    return False


# -- second-order gradients TensorFlow lacks --


@tf.RegisterGradient("SoftsignGrad")
def _softsign_grad_grad(op: Any, grad: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """SoftsignGrad(g, x) = g / (1 + |x|)^2, so d/dg = 1 / (1 + |x|)^2 and d/dx = -2 g sign(x) / (1 + |x|)^3."""
    incoming, features = op.inputs
    denominator = 1.0 + tf.abs(features)
    return grad / tf.square(denominator), -2.0 * grad * incoming * tf.sign(features) / (denominator ** 3)


def promote_to_float64(frozen: FrozenFunction) -> FrozenFunction:
    """The same graph computing in float64: every float32 type and constant widened.

    For graphs whose Python is gone (a SavedModel's signature), this is the
    float64 twin: weights are widened exactly, and constants written in code
    were rounded to float32 when the graph was made, so the twin computes the
    float32 graph's function in double precision.

    Raises:
        RunError: the graph has an op with no float64 kernel.
    """
    from tensorflow.core.framework import types_pb2

    graph_def = type(frozen.graph_def)()
    graph_def.CopyFrom(frozen.graph_def)
    single, double = types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE

    def widen_node(node: Any) -> None:
        for value in node.attr.values():
            if value.type == single:
                value.type = double
            for position, listed in enumerate(value.list.type):
                if listed == single:
                    value.list.type[position] = double
            if value.HasField("tensor") and value.tensor.dtype == single:
                array = tf.make_ndarray(value.tensor).astype("float64")
                value.tensor.CopyFrom(tf.make_tensor_proto(array, tf.float64))

    for node in graph_def.node:
        widen_node(node)
    for function in graph_def.library.function:
        for node in function.node_def:
            widen_node(node)
        for argument in [*function.signature.input_arg, *function.signature.output_arg]:
            if argument.type == single:
                argument.type = double
    promoted = FrozenFunction(graph_def, frozen.source, frozen.target, dict(frozen.rewritten))
    try:
        tf.function(promoted).get_concrete_function(tf.TensorSpec((None, None), tf.float64))
    except Exception as error:  # an op without a float64 kernel, in one of many forms
        raise RunError(f"the model's graph cannot run in float64: {str(error).strip().splitlines()[0]}") from None
    return promoted
