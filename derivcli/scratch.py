"""One private temporary folder per run of the installed command, removed however the run ends.

TensorFlow's AutoGraph writes a `__autograph_generated_file*.py` module (and Python its
`__pycache__`) to the temporary folder for every function it converts, and deletes them in
an `atexit` handler. The installed command ends with `os._exit` once its output is out
(`cli.run`: tearing TensorFlow down takes a second), which skips those handlers; a batch job of
10,000 runs would leave 40,000 files behind. So the command points `TMPDIR` and `tempfile` at a
folder of its own inside the user's, and removes that folder whole on its way out: after a
success, an error, a failed gate, SIGINT, SIGTERM or a closed pipe alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile


class ScratchFolder:
    """The run's own temporary folder: created at once, removed by `remove` (any number of calls).

    Attributes:
        path: the folder, or None when the user's temporary folder takes no new folder (the
            run then uses the user's, as it would without derivcli's help).
    """

    def __init__(self) -> None:
        self.previous_environment = os.environ.get("TMPDIR")
        self.previous_tempdir = tempfile.tempdir
        try:
            self.path: str | None = tempfile.mkdtemp(prefix="derivcli-")
        except OSError:
            self.path = None
            return
        # Python's tempfile (AutoGraph, Keras, the writers' spools for special files) and
        # TensorFlow's C++ side, which reads the environment variable.
        tempfile.tempdir = self.path
        os.environ["TMPDIR"] = self.path

    def remove(self) -> None:
        """Removes the folder and everything in it, with SIGINT and SIGTERM held off.

        The signals stay blocked: this runs only on the way out, and a second Ctrl-C
        must not leave the folder half removed. The exit status is already decided.
        """
        if self.path is None:
            return
        with contextlib.suppress(ValueError, AttributeError):  # not the main thread; no pthread_sigmask
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        shutil.rmtree(self.path, ignore_errors=True)
        tempfile.tempdir = self.previous_tempdir
        if self.previous_environment is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = self.previous_environment
        self.path = None
