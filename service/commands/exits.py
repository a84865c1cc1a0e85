"""Exit codes of every ``advsentry`` subcommand, and the one way a command fails.

Why a module of its own: the codes used to live in ``service/cli.py``, which
imports every command module, while the commands imported the codes back from
it (a circle, resolved only because the imports sat inside function bodies).
Commands now import from here; ``service/cli.py`` re-exports the codes.

  0  success
  2  usage error (unknown option, bad value, invalid settings)
  3  input error (missing or unreadable image, unsupported image mode, unusable model)
  4  calibration error (artifact malformed, tampered with, or for another model/config)
  1  any other failure
"""

from __future__ import annotations

from typing import NoReturn

import typer

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INPUT_ERROR = 3
EXIT_CALIBRATION_ERROR = 4


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
