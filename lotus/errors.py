"""The one exception type the CLI turns into a one-line message and exit code 2."""


class LotusError(Exception):
    """Bad input or an unusable run directory: a clear message, no traceback."""
