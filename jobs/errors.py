"""Errors a user can fix; the CLI prints them as one line (no traceback) and exits with status 2."""


class InputError(ValueError):
    """Bad input data, model path or artifact; the message names the file, column or value."""
