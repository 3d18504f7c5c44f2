"""Small filters for the portal's pages."""

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
    return "" if ratio is None else f"{ratio:.0%}"
