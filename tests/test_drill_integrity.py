"""A DR drill is audit evidence: once complete (every step done) its record is read-only, on the
portal's pages and in the admin alike, and its times must make sense: a step does not end
before it starts, nor before the disaster was declared, and a recovery time that does is never
reported as meeting its objective."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import Server
from restores.models import DrDrill, DrDrillStep, RestoreRun
from tests.test_drills import DAY, TIMELINE

READ_ONLY = "is complete: its record is the evidence of the drill and read-only"


@pytest.fixture
def atoll(db):
    return Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/atoll")


def log_drill(client, server, started="09:00"):
    response = client.post(
        reverse("drill-new"), {"title": "Annual DR drill", "server": server.pk, "started_at": f"{DAY}T{started}"}
    )
    assert response.status_code == 302, response.content.decode()[-1500:]
    return DrDrill.objects.get(title="Annual DR drill")


def record(client, drill, step, start, end, outcome="ok"):
    return client.post(
        reverse("drill-step", args=[drill.pk, step]),
        {"who": "alice", "started_at": f"{DAY}T{start}", "finished_at": f"{DAY}T{end}", "outcome": outcome},
    )


def complete(client, drill):
    for step, (start, end) in TIMELINE.items():
        assert record(client, drill, step, start, end).status_code == 302  # the last one completes it


def fresh(drill):
    return DrDrill.objects.prefetch_related("steps").get(pk=drill.pk)


def test_a_complete_drill_is_read_only_on_its_pages(client, alice, atoll):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    complete(client, drill)
    assert fresh(drill).status == "complete"
    recorded = list(DrDrillStep.objects.filter(drill=drill).values())
    entries = JournalEntry.objects.count()

    # The validation step "corrected" after the fact: refused, nothing changed, nothing journaled.
    step = record(client, drill, "validation", "11:40", "11:45", outcome="failed")
    assert step.status_code == 302 and step["Location"] == drill.get_absolute_url()
    assert list(DrDrillStep.objects.filter(drill=drill).values()) == recorded
    assert JournalEntry.objects.count() == entries
    # The edit page takes the lessons learned alone, written once it is over; a declaration moved is not.
    form = client.get(reverse("drill-edit", args=[drill.pk])).content.decode()
    assert 'name="lessons_learned"' in form and 'name="started_at"' not in form
    edit = client.post(
        reverse("drill-edit", args=[drill.pk]),
        {"title": "Annual DR drill", "server": atoll.pk, "started_at": f"{DAY}T10:00", "lessons_learned": "NAS first."},
    )
    assert edit.status_code == 302
    after = DrDrill.objects.get(pk=drill.pk)
    assert after.started_at == drill.started_at and after.lessons_learned == "NAS first."
    assert JournalEntry.objects.latest("pk").action == "drill_changed"

    page = client.get(reverse("drill-step", args=[drill.pk, "validation"]), follow=True).content.decode()
    [message] = [m for m in page.splitlines() if READ_ONLY in m]
    assert "“Annual DR drill” is complete" in message and "log a new drill" in message
    assert "this record is the evidence of the drill and is read-only but for its lessons learned" in page
    assert "Record…" not in page and "Edit the drill…" not in page and "Write the lessons learned…" in page
    report = client.get(reverse("drill-report", args=[drill.pk])).content.decode()
    assert "(record closed, read-only)" in report


def admin_form(drill, **changes):
    """The admin's change form of a drill and its eight steps, as the browser posts it."""
    local = timezone.localtime
    data = {
        "title": drill.title,
        "server": drill.server_id or "",
        "scenario": drill.scenario,
        "started_at_0": f"{local(drill.started_at):%Y-%m-%d}",
        "started_at_1": f"{local(drill.started_at):%H:%M:%S}",
        "lessons_learned": drill.lessons_learned,
        "steps-TOTAL_FORMS": "8",
        "steps-INITIAL_FORMS": "8",
        "steps-MIN_NUM_FORMS": "0",
        "steps-MAX_NUM_FORMS": "1000",
    }
    for i, step in enumerate(drill.steps.all()):
        data |= {f"steps-{i}-id": step.pk, f"steps-{i}-drill": drill.pk, f"steps-{i}-step": step.step}
        data |= {f"steps-{i}-who": step.who, f"steps-{i}-outcome": step.outcome, f"steps-{i}-notes": step.notes}
        for field in ("started_at", "finished_at"):
            when = getattr(step, field)
            data[f"steps-{i}-{field}_0"] = f"{local(when):%Y-%m-%d}" if when else ""
            data[f"steps-{i}-{field}_1"] = f"{local(when):%H:%M:%S}" if when else ""
    return data | changes


