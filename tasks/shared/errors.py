"""Errors a user can fix: reported as one line naming the file, key or row, never as a traceback."""


class UserError(Exception):
    """Bad input, bad parameter or bad data; the message is the whole report."""
