"""DR drills: logged on the portal's pages step by step, measured against the server's RTO
objectives, linked to the restore runs they used, and printed as a report."""

from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import Server
from restores.models import DrDrill, DrDrillStep, RestoreRun
from tests.helpers import make_user

DAY = "2026-03-01"
# The eight steps of one drill, local times (Indian/Maldives): start, end.
TIMELINE = {
    "assessment": ("09:00", "09:20"),
    "communication": ("09:10", "09:30"),
    "recovery_environment": ("09:30", "10:15"),
    "database_restore": ("10:15", "11:05"),
    "application_deployment": ("11:05", "11:40"),
    "validation": ("11:40", "12:10"),
    "go_live": ("12:10", "12:30"),
    "post_recovery": ("12:30", "15:00"),
}


@pytest.fixture
def atoll(db):
    return Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/atoll")


@pytest.fixture
def restore_run(atoll):
    """The restore the drill used, as the catalog records it."""
    started = timezone.make_aware(timezone.datetime(2026, 3, 1, 10, 20))
    return RestoreRun.objects.create(
        kind="logical",
        status="succeeded",
        server=atoll,
        into_database="atoll_drill",
        started_at=started,
        finished_at=started + timezone.timedelta(minutes=41),
    )


def log_drill(client, server, title="Annual DR drill 2026"):
    response = client.post(
        reverse("drill-new"),
        {"title": title, "server": server.pk, "scenario": "Primary data centre lost", "started_at": f"{DAY}T09:00"},
    )
    assert response.status_code == 302, response.content.decode()[-1500:]
    return DrDrill.objects.get(title=title)


def record_steps(client, drill, timeline=TIMELINE, who="alice"):
    for step, (start, end) in timeline.items():
        response = client.post(
            reverse("drill-step", args=[drill.pk, step]),
            {"who": who, "started_at": f"{DAY}T{start}", "finished_at": f"{DAY}T{end}", "outcome": "ok", "notes": step},
        )
        assert response.status_code == 302, response.content.decode()[-1500:]


def test_a_drill_with_its_eight_steps_reports_its_recovery_time_against_the_objectives(
    client, alice, charlie, atoll, restore_run
):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    assert [s.step for s in drill.steps.all()] == [name for name, _ in DrDrill.STEPS]
    edit = {
        "title": drill.title,
        "server": atoll.pk,
        "started_at": f"{DAY}T09:00",
        "critical_restored_at": f"{DAY}T11:50",
        "restore_runs": [restore_run.pk],
        "lessons_learned": "The NAS copy was faster to fetch than S3.",
    }
    assert client.post(reverse("drill-edit", args=[drill.pk]), edit).status_code == 302
    record_steps(client, drill)  # the last one completes it: read-only from then on, but for lessons learned

    client.force_login(charlie)  # the auditor reads the report
    report = client.get(reverse("drill-report", args=[drill.pk]))
    assert report.status_code == 200
    times = {t["label"]: t for t in report.context["times"]}
    assert times["Full system"]["measured"] == timezone.timedelta(hours=3, minutes=30)
    assert times["Critical functions"]["measured"] == timezone.timedelta(hours=2, minutes=50)
    assert times["Full system"]["met"] and times["Critical functions"]["met"]
    page = report.content.decode()
    assert "3 h 30 min" in page and "8 h 00 min" in page and "met, 4 h 30 min to spare" in page
    assert "2 h 50 min" in page and "4 h 00 min" in page
    assert all(label in page for _, label in DrDrill.STEPS)
    assert reverse("admin:restores_restorerun_change", args=[restore_run.pk]) in page  # links to the restore run
    assert "The NAS copy was faster" in page and "complete" in page
    # Printable, no navigation on paper: the rules are in a static file (the CSP allows no inline style).
    assert "css/report.css" in page
    assert "@media print" in (Path(settings.BASE_DIR) / "static" / "css" / "report.css").read_text()
    assert client.get(reverse("drill", args=[drill.pk])).status_code == 200


def test_a_drill_that_takes_too_long_misses_the_servers_own_objectives(client, sam, atoll):
    atoll.rto_critical_minutes, atoll.rto_full_minutes = 60, 180
    atoll.save()
    client.force_login(sam)  # Sysadmins log drills too
    drill = log_drill(client, atoll)
    record_steps(client, drill, who="sam")
    times = {t["label"]: t for t in drill.recovery_times()}
    assert times["Full system"]["met"] is False and times["Critical functions"]["met"] is False
    page = client.get(reverse("drill-report", args=[drill.pk])).content.decode()
    assert "missed by 0 h 30 min" in page  # 3 h 30 against 3 h
    assert "critical functions are counted as back at go-live" in page


