"""One-line errors for the LightningCLI / jsonargparse commands: a bad option or config value is reported
as the one line that says what is wrong, not as the parser's usage, tracebacks and nested errors."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gaq.errors import GaqError, check


def argument_error_line(err: Exception) -> str:
    """The one line of a jsonargparse error that says what is wrong (the first check message of a failed
    instantiation, else the error's first line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reasons = [ln[2:] for ln in lines if ln.startswith("- ") and not ln.startswith(("- Expected a", "- Not a valid"))]
    return (reasons or lines or [type(err).__name__])[0]


def check_config_files(argv: list[str], example: str) -> None:
    """Every ``--config`` / ``-c`` file exists and holds a YAML mapping (jsonargparse says only "Unexpected config")."""
    import yaml

    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else (
            arg[len("--config="):] if arg.startswith("--config=") else None)
        if path is None:
            continue
        check(Path(path).is_file(), f"--config {path}: no such file")
        try:
            content = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise GaqError(f"--config {path} is not valid YAML ({str(err).splitlines()[0]})") from None
        check(isinstance(content, dict) and content, f"--config {path} is empty or not a mapping of sections: "
              f"start from {example}")


@contextmanager
def one_line_argument_errors(command: str) -> Iterator[None]:
    """Parsing and instantiating inside turn jsonargparse's errors and a config value refused while a class
    is instantiated into :class:`GaqError` (the parser needs ``exit_on_error=False``)."""
    from jsonargparse import ArgumentError

    try:
        yield
    except ArgumentError as err:
        raise GaqError(f"{argument_error_line(err)} ({command} --help lists the options)") from None
    except ValueError as err:
        if "Given value" not in str(err):  # not a config value refused while instantiating: a bug, keep its traceback
            raise
        raise GaqError(argument_error_line(err)) from None
