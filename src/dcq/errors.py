"""The one exception type for mistakes a user can make (bad file, bad config, bad flag).

The command line turns a `DcqError` into a single line on stderr and exit code 2, so its
message must say what went wrong, where, and how to fix it.
"""


class DcqError(Exception):
    """A user-caused error with a message fit to be printed as one line."""


def one_line(exc: BaseException) -> str:
    """The message of `exc` as one line. An error re-raised from a DataLoader worker carries the
    worker's whole traceback in its message; only its last line (the error itself) is kept."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Original Traceback" in text:
        last = lines[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        for p in (prefix, f"{type(exc).__qualname__}: "):
            if last.startswith(p):
                last = last[len(p):]
        return last
    return " ".join(lines)
