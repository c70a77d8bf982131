"""Exit statuses and the exceptions that carry them.

Every failure derivcli reports is one of these exceptions; `derivcli.cli` maps
each to one line on standard error and its exit status (httpie's `status.py`).
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """The exit statuses of the command-line contract (CLI.md)."""

    SUCCESS = 0
    ERROR = 1
    USAGE = 2
    CHECK_FAILED = 3
    INTERRUPTED = 130
    TERMINATED = 143


class DerivcliError(Exception):
    """A failure with a one-line message for the user.

    Args:
        message: what was wrong, where, and how to fix it; one line.
    """

    status: ExitStatus = ExitStatus.ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(DerivcliError):
    """A bad option, spec, grid or expression (exit status 2)."""

    status = ExitStatus.USAGE


class RunError(DerivcliError):
    """The run failed: unreadable model, bad data, out of resources (exit status 1)."""

    status = ExitStatus.ERROR


class CheckFailed(DerivcliError):
    """A check failed: tolerance, `--max-abs` or `--strict` (exit status 3)."""

    status = ExitStatus.CHECK_FAILED


class Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup runs as for Ctrl-C."""


def printable(text: str) -> str:
    """`text` with control characters (C0, DEL, C1: ESC sequences, line breaks) written as escapes.

    Names from files (class names, layer names, CSV headers and cells) reach messages
    and tables: none of them may drive the terminal or break the one-line contract.
    """
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


# ANSI styles of message prefixes on a terminal.
STYLES = {"error": "\033[1;31m", "warning": "\033[1;33m", "bold": "\033[1m"}


def use_color(stream: object) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org) or TERM=dumb."""
    import os

    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def styled(text: str, style: str, stream: object) -> str:
    """`text` in `style` (error, warning, bold) when `stream` is a terminal that takes colour."""
    return f"{STYLES[style]}{text}\033[0m" if use_color(stream) else text
