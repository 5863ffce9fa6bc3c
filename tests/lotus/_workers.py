"""Module-level functions for stage worker processes in tests (spawned workers import them by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def touch(folder: str, name: str, delay: float = 0.0) -> None:
    time.sleep(delay)
    (Path(folder) / f"{name}.{os.getpid()}").write_text(name)


def fail(message: str) -> None:
    raise ValueError(message)
