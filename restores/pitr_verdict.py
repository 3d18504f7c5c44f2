"""Did recovery reach its target? Judged from the recovered cluster itself, never assumed.

PostgreSQL logs where recovery stopped: "recovery stopping before commit of transaction N,
time T" (a time target), "... after WAL location (LSN) ..." (an LSN), "... at restore point
..." (a name). Recovery that finds no such record ends where its WAL ends, short of the
target. A PITR succeeds only when the log says it stopped at the target, or (an LSN target)
replay passed it; otherwise it fails, naming where recovery ended and what was missing.

--target latest has no record to stop at: PostgreSQL takes a segment it cannot use (not served,
unreadable, or another timeline's) or a damaged record for the end of the WAL and promotes. It
succeeds only when replay went into the last segment the restore planned and no planned segment
was damaged (the prefetcher reads each to its end).
"""

import re
from datetime import datetime

from backupportal.lib.osuser import read_regular
from backups import walnames
from restores.pitr_plan import RestoreFailed

STOPPING = re.compile(r"recovery stopping (.*)$", re.M)
TIME_STOP = re.compile(r"^before (?:commit|abort) of transaction (\d+), time (.+)$")
LSN_STOP = re.compile(r'^(?:after|before) WAL location \(LSN\) "([0-9A-F]+/[0-9A-F]+)"')
REDO_DONE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
NEW_TIMELINE = re.compile(r"selected new timeline ID: (\d+)")
LAST_XACT = re.compile(r"last completed transaction was at log time (.+)$", re.M | re.I)
RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
# What PostgreSQL says when the WAL it was given stops making sense (xlogreader.c).
INVALID = re.compile(
    r"(?:LOG|WARNING):\s+((?:invalid|unexpected pageaddr|record with|contrecord is requested|"
    r"missing contrecord|could not read|archive file).*)$",
    re.M,
)


LOG_READ = 16 << 20  # the end of the log is what tells how recovery went


def log_text(logfile):
    """The restored copy's log (its last LOG_READ bytes): '' when there is none, or something
    else than a file is there (the copy's directory is the database OS user's)."""
    try:
        return read_regular(logfile, LOG_READ, tail=True).decode(errors="replace")
    except OSError:
        return ""


def judge(plan, logfile):
    """After promotion: RestoreFailed unless the log (or the replayed LSN) shows the target reached.
    What proves it goes into plan.recovered["reached"] and the notes."""
    text, target = log_text(logfile), plan.target
    stops = STOPPING.findall(text)
    stop = stops[-1].strip() if stops else ""
    if target.kind == "latest":
        reached = latest_moment(plan, text)
    else:
        reached = proof(plan, stop, text)
    if reached is None:
        raise RestoreFailed(shortfall(plan, text))
    plan.recovered["reached"] = reached
    plan.notes.append(reached)


def proof(plan, stop, text=""):
    """The sentence that proves the target reached, or None. A restore point's name is looked for
    whole in the log's `text`: it may hold a line break, which ends `stop`, the stopping line."""
    target = plan.target
    if target.kind == "time":
        m = TIME_STOP.match(stop)
        if m and datetime.fromisoformat(m.group(2).strip()) > target.value:
            return (
                f"recovery stopped at {target.text}: right before transaction {m.group(1)}, committed at {m.group(2)}"
            )
    if target.kind == "name":
        logged = target.value.replace("\n", "\n\t")  # the server's log indents a message's further lines
        said = f'recovery stopping at restore point "{logged}", time '
        if stop and said in text:
            created = text[text.rindex(said) + len(said) :].split("\n", 1)[0].strip()
            return f"recovery stopped at restore point {target.value!r}, created at {created}"
    if target.kind == "lsn":
        m = LSN_STOP.match(stop)
        replayed = plan.recovered.get("recovered_lsn", "")
        if m and walnames.lsn_to_int(m.group(1)) >= walnames.lsn_to_int(target.value):
            return f"recovery stopped at LSN {target.value}: right before the record at {m.group(1)}, the first at or past it"
        if replayed and walnames.lsn_to_int(replayed) >= walnames.lsn_to_int(target.value):
            return f"replay passed the target LSN {target.value}: it reached {replayed}"
    return None


