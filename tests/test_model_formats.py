"""Every model format derivcli reads gives the closed-form gradient and higher derivatives."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FORMATS, read_csv

POINTS = [(0.3, -0.7), (-1.2, 0.4), (0.0, 0.0)]


@pytest.mark.parametrize("form", FORMATS)
def test_grad_matches_closed_form_on_every_format(model_factory, cli, form):
    net, path = model_factory("tanh", 2, 1, form)
    args = ["grad", path]
    for point in POINTS:
        args += ["--at", ",".join(map(str, point))]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    assert list(table) == ["x0", "x1", "y", "dy/dx0", "dy/dx1"]
    points = np.array(POINTS)
    # float32 model: values of order 1, so 1e-5 relative is a few float32 ulps.
    np.testing.assert_allclose(table["y"], net.derivative(points, 0, (0, 0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table["dy/dx0"], net.derivative(points, 0, (1, 0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table["dy/dx1"], net.derivative(points, 0, (0, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMATS)
def test_third_order_mixed_partial_goes_through_every_format(model_factory, cli, form):
    """Higher orders differentiate through loaded SavedModel signatures too."""
    net, path = model_factory("tanh", 2, 1, form)
    result = cli("deriv", path, "--at", "0.3,-0.7", "--at", "-1.2,0.4", "--partial", "x0,x1^2", "--partial", "x1^4")
    assert result.exit_code == 0, result.stderr
    table = read_csv(result.stdout)
    points = np.array(POINTS[:2])
    np.testing.assert_allclose(table["d3y/dx0dx1^2"], net.derivative(points, 0, (1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table["d4y/dx1^4"], net.derivative(points, 0, (0, 4)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", FORMATS)
def test_taylor_engine_covers_every_format(model_factory, cli, form):
    """The Taylor engine reads the traced graph, so SavedModel signatures are covered like .keras files."""
    net, path = model_factory("tanh", 2, 1, form)
    result = cli("deriv", path, "--at", "0.3,-0.7", "--at", "-1.2,0.4", "--partial", "x1^6", "--engine", "taylor")
    assert result.exit_code == 0, result.stderr
    expected = net.derivative(np.array(POINTS[:2]), 0, (0, 6))
    # float32, order 6: the tolerance of tests/test_higher_order.py, relative to the column's largest value.
    np.testing.assert_allclose(read_csv(result.stdout)["d6y/dx1^6"], expected, rtol=0, atol=5e-4 * np.max(np.abs(expected)))
