"""The ``advsentry`` command line: one typer app, one module per subcommand.

Subcommand modules live in ``service/commands/`` and import their heavy
dependencies (torch, Triton) inside the command body, so ``advsentry --help``
stays fast.

Exit codes (all subcommands): see ``service/commands/exits.py`` (0 ok, 2
usage, 3 input, 4 calibration, 1 other); every command fails through its
``fail()``.
"""

from __future__ import annotations

import typer

from service.commands import attack as _attack_cmd
from service.commands import calibrate as _calibrate_cmd
from service.commands import explain as _explain_cmd
from service.commands import export_model as _export_model_cmd
from service.commands import probe as _probe_cmd
from service.commands import score as _score_cmd
from service.commands import serve as _serve_cmd
from service.commands.exits import EXIT_CALIBRATION_ERROR, EXIT_INPUT_ERROR, EXIT_USAGE  # noqa: F401 - re-exported

__all__ = ["EXIT_CALIBRATION_ERROR", "EXIT_INPUT_ERROR", "EXIT_USAGE", "app", "main"]

app = typer.Typer(
    name="advsentry",
    help="Adversarial-input detection for image models served by Triton.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Adversarial-input detection for image models served by Triton."""


_score_cmd.register(app)
_attack_cmd.register(app)
_serve_cmd.register(app)
_export_model_cmd.register(app)
_calibrate_cmd.register(app)
_explain_cmd.register(app)
_probe_cmd.register(app)


def main() -> None:  # pragma: no cover - console entry point convenience
    app()
