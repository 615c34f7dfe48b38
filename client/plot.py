"""A bar chart of a release: one bar per cell, error bars for its interval, suppressed cells
(and a share's or mean's cells empty by the query's terms) marked where their bar would be
(never drawn as zero). Needs matplotlib.

    release.plot()                           # x: the first key, colours: the second
    release.plot(x="flag", hue="majorityStatus", ax=ax, horizontal=True)
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from client.display import key_text

if TYPE_CHECKING:
    from client.results import Release

SUPPRESSED_COLOR = "#9a9a9a"
MAX_BARS = 400  # beyond this a bar chart is unreadable, and slow to draw
_HATCH = {"suppressed": "///", "empty": "..."}
_LEGEND = {"suppressed": "suppressed", "empty": "empty by the query's terms"}


def plot_release(
    release: Release,
    *,
    x: str | None = None,
    hue: str | None = None,
    ax: Any = None,
    title: str | None = None,
    horizontal: bool = False,
    show_suppressed: bool = True,
    only: Mapping[str, Any] | None = None,
    max_bars: int = MAX_BARS,
) -> Any:
    """Draw `release` as grouped bars on `ax` (a new figure when None); returns the axes.

    `x` is the key along the axis (default: `flag` for flag counts, else the first dimension),
    `hue` the key that splits each position into coloured bars (default: the next key). Other
    keys, if any, are joined into the axis labels. Suppressed cells are marked with a hatched
    band across the whole value axis (no height, which would read as a value) and the word
    "suppressed"; a share's or mean's cell empty by the query's own terms, which has no value
    either, is marked so with the word "empty" (a count's or sum's is a bar of 0). `only`
    keeps the cells whose keys take the values given (a value, or a list of values; None is
    the missing key): `only={"ageBroad": ["0--8", "9--17"]}`. More than `max_bars` bars is
    refused with a ValueError saying so, rather than drawing a chart nobody can read.
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("plot() needs matplotlib: pip install matplotlib") from exc

    keys = release.keys
    rows = release.table.to_pylist()
    for key, wanted in (only or {}).items():
        if key not in keys:
            raise ValueError(f"{key!r} is not a key of this release (keys: {', '.join(keys)})")
        kept = set(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else {wanted}
        rows = [row for row in rows if row[key] in kept]
    if len(rows) > max_bars:
        raise ValueError(
            f"{len(rows)} bars are too many to read in one chart (max_bars={max_bars}): plot "
            f"part of the release with only={{key: values}}, or pass a larger max_bars"
        )
    if not rows:
        raise ValueError("no cell of this release has the keys given in `only`")
    if x is None:
        x = "flag" if "flag" in keys else (keys[0] if keys else None)
    if hue is None:
        rest = [k for k in keys if k != x]
        hue = rest[0] if rest else None
    for name in (x, hue):
        if name is not None and name not in keys:
            raise ValueError(f"{name!r} is not a key of this release (keys: {', '.join(keys)})")
    others = [k for k in keys if k not in (x, hue)]

    def position_label(row: dict[str, Any]) -> str:
        parts = [key_text(row[k]) for k in ([x] if x else []) + others]
        return " / ".join(parts) if parts else "all records"

    # Dicts keep first-seen order and look up in constant time (a list's index() made a large
    # release quadratic).
    position_of: dict[str, int] = {}
    group_of: dict[str, int] = {}
    for row in rows:
        position_of.setdefault(position_label(row), len(position_of))
        group_of.setdefault(key_text(row[hue]) if hue else "", len(group_of))
    positions, groups = list(position_of), list(group_of)

    if ax is None:
        bars = len(positions) * max(1, len(groups))
        if horizontal:
            size = (8.0, min(40.0, max(3.5, 0.22 * bars + 0.3 * len(positions) + 1.5)))
        else:
            size = (min(40.0, max(6.0, 0.3 * bars + 0.3 * len(positions) + 2)), 4.8)
        _, ax = plt.subplots(figsize=size)
    width = 0.8 / max(1, len(groups))
    colors = series_colors(len(groups))
    top = 0.0
    marks: list[tuple[float, str]] = []  # where a cell has no value, and why
    for g, group in enumerate(groups):
        centres, values, low_err, high_err = [], [], [], []
        for row in rows:
            if (key_text(row[hue]) if hue else "") != group:
                continue
            centre = position_of[position_label(row)] + (g - (len(groups) - 1) / 2) * width
            if row["suppressed"] or row["value"] is None:
                marks.append((centre, "empty" if row.get("status") == "empty" else "suppressed"))
                continue
            value = float(row["value"])
            centres.append(centre)
            values.append(value)
            low_err.append(max(0.0, value - float(row["ci_low"])))
            high_err.append(max(0.0, float(row["ci_high"]) - value))
            top = max(top, float(row["ci_high"]))
        color = colors[g]
        bar = ax.barh if horizontal else ax.bar
        kwargs: dict[str, Any] = {"height" if horizontal else "width": width}
        err = {"xerr" if horizontal else "yerr": [low_err, high_err]}
        bar(centres, values, color=color, label=group if hue else None, capsize=3,
            error_kw={"elinewidth": 1, "ecolor": "#333333"}, **kwargs, **err)

    if show_suppressed and marks:
        # A hatched band across the whole axis, not a bar: a stub of any height would read as a
        # value, and a suppressed cell's value may be anything below or above its neighbours'.
        for centre, why in marks:
            span = ax.axhspan if horizontal else ax.axvspan
            span(centre - width / 2, centre + width / 2, fill=False, hatch=_HATCH[why],
                 edgecolor=SUPPRESSED_COLOR, linewidth=0, alpha=0.5)
            # Placed in axis fractions along the value axis, so that it, too, reads as no value.
            if horizontal:
                ax.text(0.01, centre, why, va="center", ha="left", fontsize=7,
                        color=SUPPRESSED_COLOR, transform=ax.get_yaxis_transform())
            else:
                ax.text(centre, 0.01, why, rotation=90, va="bottom", ha="center",
                        fontsize=7, color=SUPPRESSED_COLOR, transform=ax.get_xaxis_transform())

    ticks = list(range(len(positions)))
    m = release.metadata
    label = (f"{_value_label(release)}\n({m.loss_name} {m.loss}; error bars: "
             f"{100 * m.confidence:g}% intervals of the noise)")
    if horizontal:
        ax.set_yticks(ticks, positions)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=9)
        ax.set_xlim(left=0)
    else:
        crowded = len(positions) > 4 or sum(len(p) for p in positions) > 8 * len(positions) + 8
        ax.set_xticks(ticks, positions, rotation=30 if crowded else 0,
                      ha="right" if crowded else "center")
        ax.set_ylabel(label, fontsize=9)
        ax.set_ylim(bottom=0)
    if m.measure == "Proportion":
        from matplotlib.ticker import PercentFormatter

        (ax.xaxis if horizontal else ax.yaxis).set_major_formatter(PercentFormatter(1.0))
    # Drawn from the series, not the bars: a series whose every cell is suppressed has no bar,
    # and matplotlib would give its legend entry the default colour of another.
    handles: list[Any] = [Patch(facecolor=c) for c in colors] if hue else []
    labels = list(groups) if hue else []
    if show_suppressed and marks:
        for why in ("suppressed", "empty"):
            if any(w == why for _, w in marks):
                handles.append(Patch(fill=False, hatch=_HATCH[why], edgecolor=SUPPRESSED_COLOR))
                labels.append(_LEGEND[why])
    if hue or (show_suppressed and marks):
        ax.legend(handles, labels, title=hue, fontsize=8)
    heading = title if title is not None else str(release.query or m.measure)
    ax.set_title(textwrap.fill(heading, 70), fontsize=10)
    ax.figure.tight_layout()
    return ax


def series_colors(count: int) -> list[str]:
    """`count` distinct colours, one per series, from matplotlib's qualitative colormaps: tab10
    up to 10 series; then tab20's other ten (its light shades); then tab20b's and tab20c's; past
    those 60, evenly spaced colours of a continuous colormap."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    def listed(name: str) -> list[str]:
        return [to_hex(c) for c in colormaps[name].colors]  # type: ignore[attr-defined]

    tab20 = listed("tab20")
    palette = listed("tab10") + tab20[1::2] + listed("tab20b") + listed("tab20c")
    if count <= len(palette):
        return palette[:count]
    spread = colormaps["turbo"]
    return [to_hex(spread(i / max(1, count - 1))) for i in range(count)]


def _value_label(release: Release) -> str:
    return {
        "Count": "records",
        "FlagCounts": "records with the flag",
        "Proportion": "share of records",
        "Mean": "mean",
        "Sum": "sum",
    }.get(release.metadata.measure, "value")
