"""Tables for reports and terminals: one markdown table, one aligned text table, one number format."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def fmt_metric(value: float | None, digits: int = 4) -> str:
    """A metric with `digits` decimals, or "n/a" where it could not be measured (None)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns padded to a common width, separated by two spaces; the first `left` columns are
    left-aligned, the others (numbers) right-aligned; a dashed line under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
