"""Small server-rendered SVG charts: no JavaScript library, nothing fetched from the internet.

Each chart is a list of points drawn as bars, with both axes titled and the value axis ticked,
and an optional objective drawn as a dashed line (a bar above it is red), so a DBA sees at a
glance what crossed it. A chart whose values lie far under its objective (an RTO of seconds
against one of hours) uses a logarithmic scale, so that both show.
"""

import math
from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Sum
from django.db.models.functions import TruncHour
from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import mark_safe

# The viewBox. Narrow enough that the text is drawn at about its size in a column of the
# server page (at least 440 px wide, see portal.css), at 768 px as at 1366 px.
WIDTH, HEIGHT = 480, 230
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 76, 10, 18, 48
PLOT_W, PLOT_H = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM
BOTTOM = PAD_TOP + PLOT_H
# Labels under the time axis: more would overlap.
MAX_X_LABELS = 6
# Sizes are in MB of 2**20 bytes, as filesizeformat shows them everywhere else in the portal.
MB = 2**20


@dataclass
class Chart:
    title: str
    points: list  # [(label, value)] or [(label, value, tooltip)]
    unit: str = ""  # of the values: "MB", "s", "min"
    y_title: str = ""
    x_title: str = ""
    objective: float | None = None
    objective_label: str = ""
    log: bool = False

    def svg(self):
        if not self.points:
            return mark_safe(f'<p class="empty">{escape(self.title)}: no data yet.</p>')
        scale = LogScale(self.values()) if self.log else LinearScale(self.values())
        parts = [
            f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(self.title)}">',
            f"<title>{escape(self.title)}</title>",
            *self._value_axis(scale),
            *self._bars(scale),
            *self._objective(scale),
            "</svg>",
        ]
        return mark_safe("".join(parts))

    def values(self):
        return [point[1] for point in self.points] + ([self.objective] if self.objective is not None else [])

    def _value_axis(self, scale):
        middle = PAD_TOP + PLOT_H / 2
        yield f'<text x="14" y="{middle:.1f}" class="axis-title" text-anchor="middle" transform="rotate(-90 14 {middle:.1f})" dominant-baseline="middle">{escape(self.y_title)}</text>'
        yield f'<text x="{PAD_LEFT + PLOT_W / 2:.1f}" y="{HEIGHT - 6}" class="axis-title" text-anchor="middle">{escape(self.x_title)}</text>'
        for tick in scale.ticks:
            y = scale.y(tick)
            yield f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH - PAD_RIGHT}" y2="{y:.1f}" class="grid"/>'
            yield f'<text x="{PAD_LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(tick)}</text>'
        yield f'<line x1="{PAD_LEFT}" y1="{BOTTOM}" x2="{WIDTH - PAD_RIGHT}" y2="{BOTTOM}" class="axis"/>'

    def _bars(self, scale):
        step = PLOT_W / len(self.points)
        bar_w = max(1.0, step * 0.7)
        label_every = math.ceil(len(self.points) / MAX_X_LABELS)
        for i, (label, value, *tooltip) in enumerate(self.points):
            # Never less than 2 px: a measured value is never drawn as nothing.
            h = max(2.0, BOTTOM - scale.y(value)) if value else 0.0
            x = PAD_LEFT + i * step + (step - bar_w) / 2
            over = self.objective is not None and value > self.objective
            tip = f"{tooltip[0] if tooltip else label}: {_fmt(value)} {self.unit}"
            yield (
                f'<rect x="{x:.1f}" y="{BOTTOM - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'class="bar{" over" if over else ""}"><title>{escape(tip)}</title></rect>'
            )
            if i % label_every == 0:
                yield f'<text x="{x + bar_w / 2:.1f}" y="{BOTTOM + 16}" class="tick" text-anchor="middle">{escape(label)}</text>'

    def _objective(self, scale):
        if self.objective is None:
            return
        y = scale.y(self.objective)
        yield f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH - PAD_RIGHT}" y2="{y:.1f}" class="objective"/>'
        yield f'<text x="{WIDTH - PAD_RIGHT - 2}" y="{y - 5:.1f}" class="tick objective-label" text-anchor="end">{escape(self.objective_label)}</text>'


