"""The one exception type for mistakes a user can make (bad file, bad config, bad flag).

The command line turns a `DcqError` into a single line on stderr and exit code 2, so its
message must say what went wrong, where, and how to fix it.
"""


class DcqError(Exception):
    """A user-caused error with a message fit to be printed as one line."""
