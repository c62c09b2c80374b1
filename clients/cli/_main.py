"""The ``breakerd`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that builds its
parser and sets ``handler``, a function from the parsed arguments to an exit
code; adding a command is adding one such function to ``_COMMANDS``.

Failures are reported as one line on stderr and a non-zero exit code, never
a traceback: the CLI is for operators, who need the message, not the stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from breakerd.protocol import BreakerError

from ._daemon_commands import add_admin_commands, add_events, add_serve, add_status

__all__ = ["main"]

PROG = "breakerd"

#: Exit codes, in the BSD sysexits spirit: usage errors are not runtime errors.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


class UsageError(BreakerError):
    """Bad command-line arguments (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block and exits from deep inside
    # parse_args; raising lets main() print one line and return a code instead.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


# -- subcommands ------------------------------------------------------------------


def _add_demo(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="replay the original breaker example against a local stand-in OpenAI server",
        description=(
            "Run ten gpt-4 chat completions through the real openai SDK against a "
            "scripted server on 127.0.0.1 (no network, no API key): two answers, three "
            "timeouts that open the breaker, two fallbacks that never reach the server, "
            "then a half-open trial that closes it again."
        ),
    )
    parser.add_argument(
        "--open-timeout",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="how long the breaker stays open before its trial call (default: 1.0)",
    )
    parser.add_argument(
        "--client-timeout",
        type=_positive_float,
        default=0.3,
        metavar="SECONDS",
        help="the openai client's request timeout; stalled requests hit it (default: 0.3)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show breakerd's own structlog events, on stderr",
    )
    parser.add_argument(
        "--daemon",
        action="store_true",
        help="run the calls in several worker processes that share the breaker through a "
        "breakerd daemon (a private one, started and stopped by the demo)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --daemon: use the daemon serving this socket (under a breaker name of "
        "the demo's own), or start one there",
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.daemon:
        from ._demo_daemon import main_demo_daemon

        return main_demo_daemon(
            sys.stdout,
            socket=args.socket,
            open_timeout=args.open_timeout,
            client_timeout=args.client_timeout,
            verbose=args.verbose,
        )
    if args.socket is not None:
        raise UsageError(f"{PROG} demo: --socket only applies with --daemon")
    # Imported here so that other subcommands do not pay for the openai SDK.
    from ._demo import main_demo

    return main_demo(
        sys.stdout,
        open_timeout=args.open_timeout,
        client_timeout=args.client_timeout,
        verbose=args.verbose,
    )


_COMMANDS: tuple[Callable[[argparse._SubParsersAction[_Parser]], None], ...] = (
    _add_demo,
    add_serve,
    add_status,
    add_events,
    add_admin_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="breakerd: a circuit breaker for Python services, built as an actor system.",
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def _fail(stream: TextIO, message: str) -> None:
    print(message, file=stream)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a real file (tests capture it): nothing will flush


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``breakerd`` command line; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _fail(sys.stderr, str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help and the like
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:  # before BreakerError, its base: exit 2, not 1
        _fail(sys.stderr, str(exc))
        return EXIT_USAGE
    except BreakerError as exc:
        # The daemon's own errors (unknown breaker, no daemon, ...) are for operators.
        _fail(sys.stderr, f"{PROG}: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _fail(sys.stderr, f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``breakerd demo | head``): not an error worth a
        # message, but Python would complain again when it flushes stdout at exit.
        _silence_stdout()
        return EXIT_FAILURE
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _fail(sys.stderr, f"{PROG}: error: {detail}")
        return EXIT_FAILURE
