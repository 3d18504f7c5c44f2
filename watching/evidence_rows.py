"""The evidence pack's rows against the journal: the catalog's rows are not signed, the journal is.

Someone who can write to the portal's database can turn a failed backup into a good one, or move
a drill's go-live, and the pack would print it while its journal check reads "intact". So each
row the pack reports on for the period is compared with the journal entries that recorded it; a
row that disagrees, or has no entry where the portal always writes one, is named in the pack.

Only what the journal carries can be checked (README, "Evidence pack"):
- backup runs (finished in the period, succeeded or failed): the outcome (backup_succeeded,
  backup_imported or backup_failed, the newest of them), size and sha256 of a good one, and a
  finish no later than that entry and no earlier than its backup_started entry; a run a catalog
  rebuild recreated from its signed manifest (no entry of its own) by the catalog_rebuilt entry
  that lists it, and only as succeeded;
- restore tests (started in the period, passed or failed): the outcome (restore_test_passed or
  restore_test_failed), the duration when the entry says it, and a start and a finish no later
  than that entry;
- drill steps (of drills declared in the period, once anything of the step was entered): who,
  started, finished and outcome, against the step's newest drill_step_recorded entry.
"""

from datetime import datetime

from backupportal import journal
from backupportal.models import JournalEntry
from backups.models import BackupRun
from restores.models import DrDrill, DrDrillStep, RestoreTest
from watching.evidence import in_period

RUN_OUTCOMES = {
    "backup_succeeded": BackupRun.Status.SUCCEEDED,
    "backup_imported": BackupRun.Status.SUCCEEDED,
    "backup_failed": BackupRun.Status.FAILED,
}
RUN_STARTED = "backup_started"
REBUILT = "catalog_rebuilt"  # a run it recreated from a signed manifest has no entry of its own
TEST_OUTCOMES = {"restore_test_passed": RestoreTest.Status.PASSED, "restore_test_failed": RestoreTest.Status.FAILED}
STEP_RECORDED = "drill_step_recorded"
STEP_FIELDS = ("who", "started_at", "finished_at", "outcome")
KINDS = ("backup runs", "restore tests", "drill steps")  # as the pack counts them, in this order


def check(period):
    """{"checked": counts, "differ": [{"row", "problem"}]}: the period's rows the journal contradicts."""
    runs = (
        BackupRun.objects.filter(
            in_period("finished_at", period), status__in=[BackupRun.Status.SUCCEEDED, BackupRun.Status.FAILED]
        )
        .select_related("server")
        .order_by("finished_at", "pk")
    )
    tests = (
        RestoreTest.objects.filter(in_period("started_at", period), status__in=list(TEST_OUTCOMES.values()))
        .select_related("server")
        .order_by("started_at", "pk")
    )
    steps = DrDrillStep.objects.filter(drill__in=DrDrill.objects.filter(in_period("started_at", period)))
    steps = [
        s for s in steps.select_related("drill").order_by("drill__started_at", "drill_id", "position") if s.entered
    ]
    differ = [*_runs(list(runs)), *_tests(list(tests)), *_steps(steps)]
    counts = {"backup runs": len(runs), "restore tests": len(tests), "drill steps": len(steps)}
    return {"checked": counts, "differ": differ}


def counted(checked):
    """ "16 backup runs, 3 restore tests, 1 drill steps": the JSON's counts (sorted by name) as said."""
    return ", ".join(f"{checked[kind]} {kind}" for kind in KINDS if kind in checked)


def _entries(model, rows, actions):
    """{pk as text: [its entries of `actions`, oldest first]}."""
    found = {}
    ids = [str(row.pk) for row in rows]
    for start in range(0, len(ids), 1000):
        chunk = JournalEntry.objects.filter(
            object_type__in=journal.labels_of(model), object_id__in=ids[start : start + 1000], action__in=actions
        )
        for entry in chunk.order_by("id"):
            found.setdefault(entry.object_id, []).append(entry)
    return found


def _runs(runs):
    entries = _entries(BackupRun, runs, [*RUN_OUTCOMES, RUN_STARTED])
    rebuilt = _rebuilt(runs)
    for run in runs:
        row = f"backup run #{run.pk} ({run.server.name}, {run.kind}, {run.status})"
        if problem := _run_problem(run, entries.get(str(run.pk), []), rebuilt.get(run.pk)):
            yield {"row": row, "problem": problem}


