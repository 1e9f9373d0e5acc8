"""The one command-line shell: how every program's ``main()`` runs its command and ends, and the conventions
every command follows (the README's "Command-line conventions" says them for people).

API
---
``run_command(command, *, prog, answers=(), interrupted="interrupted") -> int``   runs ``command()`` (which
    returns its exit code) and gives the process's exit code:

    - the command's code, once what it printed reached standard output;
    - a failure the program knows: the first :class:`Answer` whose ``kinds`` it is tells the person (one
      line on standard error, ``error_line``) and gives the code; :class:`CommandFailed` is always known;
    - Ctrl-C (``KeyboardInterrupt``): ``interrupted`` on standard error (a line of its own), no traceback,
      exit 130 (``EXIT_INTERRUPTED``, 128 + SIGINT);
    - a reader that stopped reading (``| head``: ``BrokenPipeError`` on standard output): nothing more is
      written, no traceback, exit 141 (``EXIT_BROKEN_PIPE``, 128 + SIGPIPE, what a shell reports for a
      Unix tool that SIGPIPE ended); a broken pipe elsewhere (a socket) is a failure like any other;
    - anything else is a bug: one line ``<prog>: error: unexpected <type>: <message> [BUG]`` and its
      traceback logged (logger ``prog``; on standard error when logging is not configured), exit 1.

    ``SystemExit`` (argparse's usage errors: exit 2) passes through untouched.
``error_line(prog, message, reason=None) -> str``   the one error format: ``<prog>: error: <message>
    [<REASON>]`` (the bracket when the failure has a reason code: a service's ``ErrorInfo.reason``, a
    setting's, a device id's ...).  argparse's own usage errors have the same ``<prog>: error:`` prefix.
``CommandFailed(message, reason=None, *, exit_code=1, hints=())``   a command's own failure: the shell
    prints its ``error_line`` and each hint (the next command to run) on a line of its own, indented.
``Answer(kinds, answer)``   ``answer(exc, prog)`` tells the person what went wrong and returns the exit code;
    ``Answer.line(kinds, text, code)`` is the common case: ``error_line(prog, text, exc.reason)`` (``text``:
    ``"{}"``-style, or a function of the exception) on standard error, ``code`` returned (or
    ``exc.exit_code`` with ``code=None``).
``CommandParser``   ``argparse.ArgumentParser`` as every command builds it: options never abbreviated, and
    ``HelpFormatter``: an option's help ends with ``(default: X)`` when it has a default and its help does
    not already say it.  Subcommands made with ``add_subparsers`` are CommandParsers too.
``print_json(value, *, indent=2)``   ``--json`` output: every key of ours is snake_case (a key that is not
    is a bug: ``ValueError``), an empty string is written as null (absent is null); a ``Verbatim`` dict
    inside (data from outside, e.g. a device twin's properties) is written as it is.
``quiet_native_logs()``   native libraries keep their log lines off a person's terminal (gRPC's C core:
    ``GRPC_VERBOSITY=ERROR`` unless set); call it before anything imports them (a program's package
    ``__init__``): the C core reads it once, when it is loaded.

Standard library only (see the package's docstring).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141

Kinds = type[BaseException] | tuple[type[BaseException], ...]


def error_line(prog: str, message: str, reason: str | None = None) -> str:
    return f"{prog}: error: {message}" + (f" [{reason}]" if reason else "")


def reason_of(exc: BaseException) -> str | None:
    """A failure's reason code, when it carries one (``exc.reason``, a non-empty string)."""
    reason = getattr(exc, "reason", None)
    return str(reason) if isinstance(reason, str) and reason else None


class CommandFailed(Exception):
    """A command's own failure, told as ``error_line`` plus its hints; the process exits ``exit_code``."""

    def __init__(
        self,
        message: str,
        reason: str | None = None,
        *,
        exit_code: int = EXIT_FAILURE,
        hints: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.exit_code = exit_code
        self.hints = tuple(hints)


@dataclass(frozen=True)
class Answer:
    kinds: Kinds
    answer: Callable[[Any, str], int]

    @classmethod
    def line(cls, kinds: Kinds, text: str | Callable[[Any], str], code: int | None) -> Answer:
        def answer(exc: Any, prog: str) -> int:
            said = text(exc) if callable(text) else text.format(exc)
            print(error_line(prog, said, reason_of(exc)), file=sys.stderr)
            return int(exc.exit_code) if code is None else code

        return cls(kinds, answer)


def _failed(exc: CommandFailed, prog: str) -> int:
    print(error_line(prog, exc.message, exc.reason), file=sys.stderr)
    for hint in exc.hints:
        print(f"  {hint}", file=sys.stderr)
    return exc.exit_code


def run_command(
    command: Callable[[], int | None],
    *,
    prog: str,
    answers: Sequence[Answer] = (),
    interrupted: str | None = "interrupted",
) -> int:
    try:
        code = command()
        sys.stdout.flush()  # a reader that closed early shows up here, not in the interpreter's last flush
        return int(code or 0)
    except KeyboardInterrupt:
        if interrupted:
            print(f"\n{interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        if _stdout_reader_gone():
            _discard_stdout()
            return EXIT_BROKEN_PIPE
        return _answer(exc, prog, answers)
    except Exception as exc:
        return _answer(exc, prog, answers)


def _answer(exc: Exception, prog: str, answers: Sequence[Answer]) -> int:
    if isinstance(exc, CommandFailed):
        return _failed(exc, prog)
    for answer in answers:
        if isinstance(exc, answer.kinds):
            return answer.answer(exc, prog)
    print(error_line(prog, f"unexpected {type(exc).__name__}: {exc}", "BUG"), file=sys.stderr)
    logging.getLogger(prog).error("unexpected error", exc_info=exc)
    return EXIT_FAILURE


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe nobody reads any more (POLLERR on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or a stdout without a descriptor
        return False


def _discard_stdout() -> None:
    """What is still buffered, and the interpreter's flush at exit, go nowhere instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


# -- parsers ----------------------------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """An option's help ends with ``(default: X)`` when it has a default its help does not mention."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or isinstance(default, bool)
            or default == argparse.SUPPRESS
            or default in ("", [], ())
            or "default" in text
        ):
            return action.help
        return f"{text} (default: %(default)s)"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` for a command whose description is laid out by hand (a table of columns)."""


class CommandParser(argparse.ArgumentParser):
    """The argument parser of every command (and, through ``add_subparsers``, of its subcommands)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# -- --json ------------------------------------------------------------------------------------------
_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


class Verbatim(dict[str, Any]):
    """Data from outside inside a ``--json`` answer (a twin's properties): written as it is, unchecked."""


def json_ready(value: Any, where: str = "$") -> Any:
    """``value`` as ``print_json`` writes it: keys checked (``ValueError`` naming the first that is not
    snake_case), empty strings as None."""
    if isinstance(value, Verbatim):
        return dict(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not _SNAKE.match(key):
                raise ValueError(f"--json key {key!r} at {where} is not snake_case")
            out[key] = json_ready(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [json_ready(item, f"{where}[{i}]") for i, item in enumerate(value)]
    return None if value == "" else value


def print_json(value: Any, *, indent: int | None = 2) -> None:
    print(json.dumps(json_ready(value), indent=indent))


def quiet_native_logs() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
