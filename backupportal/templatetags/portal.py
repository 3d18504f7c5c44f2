"""Small filters for the portal's pages."""

import math
from datetime import timedelta

from django import template

register = template.Library()


@register.filter
def duration(value):
    """Seconds (or a timedelta) as a DBA reads them: "45 s", "3 min 5 s", "2 h 10 min", "3 d 4 h"."""
    if value in (None, ""):
        return ""
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else float(value))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@register.filter
def percent(ratio):
    """Whole percent, rounded down: 29.7% free is "29%", beside a dot amber "under 30% free"."""
    return "" if ratio is None else f"{math.floor(ratio * 100 + 1e-9)}%"


@register.filter
def labelled(details):
    """A details dict as (label, value) pairs a person reads: "duration" "0.59 s", not
    duration_s=0.5867414599999847; lists joined, nested dicts as key: value."""
    return [(_label(key), _human(key, value)) for key, value in (details or {}).items()]


def _label(key):
    for unit in ("_s", "_bytes", "_pct"):
        if key.endswith(unit):
            key = key[: -len(unit)]
    return key.replace("_", " ")


def _human(key, value):
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "—"}[value]
    if isinstance(value, float):
        value = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    elif isinstance(value, int) and abs(value) >= 10000:
        value = f"{value:,}"
    elif isinstance(value, list):
        return ", ".join(_human("", v) for v in value) or "—"
    elif isinstance(value, dict):
        return "; ".join(f"{_label(k)}: {_human(k, v)}" for k, v in value.items()) or "—"
    suffix = {"_s": " s", "_bytes": " bytes", "_pct": "%"}
    return f"{value}{next((u for k, u in suffix.items() if key.endswith(k)), '')}"
