"""Charts drawn on the server as SVG: no script, nothing fetched, styled by attributes only
(the console's Content-Security-Policy allows no inline style)."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT, PAD_L, PAD_B, PAD_T = 640, 180, 44, 22, 10
COLOURS = ("#1f6feb", "#d1242f", "#2da44e", "#8250df", "#bf8700")


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float]


def time_series(title: str, series: list[Series], ticks: list[str], *, unit: str = "") -> str:
    """A line chart of equally spaced buckets; `ticks` labels each bucket (a few are drawn)."""
    n = max((len(s.values) for s in series), default=0)
    top = max((v for s in series for v in s.values), default=0.0) or 1.0
    plot_w, plot_h = WIDTH - PAD_L - 8, HEIGHT - PAD_B - PAD_T

    def x(i: int) -> float:
        return PAD_L + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return PAD_T + plot_h - plot_h * v / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}" class="chart"><title>{escape(title)}</title>',
             f'<line x1="{PAD_L}" y1="{PAD_T + plot_h}" x2="{WIDTH - 8}" y2="{PAD_T + plot_h}" stroke="#888"/>',
             f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end" font-size="10" fill="#555">'
             f'{escape(_short(top))}{escape(unit)}</text>',
             f'<text x="{PAD_L - 4}" y="{PAD_T + plot_h}" text-anchor="end" font-size="10" fill="#555">0</text>']
    step = max(1, n // 6)
    for i in range(0, n, step):
        parts.append(f'<text x="{x(i):.1f}" y="{HEIGHT - 6}" text-anchor="middle" font-size="10" fill="#555">'
                     f'{escape(ticks[i] if i < len(ticks) else "")}</text>')
    for k, s in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        dash = ' stroke-dasharray="6 3"' if k % 2 else ""  # overlapping lines stay told apart
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{points}">'
                     f'<title>{escape(s.label)}</title></polyline>')
        parts.append(f'<rect x="{PAD_L + 8 + 130 * k}" y="{PAD_T}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{PAD_L + 22 + 130 * k}" y="{PAD_T + 9}" font-size="11">{escape(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _short(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.3g}"
