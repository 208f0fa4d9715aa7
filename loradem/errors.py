"""The one error type loradem raises for bad input.

Every user-facing failure (a malformed recipe, a bad data row, a corrupt
tensor file, an adapter for another base) is a `LorademError` whose message
is one line naming the file / field / row and what was expected. The CLI
prints it as ``loradem: error: <message>`` and exits with status 2; nothing
partial is left on disk.
"""


class LorademError(Exception):
    """Bad input or a refused operation; the message is one self-contained line."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), for one-line errors."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return line or type(exc).__name__
