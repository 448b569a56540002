"""Errors raised for bad user input.

Every user-facing check raises :class:`GrapesInputError` with a message that names the
offending input and says how to fix it. The CLI prints the message (no traceback) and exits
with status 2.
"""


class GrapesInputError(ValueError):
    """Bad input from the user (a path, an array, a parameter).

    The message names the input and the fix. Subclasses ``ValueError`` so that callers that
    already catch ``ValueError`` keep working.
    """
