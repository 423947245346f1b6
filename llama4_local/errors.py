"""The one exception type for mistakes a user can make (bad path, bad checkpoint, bad option).

The CLI prints its message on one line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """An input the user can fix. The message says what is wrong and what to do."""
