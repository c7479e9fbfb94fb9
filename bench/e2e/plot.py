"""A plain SVG bar chart of the benchmark figures relative to direct (python3 standard library only).

Each panel is one group of measurements (unix socket paths, TCP paths, the Docker API); each row a metric;
each bar one forwarding path. A bar's length is the path's performance as a fraction of direct on a log
scale: path / direct for throughput and connection rates, direct / path for latencies, so longer is better
everywhere and 1 is "as fast as direct".
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

COLORS = {"socat2": "#e49b2f", "ssh-L": "#8c6bb1", "vbridge": "#2b7bba"}
FALLBACK = ["#4daf4a", "#e41a1c", "#999999"]

WIDTH = 980
LEFT = 250    # metric labels
RIGHT = 70    # value labels past the longest bar
BAR = 11
GAP = 8       # between metric groups
TITLE = 26


def _scale(values: list[float]) -> tuple[float, float]:
    lo = min([0.01, *values])
    hi = max([2.0, *values])
    return 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))


def render(title: str, subtitle: str, panels: list[dict], series: list[str]) -> str:
    """panels: [{"title": str, "rows": [(label, {series: value or None})]}] -> SVG text."""
    values = [v for p in panels for _, row in p["rows"] for v in row.values() if v]
    lo, hi = _scale(values or [1.0])
    plot_w = WIDTH - LEFT - RIGHT

    def x(v: float) -> float:
        v = min(max(v, lo), hi)
        return LEFT + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    colors = {s: COLORS.get(s, FALLBACK[i % len(FALLBACK)]) for i, s in enumerate(series)}
    out: list[str] = []
    y = 20
    out.append(f'<text x="10" y="{y}" font-size="16" font-weight="bold">{escape(title)}</text>')
    y += 18
    out.append(f'<text x="10" y="{y}" font-size="11" fill="#444">{escape(subtitle)}</text>')
    y += 16
    lx = 10
    for s in series:
        out.append(f'<rect x="{lx}" y="{y - 9}" width="12" height="10" fill="{colors[s]}"/>')
        out.append(f'<text x="{lx + 16}" y="{y}" font-size="11">{escape(s)}</text>')
        lx += 30 + 7 * len(s)
    y += 14

    ticks = [t for e in range(int(math.log10(lo)), int(math.log10(hi)) + 1)
             for t in (10 ** e, 3 * 10 ** e) if lo <= t <= hi]
    for panel in panels:
        y += TITLE
        out.append(f'<text x="10" y="{y - 8}" font-size="13" font-weight="bold">{escape(panel["title"])}</text>')
        top = y
        for label, row in panel["rows"]:
            out.append(f'<text x="{LEFT - 8}" y="{y + BAR * len(series) / 2 + 4:.1f}" font-size="11" '
                       f'text-anchor="end">{escape(label)}</text>')
            for s in series:
                v = row.get(s)
                if v:
                    w = x(v) - LEFT
                    out.append(f'<rect x="{LEFT}" y="{y}" width="{max(w, 1):.1f}" height="{BAR - 2}" '
                               f'fill="{colors[s]}"><title>{escape(s)} {escape(label)}: {v:.3g}x direct</title></rect>')
                    text = f"{v:.2g}" if v < 1 else f"{v:.2f}"
                    out.append(f'<text x="{LEFT + w + 4:.1f}" y="{y + BAR - 3}" font-size="9" fill="#333">'
                               f'{text}</text>')
                else:
                    out.append(f'<text x="{LEFT + 4}" y="{y + BAR - 3}" font-size="9" fill="#999">'
                               f'{escape(s)}: no figure</text>')
                y += BAR
            y += GAP
        bottom = y - GAP / 2
        for t in ticks:
            tx = x(t)
            strong = abs(t - 1.0) < 1e-9
            out.append(f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{bottom:.1f}" '
                       f'stroke="{"#000" if strong else "#ccc"}" stroke-width="{1.5 if strong else 0.7}"/>')
            out.append(f'<text x="{tx:.1f}" y="{bottom + 11:.1f}" font-size="9" text-anchor="middle" fill="#555">'
                       f'{t:g}{" = direct" if strong else ""}</text>')
        y = bottom + 16
    height = int(y + 10)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">\n'
            f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>\n')
    return head + "\n".join(out) + "\n</svg>\n"
