"""Anchors: copies of the journal's head kept in the storage locations, away from VAR_DIR.

Whoever can write VAR_DIR can rewrite the head file, and on SQLite the database too; the
storage locations (a NAS, an S3 bucket) are other machines under other accounts. An anchor is
one small object per state of the journal: its name carries the journal's id, the count of
entries, the newest entry's id and that entry's HMAC, so one listing of a location gives every
anchor without reading each object (a year of hourly anchors is 9 LIST calls on S3, not 8760
GETs). The body repeats the same values for a person reading it.

The ground cannot import the storage code (backups/), so backups registers its "anchor stores"
here from its AppConfig.ready(); the journal only knows this small interface:

    store.name                 the location's name, for messages
    store.put(key, data)       write the object once; False when it was already there
    store.keys(prefix)         every key under prefix, relative to the location
    both raise AnchorUnreachable with one line saying what is wrong.

The end of this module turns what the head file and the anchors claim (Marks) into the one
line verifyjournal prints when the chain does not agree with them.
"""

import json
import re
from collections import namedtuple

from django.conf import settings

PREFIX = "journal-anchors/"
_NAME = re.compile(r"^([0-9a-f]{32})/(\d{12})-(\d{12})-([0-9a-f]{64})\.json$")

# One claim about the journal made outside the database: by the head file or by an anchor.
# journal is None for a head file written before journals had an id.
Mark = namedtuple("Mark", "source journal entry hmac count")


class AnchorUnreachable(Exception):
    """A location cannot take or give anchors now; the message names it and what to do."""


_providers = []


def register(provider):
    """`provider()` returns the anchor stores to use now (the enabled locations, say). Idempotent."""
    if provider not in _providers:
        _providers.append(provider)


def stores():
    return [store for provider in _providers for store in provider()]


def key_for(mark) -> str:
    return f"{PREFIX}{mark.journal}/{mark.count:012d}-{mark.entry:012d}-{mark.hmac}.json"


def body_for(mark, at) -> bytes:
    values = {"journal": mark.journal, "count": mark.count, "entry": mark.entry, "hmac": mark.hmac, "at": at}
    return (json.dumps(values, sort_keys=True) + "\n").encode()


def parse(key, location):
    """The Mark an anchor's key states, or None for a key that is not an anchor."""
    match = _NAME.match(key.removeprefix(PREFIX))
    if not match:
        return None
    journal, count, entry, entry_hmac = match.groups()
    return Mark(f"the anchor in location {location}", journal, int(entry), entry_hmac, int(count))


def write(mark, at):
    """Write one anchor to every store. One dict per store: what was written, or why not."""
    key, body = key_for(mark), body_for(mark, at)
    results = []
    for store in stores():
        try:
            written = store.put(key, body)
            results.append({"location": store.name, "key": key, "written": written, "error": ""})
        except AnchorUnreachable as e:
            results.append({"location": store.name, "key": key, "written": False, "error": str(e)})
    return results


def read():
    """Every anchor every store holds, and one summary per store (errors included)."""
    marks, summaries = [], []
    for store in stores():
        try:
            found = [m for m in (parse(k, store.name) for k in store.keys(PREFIX)) if m]
        except AnchorUnreachable as e:
            summaries.append({"location": store.name, "anchors": 0, "error": str(e)})
            continue
        marks += found
        summaries.append({"location": store.name, "anchors": len(found), "error": ""})
    return marks, summaries


# --- What the head file and the anchors say about the chain verify() walked. ---------------


# A head file from before journals had ids cannot say which journal it is of.
NEW_DATABASE_HINT = ' (or the portal now uses a new database: then run verifyjournal --start-new-chain --reason "...")'


def mark_mismatch(mark, row, count):
    if mark.hmac != row.hmac:
        return f"entry #{row.id}: does not match {mark.source} kept outside the database (changed or replaced)" + (
            "" if mark.journal else NEW_DATABASE_HINT
        )
    if mark.count is not None and mark.count != count:
        return (
            f"{mark.source} counts {mark.count} entries up to #{row.id}, the journal has {count}: "
            "entries were deleted or inserted"
        )
    return ""


def foreign_problem(foreign, journal, walked):
    """Another journal's head or anchors: this database lost that journal, or is a new one."""
    if not foreign:
        return ""
    newest = max(foreign, key=lambda m: (m.count or 0, m.entry))
    held = f"it holds journal {journal} ({walked.count} entries)" if journal else "it holds no journal yet"
    return (
        f"{_sources([m for m in foreign if m.journal == newest.journal])} journal {newest.journal} "
        f"(its last known entry #{newest.entry}, "
        f"{newest.count} entries), which this database does not hold ({held}): the portal was pointed at a "
        "new database with VAR_DIR kept, or that journal's entries were deleted. If the move was intended, "
        'run: manage.py verifyjournal --start-new-chain --reason "..."'
    )


def _sources(marks):
    """'the head file names', 'the head file and the anchors in locations nas, s3 name'."""
    head = any(m.source == "the head file" for m in marks)
    locations = sorted({m.source.removeprefix("the anchor in location ") for m in marks if m.source != "the head file"})
    parts = (["the head file"] if head else []) + (
        [f"the anchor in location {locations[0]}"] if len(locations) == 1 else []
    )
    if len(locations) > 1:
        parts.append(f"the anchors in locations {', '.join(locations)}")
    return " and ".join(parts) + (" names" if len(parts) == 1 and len(locations) < 2 else " name")


def missing_problem(wanted, walked):
    """Marks whose entry the walk never reached: cut off the end, or deleted."""
    if not wanted:
        return ""
    entry = max(wanted)
    mark = max(wanted[entry], key=lambda m: m.source != "the head file")
    if entry > walked.last_id:
        newest = f"entries after #{walked.last_id} are missing" if walked.last_id else "the journal is empty"
        return (
            f"{newest}: {mark.source} kept outside the database names #{entry} as the newest "
            f"(entries were cut off the end)" + ("" if mark.journal else NEW_DATABASE_HINT)
        )
    return f"entry #{entry}, named by {mark.source} kept outside the database, is not in the journal (deleted)" + (
        "" if mark.journal else NEW_DATABASE_HINT
    )


def head_problem(head, walked):
    if head is None and walked.count:
        return f"the head file {settings.JOURNAL_HEAD_FILE} is missing but the journal has {walked.count} entries"
    return ""


def intact_message(journal, walked, anchors, marks):
    if not walked.count:
        return "journal intact: no entries yet"
    used = len([m for m in anchors if m in marks])
    against = "the head file" + (f" and {anchor_count_text(used)}" if used else " (no anchors found)")
    return f"journal {journal or '(no id yet)'} intact: {walked.count} entries, newest #{walked.last_id}; checked against {against}"


def anchor_count_text(n):
    return f"{n} anchor" + ("" if n == 1 else "s")
