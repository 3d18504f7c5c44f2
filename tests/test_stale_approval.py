"""Four eyes, found by review: an approval nobody ran within QUEUED_RUN_TIMEOUT replaced
production from the command line, or from the worker come back before the orphan sweep ran; and
one person with two accounts (a local one and the one single sign-on made, one e-mail address)
approved their own request."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.models import BackupRun, ChangeRequest
from restores.models import RestoreRequest
from tests.helpers import make_user, rows


@pytest.fixture
def good_run(server, passphrase_file, backup_root):
    call_command("backup", "maldives", stdout=StringIO())
    return BackupRun.objects.get(status="succeeded")


def replace_approved(good_run, alice, bob, ago):
    request = RestoreRequest.objects.create(
        server=good_run.server, backup_run=good_run, destination="replace", target_database="reliabilitymaldives",
        reason="x", requested_by=alice, into_destination=good_run.server.destination,
    )  # fmt: skip
    request.approve(bob, confirm_database="reliabilitymaldives")
    RestoreRequest.objects.filter(pk=request.pk).update(decided_at=timezone.now() - ago)
    return request


def audit_rows(cluster):
    return rows(cluster.port, "SELECT count(*) FROM audit_logs")[0][0]


def test_the_command_line_refuses_an_approval_nobody_ran_in_time(alice, bob, good_run, sample_cluster):
    sample_cluster.execute("DELETE FROM audit_logs WHERE id > 100", dbname="reliabilitymaldives")
    request = replace_approved(good_run, alice, bob, timedelta(days=30))
    with pytest.raises(CommandError, match=r"approved 43200 minutes ago and never run \(QUEUED_RUN_TIMEOUT\)"):
        call_command("restore", str(good_run.pk), "--replace", "--request", str(request.pk), stdout=StringIO())
    assert audit_rows(sample_cluster) == 100  # production as it is today
    request.refresh_from_db()
    assert request.status == "failed" and "never run" in request.runs.get().error
    failed = JournalEntry.objects.get(action="restore_failed")
    assert failed.actor.startswith("os:")  # who ran the command, not the worker


def test_a_worker_come_back_refuses_an_approval_nobody_ran_in_time(alice, bob, good_run, sample_cluster, settings):
    from restores.tasks import run_request

    sample_cluster.execute("DELETE FROM audit_logs WHERE id > 100", dbname="reliabilitymaldives")
    request = replace_approved(good_run, alice, bob, timedelta(seconds=settings.QUEUED_RUN_TIMEOUT + 60))
    assert run_request(request.pk).startswith("approved 61 minutes ago and never run (QUEUED_RUN_TIMEOUT)")
    assert audit_rows(sample_cluster) == 100
    assert RestoreRequest.objects.get(pk=request.pk).status == "failed"
    assert run_request(request.pk) == f"request #{request.pk} is failed: not run"


def test_an_approval_in_time_still_runs(alice, bob, good_run, sample_cluster):
    sample_cluster.execute("DELETE FROM audit_logs WHERE id > 100", dbname="reliabilitymaldives")
    request = replace_approved(good_run, alice, bob, timedelta(minutes=5))
    call_command("restore", str(good_run.pk), "--replace", "--request", str(request.pk), stdout=StringIO())
    assert audit_rows(sample_cluster) > 100


def other_account_of(user, username):
    other = make_user(username, "DBA")
    other.email = user.email.upper()  # the same person at the identity provider
    other.save()
    return other


def test_two_accounts_of_one_person_are_one_pair_of_eyes(alice, bob, good_run):
    request = RestoreRequest.objects.create(
        server=good_run.server, backup_run=good_run, destination="replace", target_database="reliabilitymaldives",
        reason="x", requested_by=alice, into_destination=good_run.server.destination,
    )  # fmt: skip
    alice_sso = other_account_of(alice, "alice.sso")
    assert not request.awaits_decision_by(alice_sso)
    with pytest.raises(PermissionDenied, match="your other account, same e-mail address"):
        request.approve(alice_sso, confirm_database="reliabilitymaldives")
    with pytest.raises(PermissionDenied):
        request.reject(alice_sso)
    request.approve(bob, confirm_database="reliabilitymaldives")  # another person
    assert request.status == "approved"


def test_a_change_request_is_not_decided_from_the_authors_other_account(alice, good_run):
    kind = ChangeRequest.Kind.SHORTEN_RETENTION
    change = ChangeRequest.open(
        kind, good_run.server, alice, "disk is full", {"base_retention_days": {"from": 30, "to": 7}}
    )
    with pytest.raises(PermissionDenied, match="another account with your e-mail address"):
        change.approve(other_account_of(alice, "alice.sso"))