def latest_moment(plan, text):
    """--target latest replays all the archived WAL: which moment that was; None when replay
    ended before the last planned segment."""
    segno, name = last_planned(plan)
    end = replay_end(plan, text)
    if not end or walnames.lsn_to_int(end) <= segno * plan.segment_size or plan.damaged:
        return None
    return (
        f"--target latest: recovered to the end of the archived WAL ({name}, replayed to LSN {end}); its last "
        f"transaction committed at {plan.recovered.get('recovered_to') or 'an unknown time'}"
    )


def last_planned(plan):
    """The number and name of the last segment the restore provides (its plan, pitr_prefetch)."""
    if plan.staged:
        segno = max(plan.staged)
        return segno, plan.staged[segno]
    return plan.segno(plan.newest.end_wal), plan.newest.end_wal


def replay_end(plan, text):
    """Where replay ended: asked of the promoted cluster (pg_last_wal_replay_lsn), else where its
    new timeline begins (its history file), else the log's "redo done at" (the last record's start)."""
    if plan.recovered.get("recovered_lsn"):
        return plan.recovered["recovered_lsn"]
    done = REDO_DONE.findall(text)
    return new_timeline_start(plan, text) or (done[-1] if done else "")


def new_timeline_start(plan, text):
    """The switch point in the history file of the timeline the promotion selected, or ''."""
    selected = NEW_TIMELINE.findall(text)
    if not selected:
        return ""
    try:
        history = read_regular(plan.datadir / "pg_wal" / f"{int(selected[-1]):08X}.history", 1 << 20).decode()
    except (OSError, UnicodeDecodeError):
        return ""
    entries = [line.split() for line in history.splitlines() if line.strip() and not line.startswith("#")]
    return entries[-1][1] if entries and len(entries[-1]) > 1 else ""


def lsn_text(position):
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def goal(plan):
    """What recovery was to reach, for the messages."""
    if plan.target.kind != "latest":
        return f"the target {plan.target.text}"
    segno, name = last_planned(plan)
    return f"the end of the archived WAL (segment {name}, through LSN {lsn_text((segno + 1) * plan.segment_size)})"


def shortfall(plan, text):
    """Where recovery really ended and what it missed: one line for the run's error."""
    lsn = replay_end(plan, text)
    last = LAST_XACT.findall(text)
    ended = f"recovery ended at LSN {lsn}" if lsn else "recovery ended"
    if last:
        ended += f", after a transaction committed at {last[-1].strip()}"
        plan.recovered.setdefault("recovered_to", last[-1].strip())
    elif lsn:
        plan.recovered.setdefault("recovered_to", f"LSN {lsn}")
    plan.recovered["recovered_lsn"] = lsn
    return f"{ended}, short of {goal(plan)}: {missing(plan, text)}"


def missing(plan, text):
    if plan.damaged:
        name, lsn, why = plan.damaged[min(plan.damaged)]
        return (
            f"WAL segment {name} is damaged from LSN {lsn} ({why}): replay cannot go past it, and the "
            f"WAL after it is lost from this archive; restore to a target before it "
            f"(--target-lsn, --target-time) and take a new base backup now"
        )
    restored = RESTORED.findall(text)
    invalid = INVALID.findall(text)
    wanted = {
        "time": f"no commit after {plan.target.text} was replayed",
        "lsn": f"LSN {plan.target.value} was not replayed",
        "name": f"restore point {plan.target.value!r} was not replayed",
        "latest": f"replay never went into segment {last_planned(plan)[1]}",
    }.get(plan.target.kind, "the target was not replayed")
    if not restored:
        return f"{wanted}; no archived WAL segment could be replayed"
    after = restored[-1]
    following = walnames.segment_name(walnames.timeline_of(after), plan.segno(after) + 1, plan.segment_size)
    why = f"the WAL after {after} (segment {following}) was missing or unreadable"
    if invalid:
        why = f"{after} was replayed up to where PostgreSQL found {invalid[-1].strip()}"
    return f"{wanted}; {why}"
