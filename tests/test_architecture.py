"""The shape of the code, checked: one writer of alerts.

This reads the source itself, so a new alert writer cannot slip in unseen.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ["backupportal", "backups", "restores", "watching"]


def sources(*apps):
    """(path, text) of every module of the apps, migrations aside."""
    for app in apps:
        for path in sorted((ROOT / app).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path, path.read_text(encoding="utf-8")


# What opens or resolves an alert: watching.alerts' two functions, the Alert model itself (a
# create or update by hand), or the module named by a dotted path.
ALERT_WRITER = re.compile(r"\b(raise_alert|resolve_alert)\b|\bwatching\.(alerts|models)\b|\bAlert\.objects\b")


def test_nothing_outside_watching_opens_or_resolves_an_alert():
    outside = [p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names = [p.name for p in outside if p.name not in ("watching", "tests")]
    assert {"backupportal", "backups", "restores"} <= set(names)
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path, text in sources(*names, "scripts", "bench")
        for n, line in enumerate(text.splitlines(), 1)
        if ALERT_WRITER.search(line)
    ]
    assert found == [], "only the monitor (watching/) opens and resolves alerts; the rest records on its own rows"


def test_the_search_for_alert_writers_finds_one():
    """The search above must be able to fail: a line that raises an alert is found."""
    assert ALERT_WRITER.search('    raise_alert("backup_failed", server=server, message=text)')
    assert ALERT_WRITER.search("from watching.alerts import resolve_alert")
    assert ALERT_WRITER.search('Alert.objects.filter(pk=1).update(state="resolved")')
    assert not ALERT_WRITER.search('conditions.changed("backup_failed", server=server)')
