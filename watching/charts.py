"""Small server-rendered SVG charts: no JavaScript library, nothing fetched from the internet.

Each chart is a list of (label, value) points drawn as bars, with an optional objective
drawn as a dashed line (a bar above it is red), so a DBA sees at a glance what crossed it.
"""

from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import mark_safe

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 640, 180, 56, 28, 12


@dataclass
class Chart:
    title: str
    points: list  # [(label, value)]
    unit: str = ""
    objective: float | None = None
    objective_label: str = ""

    def svg(self):
        if not self.points:
            return mark_safe(f'<p class="empty">{escape(self.title)}: no data yet.</p>')
        top = max([v for _, v in self.points] + [self.objective or 0]) or 1
        plot_w, plot_h = WIDTH - PAD_LEFT - 8, HEIGHT - PAD_BOTTOM - PAD_TOP
        step = plot_w / len(self.points)
        bar_w = max(2.0, step * 0.7)
        parts = [
            f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(self.title)}">',
            f"<title>{escape(self.title)}</title>",
            f'<line x1="{PAD_LEFT}" y1="{PAD_TOP + plot_h}" x2="{WIDTH - 8}" y2="{PAD_TOP + plot_h}" class="axis"/>',
            f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + 10}" class="tick" text-anchor="end">{_fmt(top)}{escape(self.unit)}</text>',
            f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + plot_h}" class="tick" text-anchor="end">0</text>',
        ]
        label_every = max(1, len(self.points) // 8)
        for i, (label, value) in enumerate(self.points):
            h = plot_h * value / top
            x = PAD_LEFT + i * step + (step - bar_w) / 2
            over = self.objective is not None and value > self.objective
            parts.append(
                f'<rect x="{x:.1f}" y="{PAD_TOP + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'class="bar{" over" if over else ""}"><title>{escape(label)}: {_fmt(value)}{escape(self.unit)}</title></rect>'
            )
            if i % label_every == 0:
                parts.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{HEIGHT - 8}" class="tick" text-anchor="middle">{escape(label)}</text>'
                )
        if self.objective is not None:
            y = PAD_TOP + plot_h - plot_h * self.objective / top
            parts.append(f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH - 8}" y2="{y:.1f}" class="objective"/>')
            parts.append(
                f'<text x="{WIDTH - 10}" y="{y - 4:.1f}" class="tick objective-label" text-anchor="end">{escape(self.objective_label)}</text>'
            )
        parts.append("</svg>")
        return mark_safe("".join(parts))


def _fmt(value):
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}".rstrip("0").rstrip(".") if value else "0"


def server_charts(server, now=None):
    """The charts of a server's page: four queries, whatever the number of rows."""
    from datetime import timedelta

    from django.db.models import DurationField, ExpressionWrapper, F, Max, Sum
    from django.db.models.functions import TruncDate, TruncHour
    from django.utils import timezone

    now = now or timezone.now()
    tz = timezone.get_current_timezone()
    runs = (
        server.runs.filter(status="succeeded", kind="logical", finished_at__gte=now - timedelta(days=30))
        .annotate(day=TruncDate("finished_at", tzinfo=tz))
        .values("day")
        .annotate(
            size=Sum("size"),
            longest=Max(ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())),
        )
        .order_by("day")
    )
    wal = (
        server.wal_segments.filter(archived_at__gte=now - timedelta(hours=48))
        .annotate(hour=TruncHour("archived_at", tzinfo=tz))
        .values("hour")
        .annotate(size=Sum("size"))
        .order_by("hour")
    )
    tests = list(server.restore_tests.filter(duration_s__isnull=False).order_by("-started_at")[:20])[::-1]
    rpo = server.rpo_samples.filter(hour__gte=now - timedelta(hours=48)).order_by("hour")
    return [
        Chart("Logical backup size per day", [(f"{r['day']:%d %b}", (r["size"] or 0) / 2**20) for r in runs], " MiB"),
        Chart(
            "Longest logical backup per day",
            [(f"{r['day']:%d %b}", r["longest"].total_seconds() if r["longest"] else 0) for r in runs],
            " s",
        ),
        Chart(
            "WAL archived per hour (48 h)",
            [(f"{timezone.localtime(r['hour']):%d %H:00}", r["size"] / 2**20) for r in wal],
            " MiB",
        ),
        Chart(
            "Worst achieved RPO per hour (48 h)",
            [(f"{timezone.localtime(s.hour):%d %H:00}", s.worst_seconds / 60) for s in rpo],
            " min",
            objective=server.rpo_minutes,
            objective_label=f"RPO objective {server.rpo_minutes} min",
        ),
        Chart(
            "Restore test duration (measured RTO)",
            [(f"#{t.pk} {timezone.localtime(t.started_at):%d %b}", t.duration_s) for t in tests],
            " s",
            objective=server.rto_critical_minutes * 60,
            objective_label=f"RTO objective {server.rto_critical_minutes} min",
        ),
    ]
