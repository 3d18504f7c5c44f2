"""Four eyes: one DBA requests, another approves; only approved requests run; production is swapped safely."""

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from backupportal.lib import sampledata
from backupportal.models import JournalEntry
from backups.models import BackupRun, Server
from restores.models import RestoreRequest, RestoreRun, ValidationCheck


@pytest.fixture
def good_run(server, passphrase_file, backup_root):
    call_command("backup", "maldives", stdout=StringIO())
    return BackupRun.objects.get(status="succeeded")


def ask(client, user, run, destination="new_database", database="restored_by_request"):
    client.force_login(user)
    return client.post(
        reverse("restore-request-new"),
        {
            "server": run.server_id,
            "backup_run": run.pk,
            "destination": destination,
            "target_database": database,
            "reason": "audit found a bad import",
        },
    )


def test_a_requested_and_approved_restore_runs(client, alice, bob, good_run, sample_cluster):
    response = ask(client, alice, good_run)
    request = RestoreRequest.objects.get()
    assert response.status_code == 302 and request.status == "pending"
    assert not RestoreRun.objects.exists()  # nothing runs before approval

    client.force_login(bob)
    response = client.post(reverse("restore-request-approve", args=[request.pk]), {"note": "ok"}, follow=True)
    assert response.status_code == 200
    request.refresh_from_db()
    assert request.status == "succeeded" and request.decided_by == bob
    restore = RestoreRun.objects.get(request=request)
    assert restore.status == "succeeded"
    with sample_cluster.connect("restored_by_request") as conn:
        assert sampledata.counts(conn) == good_run.details["row_counts"]
    actions = list(
        JournalEntry.objects.filter(object_id=str(request.pk), object_type="restores.RestoreRequest").values_list(
            "action", "actor"
        )
    )
    assert ("restore_requested", "alice") in actions and ("restore_approved", "bob") in actions
    page = client.get(reverse("restore-request", args=[request.pk]))
    assert b"succeeded" in page.content


def test_approving_ones_own_request_is_refused(client, alice, good_run):
    ask(client, alice, good_run)
    request = RestoreRequest.objects.get()
    response = client.post(reverse("restore-request-approve", args=[request.pk]))
    assert response.status_code == 403
    request.refresh_from_db()
    assert request.status == "pending" and not RestoreRun.objects.exists()
    assert JournalEntry.objects.filter(action="restore_approval_refused", actor="alice", outcome="refused").exists()


def test_a_rejected_request_never_runs(client, alice, bob, good_run):
    from restores.tasks import run_request

    ask(client, alice, good_run)
    request = RestoreRequest.objects.get()
    client.force_login(bob)
    client.post(reverse("restore-request-reject", args=[request.pk]), {"note": "wrong backup"})
    request.refresh_from_db()
    assert request.status == "rejected"
    assert "not run" in run_request(request.pk)  # even if a task were enqueued by mistake
    client.post(reverse("restore-request-approve", args=[request.pk]))
    assert not RestoreRun.objects.exists()


def test_an_auditor_can_see_requests_but_neither_ask_nor_decide(client, alice, charlie, good_run):
    ask(client, alice, good_run)
    request = RestoreRequest.objects.get()
    client.force_login(charlie)
    assert client.get(reverse("restore-requests")).status_code == 200
    assert client.get(reverse("restore-request", args=[request.pk])).status_code == 200
    assert b'id="approve"' not in client.get(reverse("restore-request", args=[request.pk])).content
    assert ask(client, charlie, good_run).status_code == 403
    client.force_login(charlie)
    assert client.post(reverse("restore-request-approve", args=[request.pk])).status_code == 403
    assert client.post(reverse("restore-request-reject", args=[request.pk])).status_code == 403


def test_replacing_production_needs_the_name_typed(client, alice, bob, good_run):
    ask(client, alice, good_run, destination="replace", database="")
    request = RestoreRequest.objects.get()
    assert request.target_database == "reliabilitymaldives"
    client.force_login(bob)
    response = client.post(
        reverse("restore-request-approve", args=[request.pk]), {"confirm_database": "reliability"}, follow=True
    )
    assert b"Type the production database name" in response.content
    request.refresh_from_db()
    assert request.status == "pending"


