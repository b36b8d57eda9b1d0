"""The one error type for bad user input (files, flags, values).

The CLI prints an ``InputError`` as a single line ``error: <message>`` and exits with status 2;
library callers catch it like any ``ValueError``. Messages say what was wrong and what was expected.
"""


class InputError(ValueError):
    """Bad input from a user: a file, flag or value that does not meet its contract."""
