"""Errors a user causes and can fix. The CLIs print them as one line, without a traceback."""


class UserError(Exception):
    """Something about the command line, the data or a file that the user can correct."""
