"""Aligned plain-text tables, as the command line prints them (`health`, `dlq list`)."""

from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """`header` and `rows` in left-aligned columns two spaces apart, no trailing spaces.

    Cells are printed as they are: a caller holding untrusted values makes them printable first.
    """
    lines = [header, *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )
