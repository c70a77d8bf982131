"""`python -m derivcli` is the same program as `derivcli`."""

from derivcli.cli import app

if __name__ == "__main__":
    app(prog_name="derivcli")
