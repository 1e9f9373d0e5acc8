"""The one command-line shell: how every program's ``main()`` runs its command and ends.

API
---
``run_command(command, *, prog, answers=(), interrupted="interrupted") -> int``   runs ``command()`` (which
    returns its exit code) and gives the process's exit code:

    - the command's code, once what it printed reached standard output;
    - a failure the program knows: the first :class:`Answer` whose ``kinds`` it is tells the person (one
      line on standard error) and gives the code;
    - Ctrl-C (``KeyboardInterrupt``): ``interrupted`` on standard error (a line of its own), no traceback,
      exit 130 (``EXIT_INTERRUPTED``, 128 + SIGINT);
    - a reader that stopped reading (``| head``: ``BrokenPipeError`` on standard output): nothing more is
      written, no traceback, exit 141 (``EXIT_BROKEN_PIPE``, 128 + SIGPIPE, what a shell reports for a
      Unix tool that SIGPIPE ended); a broken pipe elsewhere (a socket) is a failure like any other;
    - anything else is a bug: one line ``<prog>: unexpected error: <type>: <message>`` and its traceback
      logged (logger ``prog``; on standard error when logging is not configured), exit 1.

    ``SystemExit`` (argparse's usage errors: exit 2) passes through untouched.
``Answer(kinds, answer)``   ``answer(exc)`` tells the person what went wrong and returns the exit code;
    ``Answer.line(kinds, text, code)`` is the common case: ``text`` (``"error: {}"``, or a function of the
    exception) printed on standard error, ``code`` returned (or ``exc.exit_code`` with ``code=None``).

Standard library only (see the package's docstring).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141

Kinds = type[BaseException] | tuple[type[BaseException], ...]


@dataclass(frozen=True)
class Answer:
    kinds: Kinds
    answer: Callable[[Any], int]

    @classmethod
    def line(cls, kinds: Kinds, text: str | Callable[[Any], str], code: int | None) -> Answer:
        def answer(exc: Any) -> int:
            said = text(exc) if callable(text) else text.format(exc)
            print(said, file=sys.stderr)
            return int(exc.exit_code) if code is None else code

        return cls(kinds, answer)


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
    for answer in answers:
        if isinstance(exc, answer.kinds):
            return answer.answer(exc)
    print(f"{prog}: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
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
