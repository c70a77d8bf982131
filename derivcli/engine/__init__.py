"""Derivative kernels: pure TensorFlow, no I/O, no Typer, no Rich."""

from derivcli.engine.tape import Column, DerivativeKernel, select_device

__all__ = ["Column", "DerivativeKernel", "select_device"]
