"""The suite's command-line shell: ``mainkit.shell.run_command`` with the answers every suite command gives.

API
---
``run_cli(command, *, prog, answers=(), interrupted="interrupted") -> int``   ``command()`` run in the shell
    (Ctrl-C: exit 130 without a traceback; ``| head``: a quiet end; a bug: one line, a logged traceback,
    exit 1); a failure is answered by the program's own ``answers`` first, then by ``SUITE_ANSWERS``:

    | failure                                      | says (standard error)                  | exit        |
    |----------------------------------------------|----------------------------------------|-------------|
    | bad configuration (``CONFIGURATION_ERRORS``) | ``error: <what is wrong>``             | 2           |
    | a bad argument (``InvalidArgument``)         | ``error: <what is wrong>``             | 2           |
    | a file unreadable/unwritable (``OSError``)   | ``error: <file>: <why>``               | 2           |
    | a refused call (``grpc.RpcError``)           | ``error: <message> [<STATUS> <REASON>]`` | 1, 3 down |

``CONFIGURATION_ERRORS``   what means "bad configuration": the root ``ConfigurationError`` (settings, server
    settings, a command's input) and a database at another schema version.
``EXIT_REFUSED`` (1), ``EXIT_USAGE`` (2), ``EXIT_UNREACHABLE`` (3), ``EXIT_INTERRUPTED`` (130).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from litestore import SchemaError
from mainkit.shell import EXIT_INTERRUPTED, EXIT_USAGE, Answer, run_command
from provkit.channels import EXIT_REFUSED, EXIT_UNREACHABLE, describe_os_error, report_failed_call
from provkit.errors import ConfigurationError, InvalidArgument

__all__ = [
    "CONFIGURATION_ERRORS",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "SUITE_ANSWERS",
    "Answer",
    "run_cli",
]

CONFIGURATION_ERRORS: tuple[type[Exception], ...] = (ConfigurationError, SchemaError)

SUITE_ANSWERS: tuple[Answer, ...] = (
    Answer.line(CONFIGURATION_ERRORS, "error: {}", EXIT_USAGE),
    Answer.line(InvalidArgument, lambda exc: f"error: {exc.message}", EXIT_USAGE),
    Answer.line(OSError, lambda exc: f"error: {describe_os_error(exc)}", EXIT_USAGE),
    Answer(grpc.RpcError, report_failed_call),
)


def run_cli(
    command: Callable[[], int | None],
    *,
    prog: str,
    answers: Sequence[Answer] = (),
    interrupted: str | None = "interrupted",
) -> int:
    return run_command(command, prog=prog, answers=(*answers, *SUITE_ANSWERS), interrupted=interrupted)
