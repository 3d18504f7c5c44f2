"""Schedules that cannot break: crons checked as django-q2 runs them, and a server's schedules
kept in step with it (added, renamed, deleted) whichever way it was changed.

Alice is a DBA: she edits schedules. Sam is a sysadmin: he adds, renames and removes servers.
"""

from datetime import timedelta
from io import StringIO

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db.models import ProtectedError
from django.urls import reverse
from django.utils import dateformat, timezone
from django_q.models import Schedule
from django_q.scheduler import scheduler

from backupportal.lib.cron import cron_problem, in_words, next_runs
from backupportal.models import JournalEntry
from backups.apps import sync_locations
from backups.models import BackupRun, BackupSchedule, ChangeRequest, Server
from backups.tasks import scheduled_job
from tests.adminform_helpers import admin_form_data

DEFAULT_JOBS = {"logical", "restoretest", "restoretest_monthly"}


def q_rows(server_name):
    """{job: (cron, args)} of django-q2's rows for a server."""
    rows = Schedule.objects.filter(name__endswith=f":{server_name}")
    return {q.name.split(":")[0]: (q.cron, q.args) for q in rows}


@pytest.mark.parametrize(
    "cron, problem",
    [
        ("0 2 * * *", None),
        ("0 3 29 2 *", None),  # 29 February: within four years
        ("0 3 * * 0#1", None),  # the first Sunday
        ("0 8,14,20 * * *", None),
        ("0 0 30 2 *", "'0 0 30 2 *' never fires: month 2 has no day 30"),
        ("0 0 31 4,6 *", "never fires: month 4,6 has no day 31"),
        ("0 25 * * *", "hour 25 is out of range 0-23"),
        ("61 2 * * *", "minute 61 is out of range 0-59"),
        ("0 2 * 13 *", "month 13 is out of range 1-12"),
        ("0 2 0 * *", "day-of-month 0 is out of range 1-31"),
        ("0 2 * * 8", "day-of-week 8 is out of range 0-7"),
        ("0 2 * * * *", "it has 6 fields, use five"),  # croniter reads a sixth field as seconds
        ("@daily", "it has 1 field, use five"),
        ("*/0 * * * *", "minute '*/0' is not understood"),
    ],
)
def test_crons_are_checked_as_django_q2_will_run_them(cron, problem):
    found = cron_problem(cron)
    if problem is None:
        assert found is None
    else:
        assert problem in found and "\n" not in found


def test_a_refused_cron_in_the_admin_changes_nothing_and_names_the_field(client, alice, server):
    client.force_login(alice)
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    url = reverse("admin:backups_backupschedule_change", args=[schedule.pk])
    for cron, problem in [
        ("0 0 30 2 *", "never fires: month 2 has no day 30"),
        ("0 25 * * *", "hour 25 is out of range 0-23"),
        ("*/30 * * * * *", "it has 6 fields, use five"),
    ]:
        response = client.post(url, admin_form_data(client, url, cron=cron))
        assert response.status_code == 200
        assert problem in response.content.decode()
    schedule.refresh_from_db()
    assert schedule.cron == "0 2 * * *"
    assert q_rows("maldives")["logical"][0] == "0 2 * * *"
    assert not JournalEntry.objects.filter(action="schedule_changed").exists()


def test_a_valid_change_in_the_admin_reaches_django_q2_and_is_journaled(client, alice, bob, server):
    client.force_login(alice)
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    url = reverse("admin:backups_backupschedule_change", args=[schedule.pk])
    # Once in four years fires less often than daily: it waits for another DBA's approval.
    form = admin_form_data(client, url, cron="0 3 29 2 *", change_reason="leap days only")
    assert client.post(url, form).status_code == 302
    assert Schedule.objects.get(name="logical:maldives").cron == "0 2 * * *"
    ChangeRequest.objects.get().approve(bob)
    q = Schedule.objects.get(name="logical:maldives")
    assert q.cron == "0 3 29 2 *"
    moment = timezone.localtime(q.next_run)
    assert (moment.month, moment.day, moment.hour) == (2, 29, 3)
    entry = JournalEntry.objects.get(action="schedule_changed")
    assert entry.actor == "alice (approved by bob)" and entry.details["cron"] == "0 3 29 2 *"


