"""The one error type the command line shows as a single line (exit 2) instead of a traceback."""


class UserError(ValueError):
    """Bad input from the user: a file, field or value, named in the message."""
