"""A bar chart of events forwarded and dropped per hour, as SVG markup (pure, no JS).

The SVG scales with its container (``viewBox``, no fixed width), names itself for
assistive technology (``role="img"``, ``<title>``, ``<desc>`` with the totals), and
draws with CSS classes (app/web/static/app.css) plus ``fill`` attributes as a fallback,
so it reads the same inline in a page or opened alone. Every text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 12, 44
FORWARDED_FILL = "#1b6e3b"
DROPPED_FILL = "#b3261e"
LABEL_EVERY = 3  # hours between labels on the time axis


@dataclass(frozen=True, slots=True)
class Bar:
    """One hour: its start (UTC) and the two counts drawn for it."""

    start: datetime
    forwarded: int
    dropped: int


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 × 10ⁿ at or above ``value`` (1 for zero): the axis top."""
    if value <= 1:
        return 1
    magnitude = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return int(step * magnitude)
    return int(10 * magnitude)  # pragma: no cover - the loop always returns


def _number(value: float) -> str:
    """Coordinates with at most two decimals and no trailing zeros: stable output."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def render_chart(bars: Sequence[Bar], *, title: str, chart_id: str = "chart") -> str:
    """SVG of grouped bars (forwarded, dropped) per hour, oldest on the left."""
    forwarded = sum(bar.forwarded for bar in bars)
    dropped = sum(bar.dropped for bar in bars)
    top = nice_ceiling(max([0, *(max(b.forwarded, b.dropped) for b in bars)]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(bars), 1)
    bar_w = max(slot * 0.38, 1.0)
    base = TOP + plot_h
    first = bars[0].start.strftime("%H:00") if bars else ""
    last = bars[-1].start.strftime("%H:00") if bars else ""
    title_id, desc_id = f"{chart_id}-title", f"{chart_id}-desc"
    description = (
        f"{forwarded} event(s) forwarded and {dropped} dropped in {len(bars)} hour(s), "
        f"UTC {first} to {last}; highest hour: {max([0, *(b.forwarded for b in bars)])} "
        "forwarded."
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-labelledby="{escape(title_id)} {escape(desc_id)}" '
        'preserveAspectRatio="xMidYMid meet">',
        f'<title id="{escape(title_id)}">{escape(title)}</title>',
        f'<desc id="{escape(desc_id)}">{escape(description)}</desc>',
    ]
    # Horizontal grid lines, labelled on the left: 0, the middle when it is whole, the top.
    for value in (0, top // 2, top) if top % 2 == 0 else (0, top):
        y = base - plot_h * value / top
        parts.append(
            f'<line class="chart-grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
            f'y1="{_number(y)}" y2="{_number(y)}" stroke="#8a8a8a" stroke-width="0.5"/>'
        )
        parts.append(
            f'<text class="chart-label" x="{LEFT - 6}" y="{_number(y + 4)}" '
            f'text-anchor="end" font-size="12">{value}</text>'
        )
    for position, bar in enumerate(bars):
        x = LEFT + position * slot + (slot - 2 * bar_w) / 2
        hour = bar.start.strftime("%H:00")
        for offset, count, kind, fill in (
            (0.0, bar.forwarded, "forwarded", FORWARDED_FILL),
            (bar_w, bar.dropped, "dropped", DROPPED_FILL),
        ):
            if count <= 0:
                continue
            height = max(plot_h * count / top, 1.0)
            parts.append(
                f'<rect class="chart-{kind}" x="{_number(x + offset)}" '
                f'y="{_number(base - height)}" width="{_number(bar_w)}" '
                f'height="{_number(height)}" fill="{fill}">'
                f"<title>{escape(hour)} UTC: {count} {kind}</title></rect>"
            )
        if position % LABEL_EVERY == 0:
            parts.append(
                f'<text class="chart-label" x="{_number(LEFT + (position + 0.5) * slot)}" '
                f'y="{base + 16}" text-anchor="middle" font-size="12">{escape(hour)}</text>'
            )
    legend_y = HEIGHT - 10
    parts += [
        f'<rect class="chart-forwarded" x="{LEFT}" y="{legend_y - 10}" width="12" height="12" '
        f'fill="{FORWARDED_FILL}"/>',
        f'<text class="chart-label" x="{LEFT + 18}" y="{legend_y}" font-size="12">'
        f"forwarded ({forwarded})</text>",
        f'<rect class="chart-dropped" x="{LEFT + 170}" y="{legend_y - 10}" width="12" '
        f'height="12" fill="{DROPPED_FILL}"/>',
        f'<text class="chart-label" x="{LEFT + 188}" y="{legend_y}" font-size="12">'
        f"dropped ({dropped})</text>",
        f'<text class="chart-label" x="{WIDTH - RIGHT}" y="{legend_y}" text-anchor="end" '
        'font-size="12">hour (UTC)</text>',
        "</svg>",
    ]
    return "".join(parts)
