"""One-line errors for the LightningCLI / jsonargparse commands: a bad option or config value is reported
as the one line that says what is wrong, not as the parser's usage, tracebacks and nested errors."""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from gaq.errors import GaqError, check

_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list": "a list", "dict": "a mapping", "NoneType": "null"}


def _expected_words(lines: list[str]) -> tuple[list[str], str | None]:
    """What a jsonargparse type error expected (``Expected a typing.Literal['a', 'b']`` / ``<class 'int'>``
    lines, a union's included) in words, and the value it got."""
    wanted, given = [], None
    for ln in lines:
        m = re.match(r"^(?:- )?Expected a (.+?)(?:\. Got value: (.*))?$", ln)
        if m:
            kind, got = m.group(1), m.group(2)
            given = got if got is not None else given
            literal = re.match(r"^typing\.Literal\[(.*)\]$", kind)
            cls = re.match(r"^<class '(?:\w+\.)*(\w+)'>$", kind)
            if literal:
                words = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
                wanted += [w for w in words if w not in wanted]
            else:
                word = _TYPE_WORDS.get(cls.group(1), cls.group(1)) if cls else kind
                wanted += [word] if word not in wanted else []
        elif ln.startswith("Given value:"):
            given = ln[len("Given value:"):].strip()
    return wanted, given


def argument_error_line(err: Exception) -> str:
    """The one line of a jsonargparse error that says what is wrong (the first check message of a failed
    instantiation; for a value of the wrong type, the key, what it takes and what it got; else the error's
    first line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reasons = [ln[2:] for ln in lines if ln.startswith("- ") and not ln.startswith(("- Expected a", "- Not a valid"))]
    if reasons:
        return reasons[0]
    key = re.match(r'^Parser key "([^"]+)":$', lines[0]) if lines else None
    if key:  # 'Parser key "method":' and, below it, what was expected: say it in the same line
        wanted, given = _expected_words(lines[1:])
        if wanted:
            return f"{key.group(1)} must be {', '.join(wanted[:-1]) + ' or ' if len(wanted) > 1 else ''}" \
                   f"{wanted[-1]}{f', got {given!r}' if given is not None else ''}"
    return (lines or [type(err).__name__])[0]


def trainer_error_line(err: BaseException) -> str | None:
    """The first line of Lightning's refusal of the Trainer's placement (accelerator, devices, strategy, ...)
    when ``err`` is one (a ``MisconfigurationException``, or a ``ValueError`` raised by Lightning's accelerator
    connector); None for anything else, which stays a bug with its traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if not isinstance(err, (MisconfigurationException, ValueError)):
        return None
    if not isinstance(err, MisconfigurationException):
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or "connector" not in Path(tb.tb_frame.f_code.co_filename).name:
            return None
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_trainer_placement(trainer: Mapping[str, Any]) -> None:
    """A Trainer of the placement arguments of ``trainer`` can be built here (accelerator, devices, strategy,
    num_nodes), else one :class:`GaqError` line; called before any work."""
    import lightning.pytorch as pl

    placement = {k: trainer[k] for k in ("accelerator", "devices", "strategy", "num_nodes") if k in trainer}
    try:
        pl.Trainer(**placement, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False)
    except Exception as err:  # noqa: BLE001 - only Lightning's refusals become one line
        line = trainer_error_line(err)
        if line is None:
            raise
        raise GaqError(f"trainer: {line}; change trainer.accelerator / trainer.devices / trainer.strategy") from None


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
