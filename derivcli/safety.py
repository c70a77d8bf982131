"""What a SavedModel's graphs may do before derivcli lets TensorFlow load them.

Loading a SavedModel runs graph ops (variable restores, resource initializers) and
evaluating it runs its serving function: a graph can write files (WriteFile,
SaveV2), print to a `file://` stream (PrintV2), call Python (PyFunc), read files
through datasets, queues and lookup tables. `check_saved_model` reads
`saved_model.pb` as a protobuf, without loading anything, and accepts only ops of
the allowlist below, in every graph and every function of its library; checkpoint
saving is accepted only inside the functions that the SavedModel's own saver calls.
"""

from __future__ import annotations

from pathlib import Path

from derivcli.errors import RunError

# Side-effect-free ops: math, neural-network, array, control-flow, variable and restore ops.
ALLOWED_OPS = frozenset("""
Abs Acos Acosh Add AddN AddV2 All Any ApproximateEqual ArgMax ArgMin Asin Asinh Assert Assign AssignAddVariableOp
AssignSubVariableOp AssignVariableOp Atan Atan2 Atanh AvgPool AvgPool3D BatchMatMul BatchMatMulV2 BatchMatMulV3
BiasAdd Bitcast BroadcastArgs BroadcastGradientArgs BroadcastTo Case Cast Ceil CheckNumerics ClipByValue ConcatOffset
ConcatV2 Const Conv1D Conv2D Conv3D Cos Cosh CudnnRNN CudnnRNNV2 CudnnRNNV3 Cumprod Cumsum DepthToSpace
DepthwiseConv2dNative DestroyResourceOp Digamma DisableCopyOnRead Div DivNoNan Einsum Elu EnsureShape Enter Equal Erf
Erfc Exit Exp ExpandDims Expm1 Fill Floor FloorDiv FloorMod FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3
Gather GatherNd GatherV2 Greater GreaterEqual Identity IdentityN If InvertPermutation Inv IsFinite IsInf IsNan
LRN LeakyRelu Less LessEqual Lgamma LinSpace Log Log1p LogSoftmax LogicalAnd LogicalNot LogicalOr LoopCond MatMul
MatrixBandPart MatrixDiag MatrixDiagPartV3 MatrixDiagV3 Max MaxPool MaxPool3D MaxPoolV2 Maximum Mean Merge Min
Minimum MirrorPad Mod Mul Neg NextIteration NoOp NotEqual OneHot OnesLike Pack Pad PadV2 PartitionedCall Placeholder
PlaceholderWithDefault Pow PreventGradient Prod Range Rank ReadVariableOp RealDiv Reciprocal Relu Relu6 Reshape
ResizeBilinear ResizeNearestNeighbor RestoreV2 ReverseV2 Rint Round Rsqrt ScatterNd Select SelectV2 Selu Shape
ShapeN Sigmoid Sign Sin Sinh Size Slice Snapshot Softmax Softplus Softsign SpaceToDepth Split SplitV Sqrt Square
SquaredDifference Squeeze StatefulPartitionedCall StatelessCase StatelessIf StatelessWhile StopGradient
StridedSlice Sub Sum Switch Tan Tanh TensorListFromTensor TensorListGetItem TensorListLength TensorListReserve
TensorListSetItem TensorListStack TensorScatterUpdate Tile TopKV2 Transpose Unpack VarHandleOp VarIsInitializedOp
Variable VariableV2 Where While Xdivy Xlogy ZerosLike
""".split())  # noqa: SIM905 (a block of names reads better than a list of strings)
# The standard checkpoint saver: it writes files, and is accepted only in the functions the saver calls.
SAVER_OPS = frozenset({"SaveV2", "MergeV2Checkpoints", "ShardedFilename", "StringJoin", "StaticRegexFullMatch"})
CALL_ATTRIBUTES = ("f", "body", "cond", "then_branch", "else_branch", "branches")


def check_saved_model(path: Path) -> None:
    """Refuses a SavedModel whose graphs hold an op outside the allowlist, before TensorFlow loads it.

    Raises:
        RunError: naming the op, where it is, and `--unsafe`.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception:  # protobuf raises its own DecodeError
        raise RunError(f"cannot load {path}: saved_model.pb is not a SavedModel protobuf") from None
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        functions = {function.signature.name: function for function in graph.library.function}
        saver = meta_graph.saver_def
        saver_nodes = {saver.save_tensor_name.split(":")[0], saver.restore_op_name.split(":")[0]} - {""}
        saving = _called(
            [node for node in graph.node if node.name in saver_nodes], functions)
        for node in graph.node:
            _check(path, node, node.name in saver_nodes, "the graph")
        for name, function in functions.items():
            for node in function.node_def:
                _check(path, node, name in saving, f"function {name}")


def _called(nodes: list, functions: dict) -> set[str]:
    """The names of the functions `nodes` call, directly or through the functions they call."""
    found: set[str] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        for attribute in CALL_ATTRIBUTES:
            if attribute not in node.attr:
                continue
            value = node.attr[attribute]
            names = [value.func.name] + [f.name for f in value.list.func]
            for name in names:
                if name and name not in found and name in functions:
                    found.add(name)
                    stack.extend(functions[name].node_def)
    return found


def _check(path: Path, node, in_saver: bool, where: str) -> None:
    if node.op in ALLOWED_OPS or (in_saver and node.op in SAVER_OPS):
        return
    if node.op.endswith("Grad") or "Backprop" in node.op:  # TensorFlow's gradient kernels (saved backward functions)
        return
    raise RunError(
        f"cannot load {path}: op {node.op} ({node.name}, in {where}) can touch files or run code, and derivcli "
        "runs only side-effect-free graphs; pass --unsafe if you trust the model"
    )
