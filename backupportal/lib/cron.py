"""Cron fields checked as django-q2 runs them (with croniter), so a schedule that is saved runs.

croniter alone accepts more than a schedule should hold: six or seven fields (seconds, years:
django-q2 would fire a job every few seconds), and expressions that never match (30 February),
on which it raises only when the next run is computed: after the row was saved.
"""

import re
from datetime import datetime, timedelta

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
    (default today): what a change of schedule is measured by (fewer is a destructive change).

    Counted day by day with croniter's own matching (its day-of-month OR day-of-week rule, L,
    #n), times the day's minutes: exact, and quick even for every minute (43,200 a month).
    """
    _, _, day, month, weekday = cron.split()
    expanded = croniter.expand(cron)[0]
    per_day = _count(expanded[0], 60) * _count(expanded[1], 24)
    first_minute, first_hour = _first(expanded[0]), _first(expanded[1])
    # The day's first firing stands for the day: it matches when the day does.
    day_cron = f"{first_minute} {first_hour} {day} {month} {weekday}"
    start = timezone.localtime(after).date()
    total = 0
    for n in range(days):
        d = start + timedelta(days=n)
        if croniter.match(day_cron, datetime(d.year, d.month, d.day, first_hour, first_minute)):
            total += per_day
    return total


def _count(values, whole):
    return whole if values == ["*"] else len(set(values))


def _first(values):
    return 0 if values == ["*"] else min(values)


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
