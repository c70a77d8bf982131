"""Graph surgery on a frozen GraphDef: what TensorFlow cannot differentiate as traced, rewritten as ops it can.

- Function calls that Grappler leaves (marked for XLA or not to inline) are inlined: a call's
  gradient is a SymbolicGradient of the function, which fails in an imported graph.
- Grouped 2-D convolutions (ConvNeXt's, which Keras wraps in such a call) become depthwise or
  split convolutions: TensorFlow has no CPU kernel for a grouped convolution's gradient.

Both keep every value the same; `engine.graph.freeze` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def inline_calls(graph_def: Any, rewritten: dict[str, int]) -> None:
    """Replaces each call of a library function in the graph by the function's body, in place.

    A call's gradient is a SymbolicGradient of the function, which fails in an imported graph (and
    skips the ops' own registered gradients); inlined, each op is differentiated by its own rule. The
    call's node becomes an IdentityN of the body's results, so its consumers read it as before.
    Loops and conditionals are ops of their own and stay functional.
    """
    library = {function.signature.name: function for function in graph_def.library.function}
    while True:
        nodes = list(graph_def.node)
        calls = [node for node in nodes if node.op in CALL_OPS and node.attr["f"].func.name in library]
        if not calls:
            return
        del graph_def.node[:]
        for node in nodes:
            if node.op in CALL_OPS and node.attr["f"].func.name in library:
                graph_def.node.extend(_inlined(node, library[node.attr["f"].func.name]))
                rewritten["function call inlined"] = rewritten.get("function call inlined", 0) + 1
            else:
                graph_def.node.append(node)


def _inlined(call: Any, function: Any) -> list[Any]:
    """The nodes of `function`'s body, named under the call's name, then an IdentityN named as the call."""
    from tensorflow.core.framework import node_def_pb2
    from tensorflow.python.framework import op_def_registry

    prefix = call.name + "/inlined/"
    data_inputs = [name for name in call.input if not name.startswith("^")]
    control_inputs = [name for name in call.input if name.startswith("^")]
    arguments = {argument.name: data_inputs[i] for i, argument in enumerate(function.signature.input_arg)}
    output_positions = {node.name: _output_positions(node, op_def_registry.get(node.op)) for node in function.node_def}

    def tensor(reference: str) -> str:
        if reference.startswith("^"):
            return "^" + prefix + reference[1:]
        if reference in arguments:
            return arguments[reference]
        node, _, rest = reference.partition(":")
        if not rest:
            return prefix + node
        argument, _, index = rest.partition(":")
        return f"{prefix}{node}:{output_positions[node][argument] + int(index or 0)}"

    body = []
    for original in function.node_def:
        node = node_def_pb2.NodeDef()
        node.CopyFrom(original)
        node.name = prefix + original.name
        inputs = [tensor(name) for name in original.input]
        del node.input[:]
        node.input.extend(inputs + (control_inputs if not any(not i.startswith("^") for i in inputs) else []))
        body.append(node)
    results = node_def_pb2.NodeDef(name=call.name, op="IdentityN")
    results.input.extend(tensor(function.ret[argument.name]) for argument in function.signature.output_arg)
    results.attr["T"].list.type.extend(argument.type for argument in function.signature.output_arg)
    if "_output_shapes" in call.attr:
        results.attr["_output_shapes"].CopyFrom(call.attr["_output_shapes"])
    return [*body, results]


def _output_positions(node: Any, op_def: Any) -> dict[str, int]:
    """Where each named output argument of `node` starts among its flat outputs (`conv:output:0` -> `conv:0`)."""
    positions, start = {}, 0
    for argument in op_def.output_arg if op_def is not None else []:
        positions[argument.name] = start
        if argument.number_attr:
            start += node.attr[argument.number_attr].i
        elif argument.type_list_attr:
            start += len(node.attr[argument.type_list_attr].list.type)
        else:
            start += 1
    return positions


def ungroup_convolutions(graph_def: Any, rewritten: dict[str, int]) -> None:
    """Rewrites grouped 2-D convolutions, in place, as ops TensorFlow differentiates on every device.

    A Conv2D whose filter holds fewer input channels than its input has is grouped; TensorFlow has
    no CPU kernel for its gradient. One group per channel is a depthwise convolution (the filter
    reshaped, same values and output order); other groups are split, convolved and concatenated.
    """
    convolutions = [node for node in graph_def.node if node.op == "Conv2D"]
    if not convolutions:
        return
    shapes = _static_shapes(graph_def)
    for node in convolutions:
        source, kernel = (shapes.get(_tensor_name(name)) for name in node.input[:2])
        channels_axis = 3 if node.attr["data_format"].s in (b"", b"NHWC") else 1
        if source is None or kernel is None or source[channels_axis] is None or None in kernel:
            continue
        channels, (height, width, group_channels, outputs) = source[channels_axis], kernel
        if group_channels == channels or channels % group_channels:
            continue
        rewritten["grouped convolution"] = rewritten.get("grouped convolution", 0) + 1
        _ungroup(graph_def, node, channels_axis, channels // group_channels, (height, width, channels, outputs))


def _ungroup(graph_def: Any, node: Any, channels_axis: int, groups: int, shape: tuple[int, int, int, int]) -> None:
    """Rewrites one grouped Conv2D `node` (see `ungroup_convolutions`), adding the nodes it needs to `graph_def`."""
    from tensorflow.core.framework import attr_value_pb2, node_def_pb2

    def add(name: str, op: str, inputs: Sequence[str], **attributes: Any) -> str:
        new = graph_def.node.add()  # the importer creates ops in a topological order, wherever a node stands
        new.CopyFrom(node_def_pb2.NodeDef(name=f"{node.name}/{name}", op=op, input=list(inputs)))
        for key, value in attributes.items():
            new.attr[key].CopyFrom(value)
        return new.name

    def constant(name: str, values: int | Sequence[int]) -> str:
        return add(name, "Const", [], dtype=_type_attr(tf.int32),
                   value=attr_value_pb2.AttrValue(tensor=tf.make_tensor_proto(np.asarray(values, np.int32))))

    height, width, channels, outputs = shape
    element_type = node.attr["T"]
    image, kernel, controls = node.input[0], node.input[1], [name for name in node.input if name.startswith("^")]
    kept = ("T", "_output_shapes", "strides", "padding", "explicit_paddings", "data_format", "dilations")
    convolution = {key: node.attr[key] for key in node.attr if key in kept[2:]}
    if groups == channels:  # depthwise: `outputs // channels` outputs per channel, in the same order
        shape_name = constant("depthwise_shape", [height, width, channels, outputs // channels])
        inputs = [image, add("depthwise_filter", "Reshape", [kernel, shape_name], T=element_type,
                             Tshape=_type_attr(tf.int32))]
        node.op = "DepthwiseConv2dNative"
    else:
        number = attr_value_pb2.AttrValue(i=groups)
        images = add("split_input", "Split", [constant("input_axis", channels_axis), image], T=element_type,
                     num_split=number)
        kernels = add("split_filter", "Split", [constant("filter_axis", 3), kernel], T=element_type,
                      num_split=number)
        inputs = [add(f"group{g}", "Conv2D", [f"{images}:{g}", f"{kernels}:{g}"], T=element_type, **convolution)
                  for g in range(groups)] + [constant("output_axis", channels_axis)]
        node.op = "ConcatV2"
        kept = ("T", "_output_shapes")
    del node.input[:]
    node.input.extend(inputs + controls)
    for key in list(node.attr):
        if key not in kept:
            del node.attr[key]
    if node.op == "ConcatV2":
        node.attr["N"].i = groups
        node.attr["Tidx"].type = tf.int32.as_datatype_enum


def _type_attr(dtype: Any) -> Any:
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(type=dtype.as_datatype_enum)


def _tensor_name(reference: str) -> str:
    name, _, index = reference.partition(":")
    return f"{name}:{index or 0}"


def _static_shapes(graph_def: Any) -> dict[str, tuple[int | None, ...]]:
    """The static shape of every tensor of a graph, by name (`node:0`), from TensorFlow's shape inference."""
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    return {tensor.name: tuple(tensor.shape.as_list()) for op in graph.get_operations() for tensor in op.outputs
            if tensor.shape.rank is not None}
