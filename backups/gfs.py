"""Grandfather-father-son retention of one series of good backups (a database's logical ones,
a cluster's base backups): which to keep and by which rule. Pure: no database, no clock.

- daily: every backup younger than `days` (the strategy's 30): the portal's days-based
  retention as it was, so a server's default policy keeps exactly what it kept before;
- weekly, monthly, yearly: the newest backup of each of the newest N ISO weeks, months, years
  that have one (0: off), however old, as restic and Databasus count them;
- floor: the newest `floor` backups, whatever their age, so that weeks of failing jobs never
  let retention empty the catalog (pgbackweb #121).

Periods are those of the portal's time zone: a backup at 02:00 Maldives time is of that day.
"""

from datetime import timedelta

from django.utils import timezone

PERIODS = [
    ("weekly", lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2])),
    ("monthly", lambda t: t.strftime("%Y-%m")),
    ("yearly", lambda t: t.strftime("%Y")),
]


def keep(runs, now, days, weekly=0, monthly=0, yearly=0, floor=1):
    """{run: rule} of the runs to keep: "daily 2026-12-01", "weekly 2026-W48", "monthly 2026-11",
    "yearly 2026" or "floor". A run kept by several rules is labelled by the first of those.

    `runs` are good backups with a `finished_at`; any order."""
    newest_first = sorted(runs, key=lambda r: r.finished_at, reverse=True)
    kept = {}
    cutoff = now - timedelta(days=days)
    for run in newest_first:
        if run.finished_at >= cutoff:
            kept[run] = f"daily {_local(run).strftime('%Y-%m-%d')}"
    counts = {"weekly": weekly, "monthly": monthly, "yearly": yearly}
    for rule, period_of in PERIODS:
        seen = []
        for run in newest_first:
            period = period_of(_local(run))
            if period in seen:
                continue  # an older backup of a period already kept by its newest
            if len(seen) == counts[rule]:
                break
            seen.append(period)
            kept.setdefault(run, f"{rule} {period}")
    for run in newest_first[:floor]:
        kept.setdefault(run, "floor")
    return kept


def _local(run):
    return timezone.localtime(run.finished_at)


def goes_on(run, days):
    """When the daily rule lets a backup go (if nothing else keeps it then): its day + `days`."""
    return timezone.localtime(run.finished_at + timedelta(days=days)).date()
