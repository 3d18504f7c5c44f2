"""Cron fields checked as django-q2 runs them (with croniter), so a schedule that is saved runs.

croniter alone accepts more than a schedule should hold: six or seven fields (seconds, years:
django-q2 would fire a job every few seconds), and expressions that never match (30 February),
on which it raises only when the next run is computed: after the row was saved.
"""

import re
from datetime import datetime, time, timedelta
from functools import lru_cache
from itertools import pairwise

from croniter import CroniterBadDateError, CroniterError, croniter
from django.utils import timezone

# (name, lowest, highest) of the five fields, in order. Day-of-week 7 is Sunday, as 0.
FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7)]
# A schedule must fire within this long: four years and a day covers 29 February.
HORIZON = timedelta(days=1462)
EXAMPLE = "minute hour day-of-month month day-of-week, e.g. 0 2 * * *"


def cron_problem(cron, now=None):
    """None when django-q2 will run `cron`; else one line that names what is wrong."""
    fields = (cron or "").split()
    if len(fields) != len(FIELDS):
        count = f"{len(fields)} field{'s' if len(fields) != 1 else ''}"
        return f"'{cron}' is not a cron expression: it has {count}, use five ({EXAMPLE})"
    for index, text in enumerate(fields):
        problem = field_problem(index, text)
        if problem:
            return f"'{cron}' is not a cron expression: {problem}"
    if next_run(cron, now) is None:
        return f"'{cron}' never fires: {never_why(fields)} (none in the next {HORIZON.days:,} days)"
    return None


def field_problem(index, text):
    """What is wrong with one field, read alone (the others as *), or None."""
    name, lowest, highest = FIELDS[index]
    for item in text.split(","):
        # The step (*/15) and the nth weekday (0#1) are not values of the field.
        for number in re.findall(r"\d+", item.split("/")[0].split("#")[0]):
            if not lowest <= int(number) <= highest:
                return f"{name} {int(number)} is out of range {lowest}-{highest}"
    alone = ["*"] * len(FIELDS)
    alone[index] = text
    try:
        croniter.expand(" ".join(alone))
    except (CroniterError, ValueError):
        return f"{name} '{text}' is not understood: use numbers, ranges (1-5), lists (1,3) or steps (*/15)"
    return None


def never_why(fields):
    day, month = fields[2], fields[3]
    if day != "*" and month != "*":
        return f"month {month} has no day {day}; for the last day of a month use L"
    return "no time matches it"


