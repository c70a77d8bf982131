"""derivcli: derivatives of saved Keras models, from the shell and from Python.

The library needs no terminal, and its operators serve inside a training loss
(`derivcli.operator`, `gradient`, `hessian`, `laplacian`, `derivative`: see `derivcli.training`):

    >>> from derivcli import load_model, evaluate, DerivativeRequest
    >>> model = load_model("sample_models/square_tanh.keras")
    >>> evaluate(model, [[0.5]], DerivativeRequest(jacobian=True))["dy/dx"]
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "DerivativeRequest", "__version__", "derivative", "evaluate", "gradient", "hessian", "laplacian", "load_model",
    "operator",
]
TRAINING = ("operator", "gradient", "hessian", "laplacian", "derivative")


def __getattr__(name: str) -> Any:
    # Lazy, so that `import derivcli` (and `derivcli --help`) stays free of TensorFlow.
    if name == "load_model":
        from derivcli.models import load_model

        return load_model
    if name in TRAINING:
        from derivcli import training

        return getattr(training, name)
    if name in ("evaluate", "DerivativeRequest"):
        from derivcli import run

        return getattr(run, name)
    raise AttributeError(f"module 'derivcli' has no attribute {name!r}")
