"""Plain-text and HTML tables for the terminal, the REPL and Jupyter."""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Sequence

MISSING_KEY = "(missing)"


def text_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[bool] | None = None,
    max_rows: int | None = None,
    gap: str = "  ",
) -> str:
    """An aligned table; columns flagged in `right` are right-aligned (numbers)."""
    right = list(right) if right is not None else [False] * len(headers)
    shown: list[Sequence[str] | None] = list(rows)
    if max_rows is not None and len(rows) > max_rows:
        head = max_rows // 2 + max_rows % 2
        tail = max_rows // 2
        shown = [*rows[:head], None, *(rows[len(rows) - tail :] if tail else [])]
    widths = [len(h) for h in headers]
    for row in shown:
        if row is not None:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if r else c.ljust(w)
            for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return gap.join(parts).rstrip()

    out = [line(headers), gap.join("-" * w for w in widths)]
    for row in shown:
        if row is None:
            out.append(f"... {len(rows) - (max_rows or 0)} more rows ...")
        else:
            out.append(line(row))
    return "\n".join(out)


def html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[bool] | None = None,
    muted: Sequence[bool] | None = None,
    caption: str = "",
    footer: str = "",
    max_rows: int | None = None,
) -> str:
    """An HTML table for Jupyter; rows flagged in `muted` are greyed (suppressed cells)."""
    right = list(right) if right is not None else [False] * len(headers)
    muted = list(muted) if muted is not None else [False] * len(rows)
    indices: list[int | None] = list(range(len(rows)))
    if max_rows is not None and len(rows) > max_rows:
        head = max_rows // 2 + max_rows % 2
        tail = max_rows // 2
        indices = [*range(head), None, *range(len(rows) - tail, len(rows))]
    esc = html.escape
    parts = ['<div class="veil">', '<table class="veil-table" style="border-collapse:collapse">']
    if caption:
        parts.append(f'<caption style="text-align:left;font-weight:bold">{esc(caption)}</caption>')
    parts.append("<thead><tr>")
    for header, r in zip(headers, right, strict=True):
        align = "right" if r else "left"
        parts.append(f'<th style="text-align:{align};padding:2px 8px">{esc(header)}</th>')
    parts.append("</tr></thead><tbody>")
    for index in indices:
        if index is None:
            skipped = len(rows) - (max_rows or 0)
            parts.append(
                f'<tr><td colspan="{len(headers)}" style="text-align:center;color:#888">'
                f"&hellip; {skipped} more rows &hellip;</td></tr>"
            )
            continue
        style = "color:#999;font-style:italic" if muted[index] else ""
        parts.append(f'<tr style="{style}">')
        for cell, r in zip(rows[index], right, strict=True):
            align = "right" if r else "left"
            parts.append(f'<td style="text-align:{align};padding:2px 8px">{esc(cell)}</td>')
        parts.append("</tr>")
    parts.append("</tbody></table>")
    if footer:
        parts.append(f'<p style="color:#666;font-size:90%">{esc(footer)}</p>')
    parts.append("</div>")
    return "".join(parts)


def key_text(value: object) -> str:
    """A key as shown: the missing key is "(missing)"."""
    return MISSING_KEY if value is None else str(value)


def wrap(text: str, width: int = 96, indent: str = "  ") -> str:
    return textwrap.fill(
        " ".join(text.split()), width=width, initial_indent=indent, subsequent_indent=indent
    )


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 3)].rstrip() + "..."


def rounded_up(value: float, digits: int = 2) -> str:
    """`value` to `digits` significant digits, rounded up: a ceiling stays a ceiling."""
    if value <= 0:
        return "0"
    exponent = math.floor(math.log10(value)) - digits + 1
    if exponent >= 0:
        return f"{math.ceil(value):,}"
    unit = 10.0**exponent
    # The small allowance keeps a float such as 6.2 / 0.1 = 62.000000001 from rounding to 6.3.
    up = math.ceil(value / unit - 1e-6) * unit
    return f"{up:.{digits - 1}e}" if value < 1e-3 else f"{up:.{-exponent}f}"


def value_accuracy_text(measure: str, half_width: float | None, assumed_count: int) -> str:
    """A share's, mean's or sum's interval in its own units, as a dry run states it ("" for
    counts, whose intervals are given in records, and from a server that does not say)."""
    if half_width is None:
        return ""
    if measure == "Proportion":
        # About, not at most: the release divides by the cell's noisy count, which falls below
        # the true one about half the time.
        return (f"a share's interval in a cell of {assumed_count} records: about +/- "
                f"{rounded_up(100 * half_width)} points")
    if measure == "Mean":
        return (f"a mean's interval in a cell of {assumed_count} records: about +/- "
                f"{rounded_up(half_width)}")
    if measure == "Sum":
        return f"a sum's interval: +/- {rounded_up(half_width)} in every cell"
    return ""


def unreachable_text(count: int | None, measure: str | None = None) -> str:
    """What the cells the query's own terms leave empty are shown as ("" when there are none,
    or the release predates the count). Their status is "empty"; a share or mean of no record
    has no value, and is also marked suppressed; a count or sum is 0."""
    if not count:
        return ""
    if measure in ("Proportion", "Mean"):
        shown = "no value, not noised; marked suppressed, though no rule withheld them"
    elif measure is None:
        shown = "stated, not noised"
    else:
        shown = "stated as 0, not noised"
    return f"{count} cells empty by the query's own terms (status empty: {shown})"


def empty_cells_text(bound: float | None, probability: float | None) -> str:
    """What the bound on empty cells published by chance says, in words ("" when not known:
    a release stored, or a server built, before it was recorded)."""
    if bound is None or probability is None:
        return ""
    return (
        f"published cells expected to be empty ones passing by chance: at most "
        f"{rounded_up(bound)} (each empty cell passes with probability "
        f"{rounded_up(100 * probability)}%)"
    )


def earlier_release_text(
    release_id: str, data_version: str, loss: str, *, spelling: str = "python"
) -> str:
    """What a dry run says of the caller's own release of the same query on another data
    version: where it is, and that it is not what a release now returns."""
    again = (f"veil releases {release_id}" if spelling == "cli"
             else f"get_release({release_id!r})")
    return (
        f"you received this query on data version {data_version}: release {release_id}, at "
        f"{loss}; {again} shows it again, free. A release now is not that one: releases "
        f"belong to their data version"
    )
