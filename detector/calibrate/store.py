"""The work directory: finished work units on disk, so that a killed run resumes and shards can merge.

A *unit* is the result of one chunk of one stage (clean chunk ``c``; attack
``a`` on chunk ``c``; a universal perturbation's fit). Its file name carries
a content key of everything that determines it (data, model identity,
detector maps, attack spec, seed), so a unit is reused exactly when it would
be recomputed identically, and never across different settings. Writes are
atomic (temporary file + rename): a run killed mid-write leaves no partial unit.

``job.json`` records the job's settings, the model identity and the shard;
``calibrate merge`` reads it from every shard directory to check that they
ran the same job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

JOB_FILE = "job.json"


class WorkDirError(RuntimeError):
    """Work directories that do not belong together, or a missing ``job.json``."""


class WorkDir:
    """Unit storage under ``root/units``; lookups also search ``also`` (other shards' directories)."""

    def __init__(self, root: str | Path, also: list[Path] | None = None) -> None:
        self.root = Path(root)
        self.units = self.root / "units"
        self.search = [self.units] + [Path(p) / "units" for p in (also or [])]

    @staticmethod
    def unit_name(kind: str, key: str, chunk: int | None = None) -> str:
        return f"{kind}-{key}" + ("" if chunk is None else f"-{chunk:05d}") + ".pt"

    def find(self, name: str) -> Path | None:
        for directory in self.search:
            path = directory / name
            if path.is_file():
                return path
        return None

    def load(self, name: str) -> Any | None:
        path = self.find(name)
        return None if path is None else torch.load(path, weights_only=False)

    def save(self, name: str, value: Any) -> None:
        self.units.mkdir(parents=True, exist_ok=True)
        target = self.units / name
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        torch.save(value, temporary)
        temporary.replace(target)

    def write_job(self, document: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{JOB_FILE}.tmp"
        temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        temporary.replace(self.root / JOB_FILE)

    @staticmethod
    def read_job(root: str | Path) -> dict[str, Any]:
        path = Path(root) / JOB_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise WorkDirError(f"{root}: no {JOB_FILE}; not a calibration work directory") from None
        except json.JSONDecodeError as error:
            raise WorkDirError(f"{path}: unreadable ({error})") from None
