"""The one exception type for mistakes a user can make (bad file, bad config, bad flag).

The command line turns a `DcqError` into a single line on stderr and exit code 2, so its
message must say what went wrong, where, and how to fix it.
"""

import reprlib


class DcqError(Exception):
    """A user-caused error with a message fit to be printed as one line."""


MAX_MESSAGE = 1500  # characters of an error line; a message is cut there (the rest is never useful)


def one_line(exc: BaseException) -> str:
    """The message of `exc` as one printable line (`printable`) of at most `MAX_MESSAGE` characters.
    An error re-raised from a DataLoader worker carries the worker's whole traceback in its message;
    only its last line (the error itself) is kept."""
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
        return _cut(printable(last))
    return _cut(printable(" ".join(lines)))


def _cut(text: str) -> str:
    """``text``, or its start when it is longer than `MAX_MESSAGE` characters or UTF-8 bytes."""
    if len(text) <= MAX_MESSAGE and len(text.encode("utf-8", "replace")) <= MAX_MESSAGE:
        return text
    head = text[:MAX_MESSAGE - 60]
    while len(head.encode("utf-8", "replace")) > MAX_MESSAGE - 60:
        head = head[:len(head) // 2]
    return f"{head} ... ({len(text)} characters in all)"


def printable(text) -> str:
    """``text`` (a file name, a value) fit for a one-line message: control characters, line and
    paragraph separators and bytes that are not UTF-8 (``os.fsdecode``'s surrogates) are shown as
    escapes, so a hostile file name can neither split nor break the line that names it."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029) or 0xD800 <= code <= 0xDFFF:
            out.append(ch.encode("unicode_escape").decode("ascii") if code < 0xD800 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxtuple = 2, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 80, 40, 80


def shown(value) -> str:
    """``repr(value)`` cut short (a few items, a few levels, 80 characters of text), computed
    without walking the whole value: a message quoting a huge value stays one short line."""
    return _SHOWN.repr(value)
