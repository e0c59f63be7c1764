"""The one exception type that carries a user-facing message."""


class EmbedkitError(ValueError):
    """Bad input or a refused operation; the message says what was wrong and what to do.

    The CLI prints it as a single line and exits non-zero, so the message must stand alone.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how a
    library's error is shown inside one of ours."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


class EmbedkitNotice(UserWarning):
    """Something a user should know that is not an error (the CLI prints it as one "note:" line);
    filter it with the warnings module like any warning."""
