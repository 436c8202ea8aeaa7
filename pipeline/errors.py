"""Errors a user can cause (bad path, bad flag, bad checkpoint, bad image).

The CLI prints them as one sentence and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear sentence."""
