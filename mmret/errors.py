"""The one error family that reaches the user.

Library code raises `MmretError` with a message written for the person at the terminal: what was
wrong and what to do. The CLI turns it into one red line on stderr and exit code 1.
"""


class MmretError(Exception):
    """An error the user can act on; its message is shown as is, without a traceback."""