def test_the_admin_cannot_change_a_complete_drill_either(client, alice, sam, atoll):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    for step, (start, end) in list(TIMELINE.items())[:-1]:
        record(client, drill, step, start, end)
    client.force_login(sam)
    url = reverse("admin:restores_drdrill_change", args=[drill.pk])
    # In progress: the admin saves it (the form is the one the browser would post).
    assert client.post(url, admin_form(drill, scenario="Primary data centre lost")).status_code == 302

    client.force_login(alice)
    record(client, drill, "post_recovery", *TIMELINE["post_recovery"])
    client.force_login(sam)
    rewritten = admin_form(drill, scenario="A quiet rehearsal", **{"steps-5-outcome": "failed"})
    response = client.post(url, rewritten)
    assert response.status_code == 200 and READ_ONLY in response.content.decode()
    drill = fresh(drill)
    assert drill.scenario == "Primary data centre lost" and drill.step("validation").outcome == "ok"


def test_the_admin_cannot_relink_a_complete_drills_restore_runs_nor_rename_its_steps(client, alice, sam, atoll):
    """Found by review: the admin re-linked a complete drill's restore runs (a many-to-many the
    model's clean cannot see) and could swap its steps' names."""
    client.force_login(alice)
    drill = log_drill(client, atoll)
    complete(client, drill)
    other = RestoreRun.objects.create(kind="logical", server=atoll)
    client.force_login(sam)
    url = reverse("admin:restores_drdrill_change", args=[drill.pk])
    response = client.post(url, admin_form(fresh(drill), restore_runs=[other.pk]))
    assert response.status_code == 200 and READ_ONLY in response.content.decode()
    assert list(fresh(drill).restore_runs.all()) == []
    names = [step.step for step in fresh(drill).steps.all()]
    swapped = admin_form(fresh(drill), **{"steps-0-step": names[1], "steps-1-step": names[0]})
    assert client.post(url, swapped).status_code in (200, 302)
    assert [step.step for step in fresh(drill).steps.all()] == names


def test_an_end_before_the_start_is_refused_naming_the_step(client, alice, atoll):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    response = record(client, drill, "database_restore", "11:00", "10:00")
    assert response.status_code == 200
    [error] = response.context["form"].errors["finished_at"]
    assert error == (
        "Database restore cannot finish before it started (2026-03-01 11:00): "
        "give a finish at or after the start, or correct the start."
    )
    assert not drill.steps.exclude(started_at=None).exists()


def test_a_declaration_moved_after_a_recorded_step_is_refused(client, alice, atoll):
    """Otherwise the go-live would end before the disaster was declared: a negative recovery time."""
    client.force_login(alice)
    drill = log_drill(client, atoll)
    record(client, drill, "assessment", "09:00", "09:20")
    response = client.post(
        reverse("drill-edit", args=[drill.pk]), {"title": drill.title, "server": atoll.pk, "started_at": f"{DAY}T10:00"}
    )
    assert response.status_code == 200
    [error] = response.context["form"].errors["started_at"]
    assert error == (
        "Assessment started at 2026-03-01 09:00, before this declaration: "
        "declare the disaster at 2026-03-01 09:00 or earlier, or correct that step."
    )
    assert DrDrill.objects.get(pk=drill.pk).started_at == drill.started_at


