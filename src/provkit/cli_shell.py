"""The suite's command-line shell and conventions: ``mainkit.shell`` with the answers every suite command
gives, and the one spelling of the options the commands share.

Conventions (the README's "Command-line conventions"; ``tests/provkit_tests/test_cli_conventions.py``
walks the parser of every console script and holds it to them):

- one error format, ``<prog>: error: <what went wrong> [<REASON>]`` (``mainkit.shell.error_line``), then,
  indented, what to do next (``mainkit.shell.CommandFailed``'s hints);
- exit codes: 0 done, 1 refused (or nothing found), 2 bad usage, configuration or input, 3 a service
  unreachable, 130 interrupted (Ctrl-C), 141 the reader of standard output went away (``| head``);
  device-client adds its own, documented in its help;
- ``--json`` output through ``mainkit.shell.print_json``: snake_case keys, null for absent;
- every argument has help; a numeric option names its unit in its metavar (``--timeout SECONDS``); an
  option's default shows in its help (``mainkit.shell.CommandParser``);
- one name per concept (``add_device_id``, ``add_key_type``, ``add_timeout``, ``add_json``,
  ``provkit.channels.add_channel_arguments``); ``RETIRED_NAMES`` are the spellings no command uses.

API
---
``run_cli(command, *, prog, answers=(), interrupted="interrupted") -> int``   ``command()`` run in the shell
    (Ctrl-C: exit 130 without a traceback; ``| head``: a quiet end; a bug: one line, a logged traceback,
    exit 1); a failure is answered by the program's own ``answers`` first, then by ``SUITE_ANSWERS``:

    | failure                                      | says (standard error)                      | exit      |
    |----------------------------------------------|--------------------------------------------|-----------|
    | a command's own (``CommandFailed``)          | ``<prog>: error: <message> [<REASON>]``    | its own   |
    | bad configuration (``CONFIGURATION_ERRORS``) | ``<prog>: error: <what is wrong> [<REASON>]`` | 2      |
    | a bad argument (``InvalidArgument``)         | ``<prog>: error: <what is wrong> [<REASON>]`` | 2      |
    | a file unreadable/unwritable (``OSError``)   | ``<prog>: error: <file>: <why>``           | 2         |
    | a refused call (``grpc.RpcError``)           | ``<prog>: error: <message> [<REASON>]``    | 1, 3 down |

``CONFIGURATION_ERRORS``   what means "bad configuration": the root ``ConfigurationError`` (settings, server
    settings, a command's input) and a database at another schema version.
``EXIT_REFUSED`` (1), ``EXIT_USAGE`` (2), ``EXIT_UNREACHABLE`` (3), ``EXIT_INTERRUPTED`` (130).
``add_device_id(parser, help=..., optional=False)``, ``add_key_type(parser)`` (``KEY_TYPE_NAMES``),
``add_timeout(parser, default=60.0)``, ``add_json(parser, help)``, ``add_request_id(parser)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import grpc

from litestore import SchemaError
from mainkit.shell import EXIT_INTERRUPTED, EXIT_USAGE, Answer, CommandFailed, run_command
from provkit.channels import EXIT_REFUSED, EXIT_UNREACHABLE, describe_os_error, report_failed_call
from provkit.errors import ConfigurationError, InvalidArgument

__all__ = [
    "CONFIGURATION_ERRORS",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "KEY_TYPE_NAMES",
    "RETIRED_NAMES",
    "SUITE_ANSWERS",
    "Answer",
    "CommandFailed",
    "add_device_id",
    "add_json",
    "add_key_type",
    "add_request_id",
    "add_timeout",
    "run_cli",
]

CONFIGURATION_ERRORS: tuple[type[Exception], ...] = (ConfigurationError, SchemaError)

SUITE_ANSWERS: tuple[Answer, ...] = (
    Answer.line(CONFIGURATION_ERRORS, "{}", EXIT_USAGE),
    Answer.line(InvalidArgument, lambda exc: exc.message, EXIT_USAGE),
    Answer.line(OSError, describe_os_error, EXIT_USAGE),
    Answer(grpc.RpcError, report_failed_call),
)

# The one spelling of a key type, wherever a command takes one (factory-svc mint and lot, device-client).
KEY_TYPE_NAMES = ("p256", "p384", "rsa2048", "rsa3072")

# Spellings of a shared concept that no command uses, with the one every command uses instead.
RETIRED_NAMES = {
    "guid": "device_id",
    "--factory": "--target",
    "--factory-tls": "--insecure / --ca-file / --cert-file",
    "--factory-ca": "--ca-file",
    "--factory-client-cert": "--cert-file",
    "--factory-client-key": "--key-file",
    "--trusted-ca": "--trusted-ca-file",
}


def add_device_id(parser: argparse.ArgumentParser, *, help: str = "", optional: bool = False) -> None:
    """The positional device id (``device_id``: the hardware GUID on the label, see provkit.device_id)."""
    text = help or "the device's id: the hardware GUID on its label"
    if optional:
        parser.add_argument("device_id", nargs="?", default="", help=text)
    else:
        parser.add_argument("device_id", help=text)


def add_key_type(parser: argparse.ArgumentParser, *, default: str = "p256", help: str = "") -> None:
    parser.add_argument(
        "--key-type",
        choices=KEY_TYPE_NAMES,
        default=default,
        help=help or "key algorithm: ECDSA P-256 / P-384, RSA 2048 / 3072 bits",
    )


def add_timeout(parser: argparse.ArgumentParser, *, default: float = 60.0) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help="deadline of each call to the service",
    )


def add_json(parser: argparse.ArgumentParser, help: str = "print the answer as JSON") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_request_id(parser: argparse.ArgumentParser, help: str = "") -> None:
    parser.add_argument(
        "--request-id",
        metavar="ID",
        help=help or "idempotency key: a retry with it does nothing twice (default: new)",
    )


def run_cli(
    command: Callable[[], int | None],
    *,
    prog: str,
    answers: Sequence[Answer] = (),
    interrupted: str | None = "interrupted",
) -> int:
    return run_command(command, prog=prog, answers=(*answers, *SUITE_ANSWERS), interrupted=interrupted)
