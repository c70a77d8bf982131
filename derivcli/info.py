"""`derivcli info`: what a model is, as a dict and as a terminal report."""

from __future__ import annotations

import sys
from typing import Any

from derivcli.diagnose import smoothness_verdict
from derivcli.models import LoadedModel, suggested_output_names
from derivcli.naming import summarized


def _activation_name(layer: Any) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", type(activation).__name__)


def _layers(model: Any) -> list[dict[str, Any]]:
    """Every layer, nested models flattened, with its activation and parameter count."""
    rows = []
    for layer in getattr(model, "layers", []):
        if hasattr(layer, "layers") and layer.layers:
            rows += _layers(layer)
            continue
        rows.append({
            "name": layer.name,
            "class": type(layer).__name__,
            "activation": _activation_name(layer),
            "parameters": int(layer.count_params()) if layer.built else 0,
        })
    return rows


def _ports(infos: list[Any], names: list[str], key: str) -> list[dict[str, Any]]:
    """Inputs or outputs, each with the scalar names it contributes under `key`."""
    ports, start = [], 0
    for info in infos:
        ports.append({
            "name": info.name, "shape": [None, *info.shape], "dtype": info.dtype,
            key: names[start : start + info.size],
        })
        start += info.size
    return ports


def describe(model: LoadedModel) -> dict[str, Any]:
    """Everything `info` reports about `model`, JSON-ready."""
    layers = _layers(model.keras_model) if model.kind == "keras" else []
    inputs = _ports(model.inputs, model.coordinate_names, "coordinates")
    outputs = _ports(model.outputs, model.output_names, "columns")
    return {
        "path": model.path,
        "format": model.kind,
        "inputs": inputs,
        "outputs": outputs,
        "layers": layers,
        "parameters": model.parameter_count,
        "smoothness": smoothness_verdict(model).as_dict(),
        "suggested_output_names": suggested_output_names(model),
    }


def render_info(description: dict[str, Any]) -> None:
    """Prints the description for a terminal (Rich, on standard output)."""
    from rich.console import Console
    from rich.table import Table

    # Off a terminal, the table is as wide as its longest layer name needs (a pipe has no width to fold to).
    rows = description["layers"]
    widest = max([len(r["name"]) + len(r["class"]) + len(r["activation"] or "-") for r in rows], default=0) + 30
    console = Console(file=sys.stdout, soft_wrap=True, width=widest if widest > 80 and not sys.stdout.isatty() else None)
    console.print(f"[bold]{description['path']}[/bold] ({description['format']}), "
                  f"{description['parameters']:,} parameters")
    ports = Table(box=None, header_style="bold")
    for heading in ("", "name", "shape", "dtype", "columns"):
        ports.add_column(heading)
    for kind, key, items in (("input", "coordinates", description["inputs"]), ("output", "columns", description["outputs"])):
        for item in items:
            shape = "(" + ", ".join("None" if d is None else str(d) for d in item["shape"]) + ")"
            ports.add_row(kind, item["name"], shape, item["dtype"], summarized(item[key]))  # an image: first … last
    console.print(ports)
    if description["layers"]:
        layers = Table(box=None, header_style="bold")
        for heading in ("layer", "class", "activation", "parameters"):  # names whole, folded where they must
            layers.add_column(heading, justify="right" if heading == "parameters" else "left", overflow="fold")
        for layer in description["layers"]:
            layers.add_row(layer["name"], layer["class"], layer["activation"] or "-", f"{layer['parameters']:,}")
        console.print(layers)
    smoothness = description["smoothness"]
    console.print(f"[bold]smoothness:[/bold] {smoothness['reason']}")
    suggested = description.get("suggested_output_names")
    if suggested:
        names = ",".join(suggested)
        console.print(f"[bold]hint:[/bold] --output-names {names} names the output columns after the output layers "
                      f"(then {suggested[0]} and D({suggested[0]}, ...) in op expressions)", markup=True,
                      highlight=False)
