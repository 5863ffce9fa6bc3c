"""The run directory: atomic writes, stage completion markers, per-stage seeds.

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a SIGKILL leaves either the old file or the new one, never half of one. A stage
counts as done only when its marker ``stages/<name>.json`` exists; it is written last, after all of
the stage's outputs, so a killed stage is simply redone from scratch on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import LotusError


def stage_seed(seed: int, stage: str) -> int:
    """A 63-bit seed from (global seed, stage name): stages do not share random streams, so redoing
    one stage alone gives the same result as running the whole pipeline."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunDir:
    """Files of one run, addressed by names relative to ``root``."""

    def __init__(self, root):
        self.root = Path(root)

    # ------------------------------------------------------------ creation
    @classmethod
    def create(cls, root, config: dict) -> RunDir:
        """A new run: ``root`` must not exist or be an empty directory (never overwrite a run)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise LotusError(f"--out: {root} exists and is not a directory")
        if root.is_dir() and any(root.iterdir()):
            raise LotusError(
                f"--out: {root} already exists and is not empty; pass --resume {root} "
                "to continue that run, or choose a new directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        run = cls(root)
        run.write_json("config.json", config)
        return run

    @classmethod
    def open(cls, root) -> RunDir:
        root = Path(root)
        if not (root / "config.json").is_file():
            raise LotusError(
                f"run directory: {root} has no config.json (not a lotus run; "
                "start one with `lotus run --data ... --out DIR`)"
            )
        return cls(root)

    def remove_stale_temporaries(self) -> None:
        """Temporary files a killed writer left behind (never a finished output)."""
        for p in self.root.rglob(".*.tmp"):
            p.unlink(missing_ok=True)

    def config(self) -> dict:
        return self.read_json("config.json")

    # ------------------------------------------------------------ files
    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def write_bytes(self, name: str, data: bytes) -> None:
        _write_bytes(self.path(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str):
        try:
            return json.loads(self.path(name).read_text())
        except FileNotFoundError:
            raise LotusError(f"run directory: {self.path(name)} is missing (run the stage that writes it first)")
        except json.JSONDecodeError as e:
            raise LotusError(f"run directory: {self.path(name)} is not valid JSON ({e})")

    def save_torch(self, name: str, obj) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(name, buf.getvalue())

    def load_torch(self, name: str):
        p = self.path(name)
        if not p.is_file():
            raise LotusError(f"run directory: {p} is missing (run the stage that writes it first)")
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated / foreign file: say which one
            raise LotusError(f"run directory: cannot load {p}: {type(e).__name__}: {e}".splitlines()[0])

    def save_npz(self, name: str, **arrays) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.write_bytes(name, buf.getvalue())

    def save_figure(self, name: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        self.write_bytes(name, buf.getvalue())

    # ------------------------------------------------------------ stages
    def _marker(self, stage: str) -> str:
        return f"stages/{stage.replace('/', '__')}.json"

    def done(self, stage: str) -> bool:
        return self.exists(self._marker(stage))

    def result(self, stage: str) -> dict:
        if not self.done(stage):
            raise LotusError(
                f"run directory: stage {stage!r} has not finished in {self.root} "
                f"(run `lotus run --resume {self.root}` or that stage's command)"
            )
        return self.read_json(self._marker(stage))

    def mark_done(self, stage: str, result: dict) -> None:
        self.write_json(self._marker(stage), result)

    def clear(self, stage: str) -> None:
        p = self.path(self._marker(stage))
        if p.exists():
            p.unlink()
