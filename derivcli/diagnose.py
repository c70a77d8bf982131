"""Smoothness verdicts: which derivative orders are zero almost everywhere, and why.

The verdict is read off the ops of the model's traced TensorFlow graph, with
SavedModel function calls inlined, so it covers Keras layers, custom layers
and SavedModels alike, and it names the layers whose ops decide it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Ops whose value is piecewise linear in their input: every derivative of
# order 2 and higher is zero except on a set of measure zero (the kinks).
PIECEWISE_LINEAR_OPS = {
    "Relu", "Relu6", "LeakyRelu", "Maximum", "Minimum", "Abs", "ClipByValue", "Select",
    "SelectV2", "Sign", "Floor", "Ceil", "Round", "Rint", "MaxPool", "MaxPoolV2", "MaxPool3D", "TopKV2",
}
# Ops with non-zero derivatives of every order.
SMOOTH_OPS = {
    "Tanh", "Sigmoid", "Softplus", "Softsign", "Exp", "Expm1", "Log", "Log1p", "Sin", "Cos",
    "Tan", "Erf", "Erfc", "Sqrt", "Rsqrt", "Square", "Pow", "Reciprocal", "Inv", "Elu", "Selu",
    "Atan", "Asinh", "Acosh", "Atanh", "Sinh", "Cosh", "Softmax", "LogSoftmax", "Asin", "Acos",
    "Atan2", "Lgamma", "Digamma", "Xlogy", "Xdivy", "SquaredDifference",
}
# Ops that are bilinear: smooth and non-linear when two operands vary with the input.
BILINEAR_OPS = {
    "Mul", "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "RealDiv", "Div",
    "DivNoNan", "Einsum", "Conv2D", "Conv1D", "Conv3D", "DepthwiseConv2dNative", "FloorDiv",
}
# Ops that are linear in their varying inputs, or do not touch values at all.
LINEAR_OPS = {
    "Placeholder", "Const", "Identity", "IdentityN", "ReadVariableOp", "VarHandleOp", "NoOp",
    "AddV2", "Add", "AddN", "Sub", "Neg", "BiasAdd", "Reshape", "ConcatV2", "Concat",
    "StridedSlice", "Slice", "Pack", "Unpack", "Split", "SplitV", "Transpose", "Squeeze",
    "ExpandDims", "Tile", "Cast", "Shape", "ShapeN", "Size", "Rank", "Fill", "ZerosLike",
    "OnesLike", "Sum", "Mean", "GatherV2", "Gather", "BroadcastTo", "BroadcastArgs",
    "Cumsum", "Pad", "PadV2", "MirrorPad", "AvgPool", "AvgPool3D", "Range", "StopGradient",
    "PreventGradient", "Snapshot", "EnsureShape", "Prod", "Equal", "NotEqual", "Less",
    "LessEqual", "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr", "LogicalNot",
    "ResizeBilinear", "ResizeNearestNeighbor", "Reverse", "ReverseV2", "TensorScatterUpdate",
    "GatherNd", "ScatterNd", "DepthToSpace", "SpaceToDepth", "MatrixDiag",
    "MatrixDiagPartV3", "StatelessIf", "If", "Assert", "CheckNumerics",
}


@dataclass
class Verdict:
    """Which derivative orders are zero almost everywhere.

    Attributes:
        zero_from_order: the lowest order that is identically zero almost
            everywhere (2 for a relu network, 1 for a constant), or None
            when every order is defined and in general non-zero.
        reason: one sentence for the user.
        kink_layers: layers with piecewise-linear ops.
        smooth_layers: layers with smooth non-linear ops.
        unknown_ops: op types derivcli does not classify.
    """

    zero_from_order: int | None
    reason: str
    kink_layers: list[str] = field(default_factory=list)
    smooth_layers: list[str] = field(default_factory=list)
    unknown_ops: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "zero_from_order": self.zero_from_order,
            "reason": self.reason,
            "piecewise_linear_layers": self.kink_layers,
            "smooth_layers": self.smooth_layers,
            "unclassified_ops": self.unknown_ops,
        }


# How a user knows each piecewise-linear op: the activation or operation they wrote.
KINK_NAMES = {
    "Relu": "relu", "Relu6": "relu6", "LeakyRelu": "leaky_relu", "Maximum": "maximum", "Minimum": "minimum",
    "Abs": "abs", "ClipByValue": "clip", "Select": "a where/branch", "SelectV2": "a where/branch", "Sign": "sign",
    "Floor": "floor", "Ceil": "ceil", "Round": "round", "Rint": "round", "MaxPool": "max pooling",
    "MaxPoolV2": "max pooling", "MaxPool3D": "max pooling", "TopKV2": "top-k",
}


def _scope_parts(op_name: str) -> list[str]:
    return [p for p in op_name.split("/") if p and "PartitionedCall" not in p]


def layer_scopes(ops: list[Any], model: Any) -> dict[str, str]:
    """The traced name scope of each layer of a Keras model: {scope: layer name}.

    Tracing makes a layer's scope unique by a suffix (`dense` runs in `dense_1`,
    `dense_1` in `dense_1_2`), so a scope can also be another layer's name.
    The model's layers run in order, so the top-level scopes, in the order the
    ops first use them, are paired with the layers in order, each pair checked to
    be the layer's name with or without a suffix. Where the pairing fails
    (shared layers, a layer with no ops), it is empty and names are matched one by one.
    """
    if model.kind != "keras":
        return {}
    layers = [layer.name for layer in model.keras_model.layers if type(layer).__name__ != "InputLayer"]
    scopes: dict[str, None] = {}
    for op in ops:
        parts = _scope_parts(op.name)
        if len(parts) >= 3:
            scopes[parts[1]] = None
    if len(scopes) != len(layers) or not all(
            re.fullmatch(re.escape(layer) + r"(_\d+)?", scope) for layer, scope in zip(layers, scopes)):
        return {}
    return dict(zip(scopes, layers))


def _layer_of(op_name: str, layer_names: set[str], scopes: dict[str, str] | None = None) -> str:
    """The layer an op belongs to, from its name scope (`model_1/dense_1/Relu` -> `dense`).

    `scopes` (from `layer_scopes`) decides where it can; else a scope is matched
    to a layer of the model without the suffix tracing adds, then as it is.
    """
    parts = _scope_parts(op_name)
    if scopes and len(parts) >= 3 and parts[1] in scopes:
        return scopes[parts[1]]
    for part in reversed(parts[:-1]):
        for candidate in (re.sub(r"_\d+$", "", part), part):
            if candidate in layer_names:
                return candidate
    return parts[-2] if len(parts) >= 2 else op_name


def _layer_names(model: Any) -> set[str]:
    names: set[str] = set()
    for layer in getattr(model.keras_model, "layers", []) if model.kind == "keras" else []:
        names.add(layer.name)
        names |= {inner.name for inner in getattr(layer, "layers", [])}
    return names


def flat_graph_ops(model: Any) -> list[Any]:
    """The ops of the model's traced graph, with function calls inlined: the frozen graph the
    engines differentiate (`LoadedModel.frozen`), made once per model."""
    return model.frozen().operations()


def smoothness_verdict(model: Any) -> Verdict:
    """Classifies the model's ops to tell which derivative orders vanish.

    Ops are followed from the input forward; an op on no path from the input
    (a weight's own arithmetic) does not count.
    """
    ops = flat_graph_ops(model)
    layer_names = _layer_names(model)
    scopes = layer_scopes(ops, model)
    varying: set[str] = set()
    kinks: dict[str, None] = {}
    kink_kinds: dict[str, None] = {}
    smooth: dict[str, None] = {}
    unknown: dict[str, None] = {}
    for op in ops:
        if op.type == "Placeholder":
            varying.update(t.name for t in op.outputs)
            continue
        varying_inputs = [t for t in op.inputs if t.name in varying]
        if not varying_inputs:
            continue
        varying.update(t.name for t in op.outputs)
        layer = _layer_of(op.name, layer_names, scopes)
        if op.type in PIECEWISE_LINEAR_OPS:
            kinks[layer] = None
            kink_kinds[KINK_NAMES.get(op.type, op.type)] = None
        elif op.type in SMOOTH_OPS:
            smooth[layer] = None
        elif op.type in BILINEAR_OPS:
            if len(varying_inputs) >= 2 or (op.type in {"RealDiv", "Div", "DivNoNan", "FloorDiv"} and op.inputs[1].name in varying):
                smooth[layer] = None
        elif op.type not in LINEAR_OPS:
            unknown[op.type] = None
    if unknown:
        return Verdict(
            None,
            f"cannot tell from the graph: ops {', '.join(unknown)} are not classified; "
            "`derivcli doctor` checks the orders numerically",
            list(kinks), list(smooth), list(unknown),
        )
    what = " and ".join(kink_kinds)
    plural = "s" if len(kinks) > 1 else ""
    named = layer_list(model, list(kinks))
    if smooth:
        reason = "smooth: derivatives of every order are in general non-zero"
        if kinks:
            reason += (f" wherever they are defined; layer{plural} {named} use{'' if plural else 's'} "
                       f"{what}: derivatives may jump where {'their' if plural else 'its'} pieces meet")
        return Verdict(None, reason, list(kinks), list(smooth))
    if kinks:
        return Verdict(
            2,
            "piecewise linear: derivatives of order 2 and higher are zero almost everywhere "
            f"(layer{plural} {named} use{'' if plural else 's'} {what}, which is piecewise linear, "
            "and no layer is smooth); use a smooth activation such as tanh, softplus or gelu for non-zero "
            "higher derivatives",
            list(kinks), [],
        )
    return Verdict(
        2, "linear: derivatives of order 2 and higher are zero everywhere (no non-linear layer)"
    )


# More layers than this are named by their classes in a verdict (`info --format json` lists them all).
LISTED_LAYERS = 8


def layer_list(model: Any, names: list[str]) -> str:
    """`a, b, c`; on a big model, the layers counted by class: `40 (22 ReLU, 18 Activation)`."""
    if len(names) <= LISTED_LAYERS:
        return ", ".join(names)
    classes: dict[str, int] = {}
    for name in names:
        kind = type(model.keras_model.get_layer(name)).__name__ if model.kind == "keras" and _has_layer(model, name) \
            else "other"
        classes[kind] = classes.get(kind, 0) + 1
    counted = ", ".join(f"{count} {kind}" for kind, count in sorted(classes.items(), key=lambda item: -item[1]))
    return f"{len(names)} ({counted}; info --format json lists them)"


def _has_layer(model: Any, name: str) -> bool:
    try:
        model.keras_model.get_layer(name)
    except ValueError:
        return False
    return True


# Relative change of a point's outputs when the rest of its batch changes, above which
# the model is taken to mix samples. The two evaluations have the same shape and the
# point the same row, so the kernels take the same path and, for a model that keeps
# samples apart, give the same bits: round-off cannot reach this, however ill-conditioned
# the model (a float32 cancellation that loses 4 digits once made the old alone-versus-
# batch comparison refuse a plain Dense model). A layer that mixes samples changes
# outputs by far more.
BATCH_DEPENDENCE_TOLERANCE = 1e-4


def batch_dependence(model: Any, coordinates: Any, samples: int = 8) -> float:
    """How much the outputs at a point change when the other points of its batch change.

    Per-sample derivatives of a batch are exact only when each output depends
    on its own point alone; a layer that mixes samples (batch statistics, a
    reduction over the batch axis) breaks that. The first and the last of the
    first `samples` points are each evaluated in the batch and in a batch of the
    same size holding copies of themselves only.

    Args:
        model: a `LoadedModel`.
        coordinates: a (batch, D) array of points, in the compute dtype.
        samples: how many of the first points to use.

    Returns:
        The largest change relative to the largest output; 0 for fewer than 2 distinct points.
    """
    import numpy as np
    import tensorflow as tf

    points = np.asarray(coordinates)[:samples]
    if len(points) < 2 or np.all(points == points[0]):
        return 0.0
    forward = tf.function(
        model.call_flat,
        input_signature=[tf.TensorSpec((None, points.shape[1]), tf.as_dtype(model.dtype))],
    )
    together = forward(points).numpy()
    changes, scale = [], 0.0
    for row in (0, len(points) - 1):
        copies = forward(np.repeat(points[row : row + 1], len(points), axis=0)).numpy()[row]
        finite = np.isfinite(together[row]) & np.isfinite(copies)
        if finite.any():
            changes.append(np.max(np.abs(together[row] - copies)[finite]))
            scale = max(scale, float(np.max(np.abs(together[row][finite]))))
    if not changes:
        return 0.0
    return float(max(changes) / (scale or 1.0))


COMPARISON_OPS = {"Less", "LessEqual", "Greater", "GreaterEqual", "Equal", "NotEqual"}


@dataclass
class DisconnectedWeight:
    """A trainable weight that the outputs do not depend on."""

    layer: str
    weight: str
    reason: str
    kind: str = "unused"  # unread, comparison or unused: what the fix is


def _weight_reason(model: Any, variable: Any) -> tuple[str, str]:
    """Why a weight gets no gradient, read off the traced graph: (kind, reason)."""
    import tensorflow as tf

    dimension = len(model.coordinate_names)
    concrete = tf.function(model.call_flat).get_concrete_function(
        tf.TensorSpec((None, dimension), tf.as_dtype(model.dtype))
    )
    handles = [internal for external, internal in concrete.graph.captures if external is variable.handle]
    if not handles:
        return "unread", "the layer's call never reads it"
    frontier = [op for op in concrete.graph.get_operations() if any(t is handles[0] for t in op.inputs)]
    seen: set[str] = set()
    comparisons = 0
    while frontier:
        op = frontier.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type in COMPARISON_OPS:
            comparisons += 1
            continue  # a boolean: no derivative flows through it
        for tensor in op.outputs:
            frontier.extend(tensor.consumers())
    if comparisons:
        return "comparison", "it is used only in a comparison (a condition such as where(|x| < w, ...)), never in the value"
    return "unused", "its value does not reach the outputs"


def disconnected_weights(model: Any, points: Any) -> list[DisconnectedWeight]:
    """Trainable weights of a Keras model that receive no gradient from its outputs at `points`."""
    import tensorflow as tf

    if model.kind != "keras":
        return []
    keras_model = model.keras_model
    variables = list(keras_model.trainable_variables)
    if not variables:
        return []
    coordinates = tf.constant(points, tf.as_dtype(model.dtype))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model.call_flat(coordinates))
    gradients = tape.gradient(
        total, [v.value if hasattr(v, "value") else v for v in variables],
        unconnected_gradients=tf.UnconnectedGradients.NONE,
    )
    owners = {id(v): layer.name for layer in keras_model._flatten_layers() for v in layer.trainable_weights}
    found = []
    for variable, gradient in zip(variables, gradients):
        if gradient is None:
            name = getattr(variable, "name", "?").split("/")[-1].split(":")[0]
            kind, reason = _weight_reason(model, variable)
            found.append(DisconnectedWeight(owners.get(id(variable), "?"), name, reason, kind))
    return found


def nonfinite_weights(model: Any) -> list[tuple[str, str, int]]:
    """(layer, weight, count) of every weight of a Keras model that holds NaN or Inf."""
    import numpy as np

    if model.kind != "keras":
        return []
    found = []
    for layer in model.keras_model._flatten_layers(include_self=False):
        if list(layer._flatten_layers(include_self=False, recursive=False)):
            continue  # a model or block: its own layers report their weights
        for weight in layer.weights:
            values = np.asarray(weight.numpy())
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            if bad:
                found.append((layer.name, getattr(weight, "name", "?").split("/")[-1].split(":")[0], bad))
    return found


def first_nonfinite_layer(model: Any, point: Any) -> tuple[str, str] | None:
    """The first layer whose output, or whose output's derivative, is NaN/Inf at `point`.

    Returns:
        (layer name, "value" or "derivative"), or None when no layer can be
        named (not a functional Keras model, or every layer is finite).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    if model.kind != "keras":
        return None
    keras_model = model.keras_model
    try:
        layers = [layer for layer in keras_model.layers if not isinstance(layer, keras.layers.InputLayer)]
        probe = keras.Model(keras_model.inputs, [layer.output for layer in layers])
    except (AttributeError, ValueError):
        return None
    coordinates = tf.constant(np.asarray(point)[None, :], tf.as_dtype(model.dtype))
    pieces, start = [], 0
    for info in model.model_inputs:
        pieces.append(tf.reshape(coordinates[:, start : start + info.size], (-1, *info.shape)))
        start += info.size
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(pieces)
        outputs = probe(pieces[0] if len(pieces) == 1 else pieces, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        totals = [tf.reduce_sum(o) for o in outputs]
    for layer, output in zip(layers, outputs):
        if not np.all(np.isfinite(output.numpy())):
            return layer.name, "value"
    for layer, total in zip(layers, totals):
        gradients = tape.gradient(total, pieces, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if not all(np.all(np.isfinite(g.numpy())) for g in gradients):
            return layer.name, "derivative"
    return None