class LinearScale:
    """From 0 to a round number above the largest value, ticked at round steps (1, 2 or 5 x 10^n)."""

    def __init__(self, values):
        top = max(values) or 1
        rough = top / 4
        magnitude = 10 ** math.floor(math.log10(rough))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
        self.ticks = [step * i for i in range(math.ceil(top / step) + 1)]

    def y(self, value):
        return BOTTOM - PLOT_H * value / self.ticks[-1]


class LogScale:
    """Powers of ten from below the smallest value to above the largest, each an equal step."""

    def __init__(self, values):
        positive = [v for v in values if v > 0] or [1]
        low = math.floor(math.log10(min(positive)))
        high = max(math.ceil(math.log10(max(positive))), low + 1)
        self.low, self.high = low, high
        self.ticks = [10.0**e for e in range(low, high + 1)]

    def y(self, value):
        exponent = math.log10(value) if value > 0 else self.low
        return BOTTOM - PLOT_H * (exponent - self.low) / (self.high - self.low)


def _fmt(value):
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.2g}" if value else "0"


def server_charts(server, now=None):
    """The charts of a server's page: four queries, whatever the number of rows."""
    now = now or timezone.now()
    # One point per backup: a day with two backups is two bars, not one of their sum.
    runs = list(
        server.runs.filter(status="succeeded", kind="logical", finished_at__gte=now - timedelta(days=30))
        .order_by("finished_at", "pk")
        .values("pk", "size", "started_at", "finished_at")
    )
    wal = (
        server.wal_segments.filter(archived_at__gte=now - timedelta(hours=48))
        .annotate(hour=TruncHour("archived_at", tzinfo=timezone.get_current_timezone()))
        .values("hour")
        .annotate(size=Sum("size"))
        .order_by("hour")
    )
    tests = list(server.restore_tests.filter(duration_s__isnull=False).order_by("-started_at")[:20])[::-1]
    rpo = server.rpo_samples.filter(hour__gte=now - timedelta(hours=48)).order_by("hour")
    rto_objective = server.rto_critical_minutes * 60
    return [
        Chart(
            "Logical backup size, each backup (30 days)",
            [(_day(r["finished_at"]), (r["size"] or 0) / MB, _backup(r)) for r in runs],
            "MB",
            y_title="size (MB)",
            x_title="date",
        ),
        Chart(
            "Logical backup duration, each backup (30 days)",
            [(_day(r["finished_at"]), _seconds(r), _backup(r)) for r in runs],
            "s",
            y_title="duration (seconds)",
            x_title="date",
        ),
        Chart(
            "WAL archived per hour (48 h)",
            [(f"{timezone.localtime(r['hour']):%d %H:00}", r["size"] / MB) for r in wal],
            "MB",
            y_title="WAL (MB)",
            x_title="hour (day and time)",
        ),
        Chart(
            "Worst achieved RPO per hour (48 h)",
            [(f"{timezone.localtime(s.hour):%d %H:00}", s.worst_seconds / 60) for s in rpo],
            "min",
            y_title="RPO (minutes)",
            x_title="hour (day and time)",
            objective=server.rpo_minutes,
            objective_label=f"RPO objective {server.rpo_minutes} min",
        ),
        Chart(
            "Restore test duration (measured RTO), log scale",
            [(_day(t.started_at), t.duration_s, f"restore test #{t.pk} {_minute(t.started_at)}") for t in tests],
            "s",
            y_title="duration (seconds, log)",
            x_title="restore test date",
            objective=rto_objective,
            objective_label=f"RTO objective {server.rto_critical_minutes} min ({rto_objective:,} s)",
            log=True,
        ),
    ]


def _day(moment):
    return f"{timezone.localtime(moment):%d %b}" if moment else "undated"


def _minute(moment):
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M}" if moment else "undated"


def _backup(run):
    return f"backup #{run['pk']} {_minute(run['finished_at'])}"


def _seconds(run):
    return (run["finished_at"] - run["started_at"]).total_seconds() if run["started_at"] else 0.0