def production_rows(cluster):
    with cluster.connect("reliabilitymaldives") as conn:
        return sampledata.counts(conn)


def test_an_approved_swap_replaces_production_after_a_safety_backup(client, alice, bob, good_run, sample_cluster):
    sample_cluster.execute("DELETE FROM audit_logs WHERE id > 100", dbname="reliabilitymaldives")  # the accident
    ask(client, alice, good_run, destination="replace", database="")
    request = RestoreRequest.objects.get()
    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[request.pk]), {"confirm_database": "reliabilitymaldives"})
    restore = RestoreRun.objects.get(request=request)
    assert restore.status == "succeeded", restore.error
    assert production_rows(sample_cluster) == good_run.details["row_counts"]
    safety = BackupRun.objects.filter(status="succeeded").exclude(pk=good_run.pk).get()
    assert safety.details["row_counts"]["public.audit_logs"] == 100  # production as it was, kept
    kept = [
        r[0]
        for r in sample_cluster.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'reliabilitymaldives_before_%'"
        )
    ]
    assert len(kept) == 1


def test_the_swap_leaves_production_intact_when_validation_fails(client, alice, bob, good_run, sample_cluster):
    ValidationCheck.objects.create(
        server=good_run.server, name="impossible", sql="SELECT count(*) FROM public.roles", expected="999"
    )
    sample_cluster.execute(
        "INSERT INTO roles (name, description) VALUES ('new', 'added after the backup')", dbname="reliabilitymaldives"
    )
    before = production_rows(sample_cluster)
    databases_before = {r[0] for r in sample_cluster.execute("SELECT datname FROM pg_database")}
    ask(client, alice, good_run, destination="replace", database="")
    request = RestoreRequest.objects.get()
    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[request.pk]), {"confirm_database": "reliabilitymaldives"})
    restore = RestoreRun.objects.get(request=request)
    assert restore.status == "failed"
    assert "validation" in restore.error and "impossible" in restore.error and "unchanged" in restore.error
    assert production_rows(sample_cluster) == before
    assert {r[0] for r in sample_cluster.execute("SELECT datname FROM pg_database")} == databases_before
    request.refresh_from_db()
    assert request.status == "failed"


def test_a_swap_whose_kept_name_is_taken_is_refused_before_it_starts_and_never_called_done(
    client, alice, bob, good_run, sample_cluster, monkeypatch
):
    """Production is kept as NAME_before_STAMP: a database of that name already there (planted, the
    stamp is to the second) made the failed rename look done, production closed and the run succeeded."""
    from restores import replace

    monkeypatch.setattr(replace, "working_names", lambda prod, stamp: ("rm_restore_1", "rm_before_1"))
    sample_cluster.execute("CREATE DATABASE rm_before_1")
    ask(client, alice, good_run, destination="replace", database="")
    request = RestoreRequest.objects.get()
    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[request.pk]), {"confirm_database": "reliabilitymaldives"})
    restore = RestoreRun.objects.get(request=request)
    assert restore.status == "failed" and "a database rm_before_1 exists already" in restore.error
    assert "unchanged" in restore.error
    databases = {r[0] for r in sample_cluster.execute("SELECT datname FROM pg_database")}
    assert "reliabilitymaldives" in databases and "rm_restore_1" not in databases
    assert replace._renamed(good_run.server, "rm_before_1", "reliabilitymaldives") is False  # both there: not done


def test_two_decisions_on_one_request_cannot_both_stand(alice, bob, good_run, db):
    from django.core.exceptions import ValidationError

    from tests.helpers import make_user

    request = RestoreRequest.objects.create(
        server=good_run.server, backup_run=good_run, requested_by=alice, destination="new_database",
        target_database="restored", reason="x",
    )  # fmt: skip
    seen_by_carol = RestoreRequest.objects.get(pk=request.pk)  # her page, loaded before bob decided
    RestoreRequest.objects.get(pk=request.pk).approve(bob)
    with pytest.raises(ValidationError, match="decided meanwhile"):
        seen_by_carol.reject(make_user("carol", "DBA"))
    request.refresh_from_db()
    assert request.status == "approved" and request.decided_by == bob