def test_a_recovery_time_that_is_negative_or_missing_never_meets_its_objective(client, alice, charlie, atoll):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    record(client, drill, "go_live", "12:10", "12:30")
    # Times recorded before these checks, or written straight to the database: go-live "ended"
    # an hour before the disaster was declared.
    DrDrill.objects.filter(pk=drill.pk).update(started_at=drill.started_at + timedelta(hours=4, minutes=30))
    times = {t["label"]: t for t in fresh(drill).recovery_times()}
    assert times["Full system"]["measured"] == -timedelta(hours=1)
    assert times["Full system"]["met"] is None and times["Full system"]["impossible"]
    assert times["Critical functions"]["met"] is None  # counted at go-live, as no earlier time was recorded

    client.force_login(charlie)
    page = client.get(reverse("drill-report", args=[drill.pk])).content.decode()
    assert "ends before the disaster was declared: correct the times" in page and "met," not in page  # in progress

    # Go-live given an outcome but no end: nothing measured, nothing met.
    DrDrillStep.objects.filter(drill=drill, step="go_live").update(started_at=None, finished_at=None)
    times = {t["label"]: t for t in fresh(drill).recovery_times()}
    assert times["Full system"]["measured"] is None and times["Full system"]["met"] is None


def test_lessons_learned_are_written_after_the_drill_on_its_page_and_in_the_admin(client, alice, sam, atoll):
    """Even for a closed drill whose times were recorded wrong before these checks: its recorded
    times are not judged again when only its lessons change (it was a 500)."""
    client.force_login(alice)
    drill = log_drill(client, atoll)
    complete(client, drill)
    # Recorded before the checks: the declaration after the go-live.
    DrDrill.objects.filter(pk=drill.pk).update(started_at=drill.started_at + timedelta(hours=4, minutes=30))
    response = client.post(reverse("drill-edit", args=[drill.pk]), {"lessons_learned": "Fetch from the NAS first."})
    assert response.status_code == 302
    assert DrDrill.objects.get(pk=drill.pk).lessons_learned == "Fetch from the NAS first."
    page = client.get(reverse("drill", args=[drill.pk])).content.decode()
    assert "the times were recorded wrong; log a new drill" in page

    client.force_login(sam)
    drill = fresh(drill)
    url = reverse("admin:restores_drdrill_change", args=[drill.pk])
    assert client.post(url, admin_form(drill, lessons_learned="And test the S3 path too.")).status_code == 302
    assert DrDrill.objects.get(pk=drill.pk).lessons_learned == "And test the S3 path too."


def test_a_step_or_a_recovery_recorded_in_the_future_is_refused(client, alice, atoll):
    """A drill complete with go-live "tomorrow" is a record of what has not happened, read-only at once."""
    client.force_login(alice)
    today = timezone.localtime().replace(second=0, microsecond=0) - timedelta(minutes=5)
    drill = DrDrill.objects.create(title="Annual DR drill", server=atoll, logged_by=alice, started_at=today)
    tomorrow = today + timedelta(days=1)
    response = client.post(
        reverse("drill-step", args=[drill.pk, "go_live"]),
        {
            "who": "alice",
            "started_at": f"{today:%Y-%m-%dT%H:%M}",
            "finished_at": f"{tomorrow:%Y-%m-%dT%H:%M}",
            "outcome": "ok",
        },
    )
    assert response.status_code == 200
    [error] = response.context["form"].errors["finished_at"]
    assert error.startswith("Go-live cannot finish in the future (") and error.endswith("): give the time it finished.")
    assert not drill.steps.exclude(finished_at=None).exists()

    response = client.post(
        reverse("drill-edit", args=[drill.pk]),
        {
            "title": drill.title,
            "server": atoll.pk,
            "started_at": f"{today:%Y-%m-%dT%H:%M}",
            "critical_restored_at": f"{tomorrow:%Y-%m-%dT%H:%M}",
        },
    )
    assert response.status_code == 200
    [error] = response.context["form"].errors["critical_restored_at"]
    assert error.startswith("Critical functions cannot be back in the future (")
    assert DrDrill.objects.get(pk=drill.pk).critical_restored_at is None

    # Declared for tomorrow: a planned drill, whose steps have no outcome before it begins.
    planned = DrDrill.objects.create(title="Next drill", server=atoll, logged_by=alice, started_at=tomorrow)
    response = client.post(reverse("drill-step", args=[planned.pk, "assessment"]), {"who": "alice", "outcome": "ok"})
    assert response.status_code == 200
    assert response.context["form"].errors["outcome"] == [
        f"The disaster is declared for {tomorrow:%Y-%m-%d %H:%M}: record Assessment once it has happened."
    ]
    assert fresh(planned).status == "planned"


