"""How every ``clipforge-*`` tool ends: a mistake in its input is one line ``prog: message`` on stderr and exit
status 1, as argparse reports a bad option; a bug keeps its traceback (no paper). Light on purpose: no
torch, Lightning or Hydra here, so a tool's ``--help`` stays instant."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec

P = ParamSpec("P")

PACKAGE_DIR = Path(__file__).resolve().parent


def raised_by_clipforge(error: BaseException) -> bool:
    """Whether ``error`` was raised in clipforge's own code (the innermost frame of its traceback is in
    this package): the errors it raises about its input, rather than one from deep inside a library."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def is_user_error(error: BaseException) -> bool:
    """What a tool raises, deliberately, about its input: an ``OSError`` for a path that is missing or cannot
    be read or written (wherever raised: the message names the path); a ``ValueError`` for a value it cannot
    take (a setting, a file's content; the checkpoint errors are ``ValueError``s too) or a ``SettingError``
    for a setting of the wrong type, when raised in clipforge's own code (the same types raised deep inside
    torch or Lightning mid-run are failures). Every other exception (``KeyError``, ``RuntimeError``, ...) is
    a bug."""
    if isinstance(error, OSError):
        return True
    from clipforge.models.specs import SettingError  # only once something has failed: it imports torch

    return isinstance(error, ValueError | SettingError) and raised_by_clipforge(error)


def user_error(error: BaseException) -> BaseException | None:
    """The mistake in the input that ``error`` is (:func:`is_user_error`) or that Hydra's ``instantiate``
    wrapped in its ``InstantiationException`` (a config node's constructor refused a setting), else None."""
    if is_user_error(error):
        return error
    if type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        return user_error(error.__cause__)
    return None


def console_script(prog: str, main: Callable[P, Any]) -> Callable[P, int]:
    """The console script of the tool ``prog`` that runs ``main``; it returns the exit status.

    A mistake in the tool's input (:func:`user_error`) is one line ``prog: message`` on stderr and status
    1: no traceback. Otherwise ``main``'s own int is the status, and any other return value (the paths a tool
    wrote) is 0: a console script hands its function's return value to ``sys.exit``, which would print a dict
    and exit 1."""

    @functools.wraps(main)
    def script(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            out = main(*args, **kwargs)
        except Exception as e:
            mistake = user_error(e)
            if mistake is None:
                raise
            message = " ".join(line.strip() for line in str(mistake).splitlines() if line.strip())
            print(f"{prog}: {message or type(mistake).__name__}", file=sys.stderr)
            return 1
        return out if isinstance(out, int) else 0

    return script