def _rebuilt(runs):
    """{run pk: the catalog_rebuilt entry that recreated it}, of `runs` (from the entry's run_ids)."""
    pks = {run.pk for run in runs if (run.details or {}).get("rebuilt")}
    made = {}
    if pks:
        for entry in JournalEntry.objects.filter(action=REBUILT).order_by("id"):
            made.update({pk: entry for pk in entry.details.get("run_ids") or () if pk in pks})
    return made


def _run_problem(run, entries, rebuilt=None):
    outcomes = [e for e in entries if e.action in RUN_OUTCOMES]
    if not outcomes and rebuilt is not None:
        # Recreated from its signed manifest: a rebuild makes good runs only, after the rebuild.
        if run.status != BackupRun.Status.SUCCEEDED:
            return f"status {run.status}, journal entry #{rebuilt.pk} ({REBUILT}) recreated it succeeded"
        return ""
    if not outcomes:
        return f"no {' or '.join(RUN_OUTCOMES)} entry in the journal"
    entry = outcomes[-1]
    said = f"journal entry #{entry.pk} ({entry.action})"
    if RUN_OUTCOMES[entry.action] != run.status:
        return f"status {run.status}, {said} says {RUN_OUTCOMES[entry.action]}"
    if run.status == BackupRun.Status.SUCCEEDED:
        for field in ("size", "sha256"):
            if field in entry.details and entry.details[field] != getattr(run, field):
                return f"{field} {getattr(run, field)}, {said} says {entry.details[field]}"
    if run.finished_at > entry.at:
        return f"finished {run.finished_at.isoformat()}, after {said} at {entry.at.isoformat()}"
    started = [e for e in entries if e.action == RUN_STARTED]
    if started and run.finished_at < started[-1].at:
        return f"finished {run.finished_at.isoformat()}, before its backup_started entry #{started[-1].pk} at {started[-1].at.isoformat()}"
    return ""


def _tests(tests):
    entries = _entries(RestoreTest, tests, list(TEST_OUTCOMES))
    for test in tests:
        row = f"restore test #{test.pk} ({test.server.name}, {test.status})"
        if problem := _test_problem(test, entries.get(str(test.pk), [])):
            yield {"row": row, "problem": problem}


def _test_problem(test, entries):
    if not entries:
        return f"no {' or '.join(TEST_OUTCOMES)} entry in the journal"
    entry = entries[-1]
    said = f"journal entry #{entry.pk} ({entry.action})"
    if TEST_OUTCOMES[entry.action] != test.status:
        return f"status {test.status}, {said} says {TEST_OUTCOMES[entry.action]}"
    if "duration_s" in entry.details and entry.details["duration_s"] != test.duration_s:
        return f"duration {test.duration_s} s, {said} says {entry.details['duration_s']} s"
    for field in ("started_at", "finished_at"):
        value = getattr(test, field)
        if value is not None and value > entry.at:
            return f"{field} {value.isoformat()}, after {said} at {entry.at.isoformat()}"
    return ""


def _steps(steps):
    drills = {s.drill_id for s in steps}
    recorded = {}
    rows = JournalEntry.objects.filter(
        object_type__in=journal.labels_of(DrDrill), object_id__in=[str(pk) for pk in drills], action=STEP_RECORDED
    )
    for entry in rows.order_by("id"):
        recorded[(entry.object_id, entry.details.get("step"))] = entry  # the newest wins
    for step in steps:
        row = f"drill #{step.drill_id} ({step.drill.title}) step {step.step}"
        if problem := _step_problem(step, recorded.get((str(step.drill_id), step.step))):
            yield {"row": row, "problem": problem}


def _step_problem(step, entry):
    if entry is None:
        return f"no {STEP_RECORDED} entry in the journal"
    for field in STEP_FIELDS:
        # The view passes the step's outcome as the entry's own outcome, not as a detail.
        value, said = getattr(step, field), entry.outcome if field == "outcome" else entry.details.get(field)
        if not _same(value, said):
            shown = value.isoformat() if isinstance(value, datetime) else value
            return f"{field} {shown or '(empty)'}, journal entry #{entry.pk} ({STEP_RECORDED}) says {said or '(empty)'}"
    return ""


def _same(value, said):
    """The row's value and the entry's (a time is written in the entry as str(datetime))."""
    if isinstance(value, datetime):
        try:
            return said is not None and datetime.fromisoformat(said) == value
        except (TypeError, ValueError):
            return False
    return (value or "") == (said or "")
