"""Every derivative derivcli prints on common architectures, against an independent reference.

Each model of `zoo.ZOO` is saved as `.keras`, loaded by derivcli in float64 and
differentiated by both engines: value, gradient, Hessian, Laplacian, pure orders
3 to 6 (nested tapes: to 4 on the heavier models, see TAPE_ORDER) and mixed partials. The reference is the model's function written out in
mpmath from its weights and differentiated at 60 digits (`zoo.reference_derivative`),
so it shares nothing with derivcli, Keras or TensorFlow.

A long run's kernel (XLA) is held to the same reference.

Tolerance: float64 evaluation and differentiation round off at 1.1e-16 per op;
through these small networks (at most a few hundred ops, condition numbers below
1e3 at the test points, measured) an order-k derivative built from k nested
passes stays within 1e-11 of the column's scale. The bugs this suite guards
against are 1e-8 (float32 constants in float64) to 100% (stop_gradient in
LayerNorm, attention, custom gradients) wrong.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from derivcli.models import load_model
from derivcli.run import DerivativeRequest, make_kernel, plan

from zoo import LAYERS_FILE, ZOO, Entry, reference_derivative

RTOL = 1e-11
LONG_RUN = 10**9  # points: a run long enough to use XLA
POINTS = np.array([[0.31, -0.47, 0.73, -0.12], [-0.58, 0.26, -0.19, 0.64]])


# Nested tapes grow exponentially with the order: order 5 of the LSTM traces for 26 s, order 6
# for minutes. They are checked to order 4 on every model and to order 6 on the light ones;
# the Taylor engine (what `auto` uses from order 2) to order 6 on every model.
TAPE_ORDER = 4
LIGHT = {"layer_norm", "softmax", "mlp_softsign", "custom_layer", "two_outputs"}


def request_for(names: list[str], highest: int = 6) -> DerivativeRequest:
    first = names[0]
    partials = [{first: k} for k in range(3, highest + 1)]
    if len(names) >= 2:
        partials += [{first: 1, names[1]: 2}, {first: 2, names[1]: 2}]
    return DerivativeRequest(partials=partials, jacobian=True, hessian=True, laplacian=True)


def quantities(planned) -> list[tuple[str, int, tuple[int, ...] | None]]:
    """(column name, output, multi-index or None for the Laplacian) for every column of a plan."""
    return [(name, column.output, None if column.laplacian_over is not None else tuple(column.partial))
            for name, column in zip(planned.names, planned.columns)]


@functools.cache
def saved(name: str, folder: str) -> tuple[str, list]:
    entry = next(e for e in ZOO if e.name == name)
    model = entry.build()
    path = f"{folder}/{name}.keras"
    model.save(path)
    return path, model.get_weights()


@functools.cache
def reference(name: str, folder: str, output: int, index: tuple[int, ...] | None, row: int, dimension: int) -> float:
    entry: Entry = next(e for e in ZOO if e.name == name)
    _, weights = saved(name, folder)
    point = POINTS[row, :dimension]
    if index is None:  # the Laplacian
        return sum(reference_derivative(entry, weights, point, output, tuple(2 * (j == i) for j in range(dimension)))
                   for i in range(dimension))
    return reference_derivative(entry, weights, point, output, index)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo"))


@pytest.mark.parametrize("engine", ["tape", "taylor"])
@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_every_derivative_matches_the_independent_reference(entry, engine, folder):
    path, _ = saved(entry.name, folder)
    model = load_model(path, [LAYERS_FILE] if entry.custom_objects else [], dtype="float64")
    dimension = len(model.coordinate_names)
    highest = 6 if engine == "taylor" or entry.name in LIGHT else TAPE_ORDER
    planned = plan(model, request_for(model.coordinate_names, highest))
    kernel = make_kernel(model, planned, engine=engine)
    if engine == "taylor":
        assert kernel.taylor is not None
    values = kernel(POINTS[:, :dimension])
    for j, (name, output, index) in enumerate(quantities(planned)):
        expected = np.array([reference(entry.name, folder, output, index, row, dimension) for row in range(len(POINTS))])
        scale = max(np.max(np.abs(expected)), 1e-3)
        np.testing.assert_allclose(values[:, j], expected, rtol=RTOL, atol=RTOL * scale, err_msg=name)


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_the_xla_kernel_of_a_long_run_matches_the_reference_too(entry, folder):
    """A long run's batches run under XLA (`run.make_kernel`): its own compiler, its own fusions
    and its own tanh, erf and exp, held to the same tolerance.

    Orders 1 and 2 by tapes, the Laplacian and order 3 by Taylor series (higher orders only
    lengthen compilation). Where XLA cannot compile a kernel, the run goes on with plain graphs.
    """
    path, _ = saved(entry.name, folder)
    model = load_model(path, [LAYERS_FILE] if entry.custom_objects else [], dtype="float64")
    dimension = len(model.coordinate_names)
    request = DerivativeRequest(partials=[{model.coordinate_names[0]: 3}], jacobian=True, hessian=True, laplacian=True)
    planned = plan(model, request)
    kernel = make_kernel(model, planned, points=LONG_RUN, batch_size=len(POINTS))
    kernel(POINTS[:, :dimension], 0)  # up to order 3, a long run's first batch runs the plain graph
    values = kernel(POINTS[:, :dimension], 1)
    assert kernel.xla not in (None, False), f"{entry.name}: XLA did not compile"
    for j, (name, output, index) in enumerate(quantities(planned)):
        expected = np.array([reference(entry.name, folder, output, index, row, dimension) for row in range(len(POINTS))])
        scale = max(np.max(np.abs(expected)), 1e-3)
        np.testing.assert_allclose(values[:, j], expected, rtol=RTOL, atol=RTOL * scale, err_msg=name)


def test_the_float64_graph_holds_no_float32_constant(folder):
    """gelu's 1/sqrt(2), Rescaling, Normalization, the attention scale, LeakyReLU's slope: all float64."""
    for entry in ZOO:
        path, _ = saved(entry.name, folder)
        model = load_model(path, [LAYERS_FILE] if entry.custom_objects else [], dtype="float64")
        assert model.frozen().low_precision == [], entry.name


def test_gradient_conventions_are_rewritten_where_the_models_have_them(folder):
    """The ops that change a derivative and not a value, found in these models, and made plain identities."""
    found = {}
    for entry in ZOO:
        path, _ = saved(entry.name, folder)
        found[entry.name] = load_model(path, [LAYERS_FILE] if entry.custom_objects else []).frozen().rewritten
    assert found["layer_norm"] == {"StopGradient": 1}  # the variance around stop_gradient(mean)
    assert found["attention"] == {"StopGradient": 1}
    assert found["custom_layer"] == {"StopGradient": 1, "gradient override": 1}
    assert found["mlp_silu"] == {"gradient override": 1}  # tf.nn.silu's memory-saving custom gradient
    assert found["mlp_gelu"] == {}
