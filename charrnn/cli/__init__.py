"""The `charrnn` command line: each command parses options, calls one library function, and prints.

Generated text and JSON results go to stdout alone; progress, tables and logs
go to stderr, so `charrnn sample > out.txt` is clean and sweeps can parse stdout.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

# Each command registers itself on `app`, in the order `--help` lists them.
from charrnn.cli import train, sample, evaluate, viz, novelty, inspect, runs, plot, bench  # noqa: F401, I001
from charrnn.cli.common import app, flags
from charrnn.errors import EXIT_SIGINT, CharrnnError
from charrnn.stdout import ReaderGone, command_stdout


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure ends as one `charrnn: error:` line and a documented exit code."""
    with command_stdout():
        code = _exit_code(argv)
    if code and flags["multi_process"]:
        # JAX's exit would wait at a shutdown barrier for processes that may be gone (minutes,
        # then a native abort): the error line is out, the checkpoint is on disk, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _exit_code(argv: list[str] | None) -> int:
    """Run one command line and return its exit code."""
    try:
        result = app(args=argv, prog_name="charrnn", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        sys.stdout.flush()
    except ReaderGone:  # `charrnn ... | head` after head has all it wanted
        code = 0
    except typer.Abort:
        code = EXIT_SIGINT
    except typer.TyperException as error:  # bad options: Typer's usage errors
        code = _fail(error.format_message(), error.exit_code)
    except CharrnnError as error:
        code = _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        code = EXIT_SIGINT
    except Exception as error:  # a bug, not a user error: still one line unless --debug
        code = _fail(f"internal error: {type(error).__name__}: {error}", 1)
    return code


def _fail(message: str, code: int) -> int:
    if flags["debug"]:
        traceback.print_exc()
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"charrnn: error: {first_line}", file=sys.stderr)
    return code
