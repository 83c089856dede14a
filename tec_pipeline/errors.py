"""The one error type the command line shows as a single line (exit 2) instead of a traceback."""


class UserError(ValueError):
    """Bad input from the user: a file, field or value, named in the message."""


class StorageError(UserError):
    """A file could not be written (full disk, I/O error): the message names the file, what it
    holds and the free space there, so the user can make room and rerun (which resumes)."""


class ConfigError(UserError):
    """A bad configuration file or override; the message is one line naming the key or file."""