def test_the_server_page_refuses_a_cron_that_never_fires(client, alice, server):
    client.force_login(alice)
    response = client.post(
        reverse("schedule-edit", args=[server.name]),
        {"job": "logical", "cron": "0 0 30 2 *", "enabled": "on"},
        follow=True,
    )
    assert "never fires: month 2 has no day 30" in response.content.decode()
    assert q_rows("maldives")["logical"][0] == "0 2 * * *"


def test_the_schedule_list_shows_a_row_saved_before_crons_were_checked(client, alice, server):
    BackupSchedule.objects.filter(server=server, job="logical").update(cron="0 0 30 2 *")
    client.force_login(alice)
    response = client.get(reverse("admin:backups_backupschedule_changelist"))
    assert response.status_code == 200
    assert "never: &#x27;0 0 30 2 *&#x27; never fires" in response.content.decode()


def test_a_server_added_in_the_admin_gets_its_schedules(client, sam, sample_cluster, db):
    client.force_login(sam)
    url = reverse("admin:backups_server_add")
    form = admin_form_data(client, url, name="atoll", dsn=sample_cluster.dsn("reliabilitymaldives"))
    assert client.post(url, form).status_code == 302
    atoll = Server.objects.get(name="atoll")
    assert set(atoll.schedules.values_list("job", flat=True)) == DEFAULT_JOBS
    assert q_rows("atoll")["logical"] == ("0 2 * * *", "('atoll', 'logical')")
    assert set(q_rows("atoll")) == DEFAULT_JOBS


def test_switching_archiving_on_adds_its_jobs(server):
    server.archiving = Server.Archiving.PUSH
    server.save(update_fields=["archiving"])
    assert set(q_rows("maldives")) == DEFAULT_JOBS | {"base", "incremental", "ingestwal"}


def test_schedules_follow_a_server_renamed_in_the_admin_and_still_run(
    client, sam, server, passphrase_file, backup_root
):
    client.force_login(sam)
    url = reverse("admin:backups_server_change", args=[server.pk])
    assert client.post(url, admin_form_data(client, url, name="male")).status_code == 302
    assert q_rows("maldives") == {}
    rows = q_rows("male")
    assert set(rows) == DEFAULT_JOBS and rows["logical"] == ("0 2 * * *", "('male', 'logical')")
    entry = JournalEntry.objects.get(action="schedules_renamed")
    assert entry.details["renamed_from"] == "maldives" and entry.server == "male"
    # 02:00 comes: django-q2's scheduler finds the job due and the backup of the renamed server runs.
    Schedule.objects.update(next_run=timezone.now() + timedelta(days=1))
    Schedule.objects.filter(name="logical:male").update(next_run=timezone.now() - timedelta(minutes=1))
    scheduler()  # the test settings run the task inline
    run = BackupRun.objects.get()
    assert (run.server.name, run.trigger, run.status) == ("male", "scheduled", "succeeded")


def test_deleting_a_server_takes_its_schedules_with_it(server):
    assert set(q_rows("maldives")) == DEFAULT_JOBS
    server.delete()
    assert q_rows("maldives") == {}
    assert not BackupSchedule.objects.exists()
    entry = JournalEntry.objects.get(action="schedules_removed")
    assert entry.server == "maldives"
    assert entry.details["removed"] == sorted(f"{job}:maldives" for job in DEFAULT_JOBS)


def test_a_server_with_backups_is_not_deleted_and_keeps_its_schedules(server):
    BackupRun.objects.create(server=server, kind="logical", status="succeeded")
    with pytest.raises(ProtectedError):
        server.delete()
    assert set(q_rows("maldives")) == DEFAULT_JOBS
    assert not JournalEntry.objects.filter(action="schedules_removed").exists()


def test_deleting_one_schedule_stops_its_job(server):
    BackupSchedule.objects.get(server=server, job="restoretest").delete()
    assert set(q_rows("maldives")) == DEFAULT_JOBS - {"restoretest"}


