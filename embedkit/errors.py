"""The one exception type that carries a user-facing message."""


class EmbedkitError(ValueError):
    """Bad input or a refused operation; the message says what was wrong and what to do.

    The CLI prints it as a single line and exits non-zero, so the message must stand alone.
    """