def next_run(cron, after=None):
    """The next time `cron` fires after `after` (default now) in TIME_ZONE, as django-q2 computes
    it; None when it does not fire within HORIZON."""
    start = timezone.localtime(after)
    try:
        moment = croniter(cron, start, max_years_between_matches=HORIZON.days // 365 + 1).get_next(datetime)
    except CroniterBadDateError:
        return None
    return moment if moment - start <= HORIZON else None


def next_runs(cron, count=3, after=None):
    """The next `count` times `cron` fires (TIME_ZONE), for a person to check a schedule by."""
    runs, moment = [], after
    for _ in range(count):
        moment = next_run(cron, moment)
        if moment is None:
            break
        runs.append(moment)
    return runs


def firings(cron, days=30, after=None):
    """How many times `cron` fires in the `days` whole days (TIME_ZONE) from the day of `after`
    (default today): one of the measures a change of schedule is judged by (fewer is destructive).

    Counted day by day with croniter's own matching (its day-of-month OR day-of-week rule, L,
    #n), times the day's minutes: exact, and quick even for every minute (43,200 a month).
    """
    return len(_firing_days(cron, days, after)) * len(_times_of_day(cron))


def longest_gap(cron, days=366, after=None):
    """The longest time `cron` stays silent between firings that fall in the `days` whole days from
    the day of `after`, the last of them followed to its next firing however far: "only in
    December" is silent for eleven months, which a count of firings over a month never shows.
    The other measure a change of schedule is judged by (longer is destructive)."""
    times, fired = _times_of_day(cron), _firing_days(cron, days, after)
    if not fired:
        return _until_next(cron, _at(timezone.localtime(after).date(), 0))
    gaps = [timedelta(minutes=b - a) for a, b in pairwise(times)]
    # Between two firing days: from the first day's last firing to the next day's first.
    gaps += [(b - a) - timedelta(minutes=times[-1] - times[0]) for a, b in pairwise(fired)]
    return max([*gaps, _until_next(cron, _at(fired[-1], times[-1]))])


def _at(day, minute_of_day):
    return timezone.make_aware(datetime.combine(day, time(*divmod(minute_of_day, 60))))


def _until_next(cron, moment):
    following = next_run(cron, moment)
    return following - moment if following is not None else HORIZON


def _times_of_day(cron):
    """The minutes of the day (0..1439) at which `cron` fires on a day it fires on, in order."""
    minutes, hours = croniter.expand(cron)[0][:2]
    minutes = range(60) if minutes == ["*"] else sorted(set(minutes))
    hours = range(24) if hours == ["*"] else sorted(set(hours))
    return [h * 60 + m for h in hours for m in minutes]


def _firing_days(cron, days, after):
    """The dates, of the `days` whole days from the day of `after`, on which `cron` fires."""
    return _matching_days(cron, days, timezone.localtime(after).date())


# A change of schedule counts and measures both crons over a year: each is matched once.
@lru_cache(maxsize=64)
def _matching_days(cron, days, start):
    _, _, day, month, weekday = cron.split()
    hour, minute = divmod(_times_of_day(cron)[0], 60)
    # The day's first firing stands for the day: it matches when the day does.
    day_cron = f"{minute} {hour} {day} {month} {weekday}"
    dates = (start + timedelta(days=n) for n in range(days))
    return tuple(d for d in dates if croniter.match(day_cron, datetime(d.year, d.month, d.day, hour, minute)))


def duration_words(delta):
    """A gap between firings as a DBA reads it: "7 days", "2 days 12 hours", "45 minutes"."""
    minutes = int(delta.total_seconds() // 60)
    parts = [(minutes // 1440, "day"), (minutes % 1440 // 60, "hour"), (minutes % 60, "minute")]
    return " ".join(f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n) or "0 minutes"


# --- In words: "at 02:00, every day", "every 15 minutes, on Monday to Friday". ---------------

DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [None, "January", "February", "March", "April", "May", "June", "July", "August", "September"]
MONTHS += ["October", "November", "December"]


def in_words(cron):
    """A valid five-field cron said as a DBA would say it; the fields themselves when unusual."""
    minute, hour, day, month, weekday = cron.split()
    days = []
    if day == "L":
        days.append("on the last day of the month")
    elif day != "*":
        days.append(f"on day{'s' if ',' in day or '-' in day else ''} {_listed(day, str)} of the month")
    if weekday != "*":
        days.append(f"on {_listed(weekday, lambda n: DAYS[int(n)])}")
    # With both set, cron fires on either (its day-of-month OR its day-of-week).
    parts = [_time_words(minute, hour), " or ".join(days) or "every day"]
    if month != "*":
        parts.append(f"in {_listed(month, lambda n: MONTHS[int(n)])}")
    return ", ".join(parts)


def _time_words(minute, hour):
    if minute.isdigit() and all(h.isdigit() for h in hour.split(",")):
        return "at " + _and([f"{int(h):02d}:{int(minute):02d}" for h in hour.split(",")])
    if minute == "*" and hour == "*":
        return "every minute"
    if minute.startswith("*/") and hour == "*":
        return f"every {minute[2:]} minutes"
    if minute.isdigit() and hour == "*":
        return f"every hour at minute {int(minute)}"
    if minute.isdigit() and hour.startswith("*/"):
        return f"every {hour[2:]} hours at minute {int(minute)}"
    return f"at minute {minute} of hour {hour}"


def _listed(field, name):
    """'1-5' -> 'Monday to Friday', '1,3' -> 'Monday and Wednesday'; anything else as written."""
    items = []
    for item in field.split(","):
        ends = item.split("-")
        if not all(e.isdigit() for e in ends) or len(ends) > 2:
            return f"'{field}'"
        items.append(" to ".join(name(e) for e in ends))
    return _and(items)


def _and(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
