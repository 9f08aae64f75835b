"""The one exception type for mistakes a user can make (bad folder, bad option, missing weights).

The CLI turns it into a one-line message and a non-zero exit code, never a traceback.
"""

import click


class UserError(click.ClickException):
    """Something the user can fix: the message says what is wrong and what to do."""

    exit_code = 2
