"""Errors meant for a person: `main.py` prints their message without a traceback and exits 1."""


class UserError(Exception):
    """Something the user can fix; the message says what was wrong and what to do."""


class DataError(UserError):
    """The data on disk (or its download) is missing, corrupt or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or belongs to another model."""