def test_the_command_line_swap_needs_an_approved_request(alice, bob, good_run, sample_cluster):
    with pytest.raises(CommandError, match="needs an approved request"):
        call_command("restore", str(good_run.pk), "--replace")
    request = RestoreRequest.objects.create(
        server=good_run.server,
        backup_run=good_run,
        destination="replace",
        target_database="reliabilitymaldives",
        reason="drill",
        requested_by=alice,
    )
    with pytest.raises(CommandError, match="is pending"):
        call_command("restore", str(good_run.pk), "--replace", "--request", str(request.pk))
    request.approve(bob, confirm_database="reliabilitymaldives")
    out = StringIO()
    call_command("restore", str(good_run.pk), "--replace", "--request", str(request.pk), "--json", stdout=out)
    assert json.loads(out.getvalue().splitlines()[-1])["status"] == "succeeded"
    with pytest.raises(CommandError, match="only an approved request runs, once"):
        call_command("restore", str(good_run.pk), "--replace", "--request", str(request.pk))


def test_a_new_database_that_exists_or_is_production_is_refused_when_asked_not_after_approval(
    client, alice, good_run, sample_cluster
):
    sample_cluster.execute("CREATE DATABASE already_here")
    for name, says in (
        ("reliabilitymaldives", "is maldives's own database: a new database needs a new name"),
        ("already_here", "database already_here already exists on maldives: choose a new name"),
        ("Bad-Name", "is not a valid database name"),
    ):
        response = ask(client, alice, good_run, database=name)
        assert response.status_code == 200, name
        assert says in response.context["form"].errors["target_database"][0]
    # Too long: the field's own line, and no second one about an empty name.
    response = ask(client, alice, good_run, database="x" * 64)
    assert response.context["form"].errors["target_database"] == [
        "Ensure this value has at most 63 characters (it has 64)."
    ]
    assert not RestoreRequest.objects.exists()


def test_a_new_database_on_a_server_that_cannot_be_reached_is_refused_with_why(client, alice, good_run):
    Server.objects.filter(pk=good_run.server_id).update(dsn="postgresql://postgres@127.0.0.1:1/reliabilitymaldives")
    response = ask(client, alice, good_run)
    assert response.status_code == 200
    error = response.context["form"].errors["target_database"][0]
    assert "127.0.0.1" in error and "\n" not in error
    assert not RestoreRequest.objects.exists()


def test_a_request_whose_backup_retention_retired_is_neither_approved_nor_run(
    client, alice, bob, good_run, sample_cluster
):
    """Retention retires a run first and deletes its files after (later still where a location
    refuses): a request approved in between restored from a backup that nothing may restore from."""
    from backups.copies import retire
    from restores.tasks import run_request

    ask(client, alice, good_run, database="after_retention")
    request = RestoreRequest.objects.get()
    retire(good_run, "job:retention")
    good_run.refresh_from_db()
    client.force_login(bob)
    page = client.post(reverse("restore-request-approve", args=[request.pk]), {"note": "ok"}, follow=True)
    request.refresh_from_db()
    assert request.status == "pending" and not RestoreRun.objects.exists()
    assert f"Backup #{good_run.pk} was deleted by retention on" in page.content.decode()

    # Approved before it was retired: the run fails saying why, and nothing is made.
    RestoreRequest.objects.filter(pk=request.pk).update(status="approved", decided_by=bob)
    assert run_request(request.pk) == "failed"
    restore = RestoreRun.objects.get(request=request)
    assert "was deleted by retention on" in restore.error and "nothing restores from it" in restore.error
    request.refresh_from_db()
    assert request.status == "failed"
    assert sample_cluster.execute("SELECT 1 FROM pg_database WHERE datname = 'after_retention'") == []