def test_migrate_removes_jobs_left_behind_by_an_earlier_rename(server):
    # As a rename left them before schedules followed servers: the job failed with DoesNotExist.
    Schedule.objects.create(
        name="logical:oldname",
        func="backups.tasks.scheduled_job",
        args="('oldname', 'logical')",
        schedule_type=Schedule.CRON,
        cron="0 2 * * *",
        repeats=-1,
    )
    sync_locations(sender=apps.get_app_config("backups"))  # what every migrate runs
    assert q_rows("oldname") == {}
    assert set(q_rows("maldives")) == DEFAULT_JOBS


def test_a_job_left_behind_by_an_earlier_rename_says_so_and_goes(db):
    Schedule.objects.create(
        name="logical:oldname",
        func="backups.tasks.scheduled_job",
        args="('oldname', 'logical')",
        schedule_type=Schedule.CRON,
        cron="0 2 * * *",
        repeats=-1,
    )
    with pytest.raises(LookupError, match="no server is named oldname: its logical schedule was left behind"):
        scheduled_job("oldname", "logical")
    assert q_rows("oldname") == {}


def test_addserver_s_schedules_come_from_the_same_place(sample_cluster, db):
    call_command("addserver", "atoll", "--dsn", sample_cluster.dsn("reliabilitymaldives"), stdout=StringIO())
    assert set(q_rows("atoll")) == DEFAULT_JOBS


@pytest.mark.parametrize(
    "cron, words",
    [
        ("0 2 * * *", "at 02:00, every day"),
        ("30 3 * * 0", "at 03:30, on Sunday"),
        ("*/15 * * * *", "every 15 minutes, every day"),
        ("15 */6 * * 1-5", "every 6 hours at minute 15, on Monday to Friday"),
        ("0 1,13 * * *", "at 01:00 and 13:00, every day"),
        ("0 5 1,15 1,7 *", "at 05:00, on days 1 and 15 of the month, in January and July"),
        ("0 0 L * *", "at 00:00, on the last day of the month"),
        ("0 3 1 * 0", "at 03:00, on day 1 of the month or on Sunday"),
        ("0-10 2 * * *", "at minute 0-10 of hour 2, every day"),
    ],
)
def test_a_cron_is_said_in_words(cron, words):
    assert in_words(cron) == words


def test_the_server_page_says_each_schedule_in_words_with_its_next_three_runs(client, alice, server):
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    schedule.cron = "30 3 * * 0"
    schedule.save()
    after = timezone.localtime().replace(year=2026, month=12, day=3, hour=12, minute=0)
    assert [t.strftime("%a %d %b %H:%M") for t in next_runs(schedule.cron, after=after)] == [
        "Sun 06 Dec 03:30",
        "Sun 13 Dec 03:30",
        "Sun 20 Dec 03:30",
    ]
    client.force_login(alice)
    page = client.get(reverse("server", args=[server.name])).content.decode()
    assert "at 03:30, on Sunday" in page
    for moment in next_runs(schedule.cron):  # its next three runs, in the portal's time zone
        assert dateformat.format(moment, "D Y-m-d H:i") in page
    schedule.enabled = False
    schedule.save()
    page = client.get(reverse("server", args=[server.name])).content.decode()
    assert "at 03:30, on Sunday (disabled)" in page


def test_a_refused_cron_names_the_field_that_is_wrong():
    assert "hour 25 is out of range 0-23" in cron_problem("0 25 * * *")
    assert "minute 60 is out of range 0-59" in cron_problem("60 1 * * *")
    assert "day-of-week 8 is out of range 0-7" in cron_problem("0 1 * * 8")


@pytest.mark.parametrize("archiving", ["push", "pull"])
def test_a_server_that_archives_wal_is_not_renamed(client, sam, server, archiving):
    """Found by a probe: a Sysadmin's rename of an archiving server, saved at once, cut production off
    from its archive: archive_command wrote into the old name's spool, which the ingest no longer
    read; a pull server's old slot pinned production's WAL. Refused, saying what to do."""
    server.archiving = archiving
    server.save(update_fields=["archiving"])
    client.force_login(sam)
    url = reverse("admin:backups_server_change", args=[server.pk])
    response = client.post(url, admin_form_data(client, url, name="male"))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["name"]
    assert (
        errors[0].startswith("maldives archives WAL under its name (its spool ")
        and "Turn its archiving off" in errors[0]
    )
    server.refresh_from_db()
    assert server.name == "maldives" and set(q_rows("maldives")) and not q_rows("male")
