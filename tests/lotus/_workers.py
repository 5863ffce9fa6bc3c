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


def rendezvous(folder: str, me: str, other: str, timeout: float = 120.0) -> None:
    """Mark ``me`` and wait for ``other``'s mark: two calls only both return if they run at once."""
    (Path(folder) / f"{me}.{os.getpid()}").write_text(me)
    t0 = time.monotonic()
    while not list(Path(folder).glob(f"{other}.*")):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{me}: {other} never ran at the same time")
        time.sleep(0.02)