def test_a_drill_in_progress_says_so_and_a_drill_without_a_server_uses_the_strategys_objectives(client, alice):
    client.force_login(alice)
    response = client.post(reverse("drill-new"), {"title": "Tabletop", "started_at": f"{DAY}T09:00"})
    drill = DrDrill.objects.get(title="Tabletop")
    assert response.status_code == 302 and drill.objectives() == (240, 480)
    record_steps(client, drill, {"assessment": TIMELINE["assessment"]})
    drill.refresh_from_db()
    assert drill.status == "in progress" and drill.full_restored_at is None
    page = client.get(reverse("drill-report", args=[drill.pk])).content.decode()
    assert "not yet" in page and "Objectives: the strategy's" in page


def test_step_times_that_make_no_sense_are_refused_with_a_message(client, alice, atoll):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    url = reverse("drill-step", args=[drill.pk, "validation"])
    backwards = client.post(url, {"started_at": f"{DAY}T11:00", "finished_at": f"{DAY}T10:00"})
    assert backwards.status_code == 200 and "cannot finish before it started" in backwards.content.decode()
    early = client.post(url, {"started_at": f"{DAY}T08:00"})
    assert "cannot start before the disaster was declared" in early.content.decode()
    assert not DrDrillStep.objects.filter(drill=drill, step="validation").exclude(started_at=None).exists()
    unknown = client.post(reverse("drill-step", args=[drill.pk, "panic"]), {}, follow=True)
    assert "has no step" in unknown.content.decode()
    early_critical = client.post(
        reverse("drill-edit", args=[drill.pk]),
        {"title": drill.title, "started_at": f"{DAY}T09:00", "critical_restored_at": f"{DAY}T08:00"},
    )
    assert "cannot be back before the disaster was declared" in early_critical.content.decode()


def test_drills_are_journaled(client, alice, atoll, restore_run):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    record_steps(client, drill, {"go_live": TIMELINE["go_live"]})
    edit = {"title": drill.title, "started_at": f"{DAY}T09:00", "server": atoll.pk, "restore_runs": [restore_run.pk]}
    client.post(reverse("drill-edit", args=[drill.pk]), edit)
    entries = JournalEntry.objects.filter(object_type="restores.DrDrill", object_id=str(drill.pk)).order_by("id")
    assert [(e.action, e.actor, e.server) for e in entries] == [
        ("drill_logged", "alice", "atoll"),
        ("drill_step_recorded", "alice", "atoll"),
        ("drill_changed", "alice", "atoll"),
    ]
    assert entries[1].details["step"] == "go_live" and entries[2].details["restore_runs"] == [restore_run.pk]


def test_auditors_read_drills_and_log_none(client, charlie, alice, atoll):
    client.force_login(alice)
    drill = log_drill(client, atoll)
    client.force_login(charlie)
    assert client.get(reverse("drills")).status_code == 200
    assert client.get(reverse("drill", args=[drill.pk])).status_code == 200
    assert "Record…" not in client.get(reverse("drill", args=[drill.pk])).content.decode()
    assert client.get(reverse("drill-new")).status_code == 403
    assert client.post(reverse("drill-new"), {"title": "x", "started_at": f"{DAY}T09:00"}).status_code == 403
    step = reverse("drill-step", args=[drill.pk, "assessment"])
    assert client.post(step, {"who": "charlie", "started_at": f"{DAY}T09:00"}).status_code == 403
    assert DrDrill.objects.count() == 1 and not drill.steps.exclude(who="").exists()


def test_a_drill_added_in_the_admin_gets_its_eight_steps_and_is_journaled(client, sam):
    client.force_login(sam)
    form = {
        "title": "Admin drill",
        "started_at_0": DAY,
        "started_at_1": "09:00",
        "steps-TOTAL_FORMS": "0",
        "steps-INITIAL_FORMS": "0",
    }
    response = client.post(reverse("admin:restores_drdrill_add"), form)
    assert response.status_code == 302, response.content.decode()[-2000:]
    drill = DrDrill.objects.get(title="Admin drill")
    assert drill.steps.count() == 8 and drill.logged_by == sam
    assert JournalEntry.objects.filter(action="admin_added", object_type="restores.DrDrill", actor="sam").exists()
    assert make_user("x").has_perm("restores.log_drill") is False


def test_a_drill_moves_through_its_states_as_steps_are_recorded(client, alice, atoll):
    client.force_login(alice)
    drill = log_drill(client, atoll)

    def state():
        return DrDrill.objects.prefetch_related("steps").get(pk=drill.pk).status

    assert state() == "planned"
    # Only who and an outcome, no times: the step was entered all the same.
    client.post(reverse("drill-step", args=[drill.pk, "assessment"]), {"who": "alice", "outcome": "ok"})
    assert state() == "in progress"
    page = client.get(reverse("drills")).content.decode()
    assert "<td>in progress</td>" in page
    for step, _ in DrDrill.STEPS:
        outcome = "failed" if step == "validation" else "ok"
        client.post(reverse("drill-step", args=[drill.pk, step]), {"who": "alice", "outcome": outcome})
    assert state() == "complete, 1 step failed"
