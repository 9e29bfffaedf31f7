"""The user's mistakes, as opposed to bugs.

A `UserError` is bad input the user can fix — a config key, a data file, a missing checkpoint
folder — and its message names the file or key, the bad value and the fix. Command-line entry
points print it as one line and exit with status 2; anything else is a bug and keeps its
traceback. It subclasses ValueError so library callers can catch it as one.
"""


class UserError(ValueError):
    """Bad input the user can fix; the message says where, what, and how."""