def test_a_drill_links_only_restores_run_since_its_declaration(client, alice, sam, atoll):
    """A restore queued and never run, or one run months before the disaster was declared, is no
    restore of this drill: listed under "Restore runs used", it made a drill of a restore that
    never happened."""
    client.force_login(alice)
    drill = log_drill(client, atoll)  # declared 2026-03-01 09:00
    declared = drill.started_at
    never_ran = RestoreRun.objects.create(kind="logical", server=atoll)
    months_before = RestoreRun.objects.create(
        kind="logical", server=atoll, status="succeeded", started_at=declared - timedelta(days=60)
    )
    during = RestoreRun.objects.create(
        kind="logical", server=atoll, status="succeeded", started_at=declared + timedelta(hours=1)
    )
    edit = {"title": drill.title, "server": atoll.pk, "started_at": f"{DAY}T09:00"}
    for run, says in [
        (never_ran, f"Restore run #{never_ran.pk} never started: link the restores run during the drill."),
        (
            months_before,
            f"Restore run #{months_before.pk} started at 2025-12-31 09:00, before the disaster was declared "
            "(2026-03-01 09:00): link the restores run during the drill.",
        ),
    ]:
        response = client.post(reverse("drill-edit", args=[drill.pk]), edit | {"restore_runs": [run.pk, during.pk]})
        assert response.status_code == 200
        assert response.context["form"].errors["restore_runs"] == [says]
        assert not fresh(drill).restore_runs.exists()
        client.force_login(sam)  # the admin says the same
        response = client.post(
            reverse("admin:restores_drdrill_change", args=[drill.pk]), admin_form(fresh(drill), restore_runs=[run.pk])
        )
        assert response.status_code == 200 and says in response.content.decode()
        assert not fresh(drill).restore_runs.exists()
        client.force_login(alice)
    response = client.post(reverse("drill-edit", args=[drill.pk]), edit | {"restore_runs": [during.pk]})
    assert response.status_code == 302 and list(fresh(drill).restore_runs.all()) == [during]


def test_a_step_filled_in_in_the_admin_is_journaled_and_agrees_with_the_evidence_pack(client, alice, sam, atoll):
    """The evidence pack checks each step's row against its drill_step_recorded entry: a step the
    admin filled in was journaled only as "admin_changed", without its times, and read as a row
    changed behind the journal's back."""
    from watching.evidence import Period
    from watching.evidence_rows import check

    client.force_login(alice)
    drill = log_drill(client, atoll)
    client.force_login(sam)
    changes = {"steps-0-who": "sam", "steps-0-outcome": "issues"}
    changes |= {"steps-0-started_at_0": DAY, "steps-0-started_at_1": "09:05:00"}
    changes |= {"steps-0-finished_at_0": DAY, "steps-0-finished_at_1": "09:20:00"}
    response = client.post(reverse("admin:restores_drdrill_change", args=[drill.pk]), admin_form(drill, **changes))
    assert response.status_code == 302, response.content.decode()[-1500:]
    entry = JournalEntry.objects.filter(action="drill_step_recorded").get()
    assert entry.actor == "sam" and entry.details["step"] == "assessment" and entry.outcome == "issues"
    day = timezone.localdate(drill.started_at)
    assert check(Period(day, day)) == {
        "checked": {"backup runs": 0, "restore tests": 0, "drill steps": 1},
        "differ": [],
    }
