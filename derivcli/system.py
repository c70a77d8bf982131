"""What a bug report needs: versions (from package metadata, no import) and the devices TensorFlow sees."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("tensorflow", "keras", "numpy", "h5py", "pyarrow", "matplotlib", "typer", "rich")


def versions() -> list[str]:
    """Lines of versions: derivcli, Python, and the packages derivcli runs on, read without importing them."""
    from derivcli import __version__

    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return [
        f"derivcli {__version__}",
        f"Python {platform.python_version()} ({platform.python_implementation()}, {platform.system()} "
        f"{platform.machine()})",
        ", ".join(found),
    ]


def devices() -> list[str]:
    """The devices TensorFlow sees, and what it was built with (imports TensorFlow: a few seconds)."""
    from derivcli.models import import_tensorflow

    tf = import_tensorflow()
    build = tf.sysconfig.get_build_info()
    lines = [f"TensorFlow {tf.__version__} built with CUDA: {'yes ' + str(build.get('cuda_version', '')) if tf.test.is_built_with_cuda() else 'no'}"]
    for device in tf.config.list_physical_devices():
        details = tf.config.experimental.get_device_details(device) if device.device_type == "GPU" else {}
        name = details.get("device_name", "")
        lines.append(f"device {device.name} ({device.device_type}{', ' + name if name else ''})")
    return lines
