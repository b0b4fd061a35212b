"""User errors as one line on stderr, for every `kedit` subcommand and `train.py`; tracebacks only for bugs.

Bad input (missing or unreadable files, wrong layouts, bad argument values, unwritable folders,
refused edits) raises one of `USER_ERRORS`; the entry points print it as `PROG: Type: message` and
exit 2. With `kedit --debug` (or `KEDIT_DEBUG=1` for train.py) the exception propagates instead.
Light on imports: `kedit synth` loads this without torch or Lightning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
from collections.abc import Callable, Iterator

# FloatingPointError: a refused non-finite edit (editor.NonFiniteEdit). RecursionError: a data file nested
# too deeply for the JSON reader. EOFError / UnpicklingError: a file that is not what its flag says.
USER_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
    RecursionError,
    FloatingPointError,
    argparse.ArgumentError,
)

DEBUG_VARIABLE = "KEDIT_DEBUG"


def one_line(err: BaseException) -> str:
    """`Type: message` on one line (a multi-line message joined with '; ')."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, RecursionError):
        text = f"nested too deeply to read ({text})"
    return f"{type(err).__name__}: {text}"


def call_reporting_errors(prog: str, call: Callable[[], int | None], debug: bool = False) -> int:
    """`call()`'s exit code; a user error printed as one line (`prog: Type: message`) and exit code 2."""
    if debug:
        return call() or 0
    try:
        return call() or 0
    except USER_ERRORS as err:
        print(f"{prog}: {one_line(err)}", file=sys.stderr)
        return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors (unknown flag, bad value, missing argument) on one line, not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@contextlib.contextmanager
def jsonargparse_errors_raised() -> Iterator[None]:
    """jsonargparse (LightningCLI's parser) raises its errors instead of printing usage and exiting,
    so `call_reporting_errors` prints them as one line like any other (a missing or malformed config
    file, an unknown class path, a bad value)."""
    import jsonargparse

    def raise_error(parser, message: str, ex: Exception | None = None):
        raise jsonargparse.ArgumentError(None, message) from ex

    original = jsonargparse.ArgumentParser.error
    jsonargparse.ArgumentParser.error = raise_error
    try:
        yield
    finally:
        jsonargparse.ArgumentParser.error = original


def run_training_entry(main: Callable[[], object]) -> int:
    """train.py's exit code: `main()` with user errors as one line (tracebacks with KEDIT_DEBUG=1)."""
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")

    def call() -> int:
        with jsonargparse_errors_raised():
            main()
        return 0

    return call_reporting_errors("train.py", call, debug)
