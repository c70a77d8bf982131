"""Every command has help text, answers --help, and is in the README."""

from __future__ import annotations

import pytest
import typer

from derivcli.cli import app

from conftest import ROOT

COMMANDS = [info.name for info in app.registered_commands]


def test_the_commands_exist():
    assert set(COMMANDS) >= {"info", "eval", "grad", "hessian", "laplacian", "deriv"}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_has_help_and_is_documented(cli, command):
    function = next(info.callback for info in app.registered_commands if info.name == command)
    assert (function.__doc__ or "").strip(), f"{command} has no help text"
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.stdout
    assert f"derivcli {command}" in (ROOT / "README.md").read_text(), f"{command} missing from README"


def test_version(cli):
    from derivcli import __version__

    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == f"derivcli {__version__}"  # then Python and the packages (test_terminal)
    assert isinstance(app, typer.Typer)
