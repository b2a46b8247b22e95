"""The one exception type for a user's mistake (bad path, bad value, damaged file).

The CLI prints ``ddpm: error: <message>`` for it and exits with code 2, without a traceback.
Library functions raise it (or ValueError for bad arguments, which the CLI treats the same way)
with a one-line message that names the offending value and what was expected.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
