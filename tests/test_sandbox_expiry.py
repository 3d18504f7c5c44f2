"""Sandbox clusters of restore requests do not run for ever, against real clusters: the request's
page says whether its sandbox runs, a DBA stops and removes it there, and the hourly sweep
removes those older than SANDBOX_MAX_AGE and keeps the young ones."""

from datetime import timedelta
from pathlib import Path

from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from restores.models import RestoreRequest, RestoreRun
from tests.helpers import ask_sandbox, base_backup, enable_push, postgres_running_in, rows, run_command

pytest_plugins = ["tests.walfixtures"]


def approved_sandbox(client, alice, bob, server, base):
    """Alice asks for a sandbox of the base backup, Bob approves, the worker (inline) restores it."""
    assert ask_sandbox(client, alice, server, run=base).status_code == 302
    request = RestoreRequest.objects.filter(status="pending").get()
    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[request.pk]))
    restore = RestoreRun.objects.get(request=request)
    assert restore.status == "succeeded", restore.error
    return restore


def sandbox_cell(client, restore):
    page = client.get(reverse("restore-request", args=[restore.request_id])).content.decode()
    return page.split(f'id="sandbox-{restore.pk}"')[1].split("</td>")[0]


def test_a_dba_stops_and_removes_a_sandbox_from_its_request_page(
    client, alice, bob, charlie, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root
):
    enable_push(sample_cluster)
    restore = approved_sandbox(client, alice, bob, server, base_backup())
    datadir = Path(restore.into_datadir)
    assert rows(restore.port, "SELECT count(*) > 0 FROM users") == [(True,)]
    client.force_login(alice)
    cell = sandbox_cell(client, restore)
    assert "sandbox running" in cell and f"port {restore.port}" in cell and "Stop and remove sandbox" in cell
    url = reverse("sandbox-remove", args=[restore.pk])

    # The auditor reads the state, gets no button, and a POST is refused.
    client.force_login(charlie)
    assert "sandbox running" in sandbox_cell(client, restore)
    assert "Stop and remove" not in sandbox_cell(client, restore)
    assert client.post(url, {"confirm": "remove"}).status_code == 403
    # A DBA who did not tick the confirmation changes nothing either.
    client.force_login(alice)
    response = client.post(url, follow=True)
    assert "Tick the box to confirm" in response.content.decode()
    assert postgres_running_in(datadir) and datadir.exists()
    assert not JournalEntry.objects.filter(action="sandbox_removed").exists()

    response = client.post(url, {"confirm": "remove"})
    assert response.status_code == 302 and response["Location"] == restore.request.get_absolute_url()
    assert not postgres_running_in(sandbox_root) and not datadir.exists()
    assert "sandbox removed" in sandbox_cell(client, restore)
    entry = JournalEntry.objects.get(action="sandbox_removed")
    assert entry.actor == "alice" and entry.details["was"] == "running"
    assert entry.details["datadir"] == str(datadir) and entry.object_id == str(restore.pk)


def test_the_sweep_removes_an_old_sandbox_keeps_a_young_one_and_runs_hourly(
    client, alice, bob, server, sample_cluster, passphrase_file, backup_root, wal_spool, sandbox_root, settings
):
    from django_q.models import Schedule
    from django_q.tasks import async_task, result

    from backups.tasks import ensure_global_schedules

    enable_push(sample_cluster)
    base = base_backup()
    old = approved_sandbox(client, alice, bob, server, base)
    young = approved_sandbox(client, alice, bob, server, base)
    settings.SANDBOX_MAX_AGE = 72 * 3600
    RestoreRun.objects.filter(pk=old.pk).update(finished_at=timezone.now() - timedelta(hours=73))
    RestoreRun.objects.filter(pk=young.pk).update(finished_at=timezone.now() - timedelta(hours=71))

    listed = run_command("sandboxes")
    assert [(s["restore"], s["state"]) for s in listed["sandboxes"]] == [(old.pk, "running"), (young.pk, "running")]
    assert listed["removed"] == []

    swept = run_command("sandboxes", "--expire")
    assert [s["restore"] for s in swept["removed"]] == [old.pk]
    assert [s["restore"] for s in swept["sandboxes"]] == [young.pk]
    assert not Path(old.into_datadir).exists() and not postgres_running_in(old.into_datadir)
    assert rows(young.port, "SELECT 1") == [(1,)]  # the young one still answers
    entry = JournalEntry.objects.get(action="sandbox_removed")
    assert entry.object_id == str(old.pk) and "older than SANDBOX_MAX_AGE (72 h)" in entry.details["reason"]
    assert run_command("sandboxes", "--expire")["removed"] == []  # nothing twice

    # The schedule the worker runs: hourly, the same sweep; once the young one is old too.
    ensure_global_schedules()
    schedule = Schedule.objects.get(name="sandboxes-expire")
    assert schedule.func == "restores.tasks.expire_sandboxes" and schedule.cron == "20 * * * *"
    settings.SANDBOX_MAX_AGE = 3600
    task = async_task(schedule.func)  # the test settings run tasks inline
    assert result(task) == [young.into_datadir]
    assert not postgres_running_in(sandbox_root) and not any(sandbox_root.iterdir())
    assert list(
        JournalEntry.objects.filter(action="sandbox_removed").order_by("pk").values_list("actor", flat=True)
    ) == [
        entry.actor,
        "job:sandboxes",
    ]
