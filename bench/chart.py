"""The sustained-load chart: an SVG written by hand (no plotting library on this machine).

One column per mode (push, pull); the upper panel shows pg_wal, the spool and the RPO in MiB
over time, the lower one the RPO in seconds.
"""

from html import escape

W, H = 460, 200  # one panel
LEFT, RIGHT, TOP, BOTTOM = 60, 12, 28, 36
MiB = 2**20
SIZE_SERIES = [("pg_wal", "pg_wal", "#1f77b4"), ("spool", "spool", "#ff7f0e"), ("rpo_bytes", "RPO", "#d62728")]
SECONDS_SERIES = [("rpo_s", "RPO", "#d62728")]


def nice_top(value):
    """A round axis maximum at or above value."""
    if value <= 0:
        return 1
    step = 10 ** (len(str(int(value))) - 1)
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * step:
            return m * step
    return 10 * step


def panel(x0, y0, title, samples, series, scale, unit):
    """One panel's SVG elements: frame, axes with ticks, a polyline per series, a legend."""
    t_max = max((s["t"] for s in samples), default=1) or 1
    top = nice_top(max((s[key] / scale for s in samples for key, _, _ in series), default=0))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def xy(t, v):
        return x0 + LEFT + t / t_max * pw, y0 + TOP + ph - min(v / top, 1) * ph

    out = [f'<text x="{x0 + LEFT}" y="{y0 + 16}" font-size="13" font-weight="bold">{escape(title)}</text>']
    out.append(f'<rect x="{x0 + LEFT}" y="{y0 + TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for i in range(5):
        v = top * i / 4
        _, y = xy(0, v)
        out.append(f'<line x1="{x0 + LEFT}" y1="{y:.1f}" x2="{x0 + LEFT + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 + LEFT - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{v:g}</text>')
    for i in range(5):
        t = t_max * i / 4
        x, _ = xy(t, 0)
        label = f"{t:.0f}" if t_max >= 40 else f"{t:.1f}"
        out.append(f'<text x="{x:.1f}" y="{y0 + TOP + ph + 14}" font-size="10" text-anchor="middle">{label}</text>')
    out.append(
        f'<text x="{x0 + LEFT + pw / 2}" y="{y0 + H - 6}" font-size="10" text-anchor="middle">seconds of load</text>'
    )
    out.append(
        f'<text x="{x0 + 14}" y="{y0 + TOP + ph / 2}" font-size="10" text-anchor="middle"'
        f' transform="rotate(-90 {x0 + 14} {y0 + TOP + ph / 2})">{unit}</text>'
    )
    for n, (key, label, colour) in enumerate(series):
        points = " ".join("{:.1f},{:.1f}".format(*xy(s["t"], s[key] / scale)) for s in samples)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        lx = x0 + LEFT + 8 + n * 80
        out.append(f'<line x1="{lx}" y1="{y0 + TOP + 10}" x2="{lx + 16}" y2="{y0 + TOP + 10}" stroke="{colour}"/>')
        out.append(f'<text x="{lx + 20}" y="{y0 + TOP + 14}" font-size="10">{escape(label)}</text>')
    return out


def render(results):
    """The chart of {mode: result with "samples"} as SVG text."""
    modes = [m for m in results if results[m].get("samples")]
    width, height = W * max(1, len(modes)), 2 * H
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        ' font-family="sans-serif">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for col, mode in enumerate(modes):
        samples = results[mode]["samples"]
        out += panel(col * W, 0, f"{mode}: pg_wal, spool, RPO (MiB)", samples, SIZE_SERIES, MiB, "MiB")
        out += panel(col * W, H, f"{mode}: RPO (seconds behind)", samples, SECONDS_SERIES, 1, "s")
    out.append("</svg>")
    return "\n".join(out) + "\n"
