"""Exec the ``tritonserver`` binary shipped by nvidia-pytriton: ``python -m service.triton.launch [tritonserver args]``.

Why: in Kubernetes the Triton container runs the advsentry image (the Python
backend's ``model.py`` must import torch and advsentry's ``detector``, which
the image has, with the Python version the stub was built for). The binary
needs the two environment fixes :mod:`service.triton.server` documents
(``LD_LIBRARY_PATH``/``PATH`` for the Python-backend stub, a backend directory
holding the stub for this interpreter). This module applies them and then
*replaces itself* with ``tritonserver`` (``os.execve``), so Triton is the
container's main process and receives SIGTERM directly for a graceful drain.

Every argument is passed to ``tritonserver`` unchanged; ``--backend-directory``
and ``--cache-directory`` are added unless given. ``--print-command`` prints
the final command line instead of running it (used by the tests).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from .server import prepare_backend_directory, pytriton_dist_dir, triton_environment


def build_command(args: list[str], backend_root: Path) -> list[str]:
    """The tritonserver command line for ``args`` (backend and cache directories filled in)."""
    dist = pytriton_dist_dir()
    command = [str(dist / "bin" / "tritonserver"), *args]
    if not any(a.startswith("--backend-directory") for a in args):
        command.append(f"--backend-directory={prepare_backend_directory(backend_root)}")
    if not any(a.startswith("--cache-directory") for a in args):
        command.append(f"--cache-directory={dist / 'caches'}")
    return command


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--print-command" in args
    args = [a for a in args if a != "--print-command"]
    backend_root = Path(os.environ.get("ADVSENTRY_TRITON_BACKENDS") or tempfile.mkdtemp(prefix="advsentry-backends-"))
    command = build_command(args, backend_root)
    if dry_run:
        print(" ".join(command))
        return 0
    os.execve(command[0], command, triton_environment())
    return 1  # pragma: no cover - execve does not return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
