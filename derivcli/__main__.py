"""`python -m derivcli` is the same program as `derivcli`."""

from derivcli.cli import run

if __name__ == "__main__":
    run()
