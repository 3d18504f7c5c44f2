"""Durations as a DBA reads them against an RTO: "3 h 05 min"."""

from django import template

register = template.Library()


@register.filter
def duration_hm(value, sign=""):
    """A timedelta as "H h MM min"; with "neg", the magnitude of a negative one."""
    if value is None:
        return ""
    seconds = int(value.total_seconds())
    if sign == "neg":
        seconds = -seconds
    prefix = "-" if seconds < 0 else ""
    minutes = abs(seconds) // 60
    return f"{prefix}{minutes // 60} h {minutes % 60:02d} min"
