"""The versions lotus-kernels supports, in one place: the package metadata (pyproject.toml), the
build (setup.py, which reads this file without importing the package) and the import-time check all
use these ranges. Each end of every range is tested in CI (`.ci/run`: `make test` on the newest,
`make test-oldest` on the oldest).

No torch or triton import here: setup.py executes this file before torch is known to be usable.
"""

from __future__ import annotations

import os
import re

__version__ = "0.1.0"

# Inclusive (major, minor) ranges that CI tests. A C++ extension is tied to the torch it was built
# against, so torch's range is also the range of torch headers the extension compiles against.
TORCH = ((2, 11), (2, 14))
TRITON = ((3, 6), (3, 8))
PYTHON = ((3, 10), (3, 12))

# Set to 1 to build or import with a torch / triton outside the ranges (untested: expect breakage).
ENV_ALLOW = "LOTUS_KERNELS_ALLOW_UNSUPPORTED"


def major_minor(version: str) -> tuple[int, int]:
    """(2, 11) for '2.11.0+cu130', '2.11.0a0+git123', '3.6.0'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"cannot read a version from {version!r}")
    return int(m.group(1)), int(m.group(2))


def describe(bounds: tuple[tuple[int, int], tuple[int, int]]) -> str:
    lo, hi = bounds
    return f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"


def problem(name: str, version: str, bounds) -> str | None:
    """None if ``version`` of ``name`` lies in ``bounds``, else the one line that says it does not."""
    lo, hi = bounds
    if lo <= major_minor(version) <= hi:
        return None
    return (
        f"lotus-kernels supports {name} {describe(bounds)} (tested in CI), found {name} {version}; "
        f"install a supported {name}, or set {ENV_ALLOW}=1 to try anyway"
    )


def allowed_anyway() -> bool:
    return os.environ.get(ENV_ALLOW) == "1"
