"""A restore request is approved for a place (HOST:PORT), not for a server's name.

A Sysadmin may point a server's DSN at another host or port at any time. Alice asks for
production's backup to be restored into "scratch"; the request records where scratch's DSN
reaches then, Bob approves that place, and the worker restores there or nowhere: a DSN moved
since fails the run with one line naming both places, and nothing is made on either cluster.
"""

from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.urls import reverse

from backupportal.lib import sampledata
from backupportal.models import JournalEntry
from backups.models import BackupRun, Server
from restores.logical import run_logical
from restores.models import RestoreRequest, RestoreRun
from restores.tasks import run_request
from tests.helpers import register


@pytest.fixture
def good_run(server, passphrase_file, backup_root):
    call_command("backup", "maldives", stdout=StringIO())
    return BackupRun.objects.get(status="succeeded")


@pytest.fixture
def scratch_cluster(pg_cluster_of):
    return pg_cluster_of(15)


@pytest.fixture
def scratch(scratch_cluster, db):
    """Another registered server, where DBAs restore copies of production."""
    return register(scratch_cluster, name="scratch", dbname="postgres")


@pytest.fixture
def elsewhere(pg_cluster_of):
    """A cluster a Sysadmin points scratch's DSN at."""
    return pg_cluster_of(15)


def ask(client, user, run, into_server=None, destination="new_database", database="restored_by_request"):
    client.force_login(user)
    response = client.post(
        reverse("restore-request-new"),
        {
            "server": run.server_id,
            "backup_run": run.pk,
            "destination": destination,
            "target_database": database,
            "into_server": into_server.pk if into_server else "",
            "reason": "a copy for the auditors",
        },
    )
    assert response.status_code == 302, response.context["form"].errors
    return RestoreRequest.objects.latest("pk")


def move(server, cluster):
    """What a Sysadmin's edit of the DSN in the admin does to a server that receives no restore tests."""
    Server.objects.filter(pk=server.pk).update(dsn=cluster.dsn(server.dbname))


def what_is_on(cluster):
    databases = {r[0] for r in cluster.execute("SELECT datname FROM pg_database")}
    return databases, {r[0] for r in cluster.execute("SELECT rolname FROM pg_roles")}


def test_the_request_records_where_it_restores_and_the_approver_sees_it(client, alice, bob, good_run, scratch):
    into_scratch = ask(client, alice, good_run, into_server=scratch)
    beside = ask(client, alice, good_run, database="beside_production")
    assert into_scratch.into_destination == scratch.destination != good_run.server.destination
    assert beside.into_destination == good_run.server.destination
    assert JournalEntry.objects.filter(action="restore_requested", details__into=scratch.destination).exists()

    client.force_login(bob)
    page = client.get(reverse("restore-request", args=[into_scratch.pk])).content.decode()
    assert f'on scratch at <code id="into-destination">{scratch.destination}</code>' in page
    assert 'id="approve"' in page and 'id="destination-moved"' not in page
    page = client.get(reverse("restore-request", args=[beside.pk])).content.decode()
    assert f'on maldives at <code id="into-destination">{good_run.server.destination}</code>' in page
    listed = client.get(reverse("restore-requests")).content.decode()
    assert f"on scratch at <code>{scratch.destination}</code>" in listed


def test_a_request_whose_server_moved_after_approval_fails_and_restores_nothing(
    client, alice, bob, good_run, sample_cluster, scratch, scratch_cluster, elsewhere
):
    request = ask(client, alice, good_run, into_server=scratch)
    approved_at = scratch.destination
    request.approve(bob)
    before = {"production": what_is_on(sample_cluster), "scratch": what_is_on(scratch_cluster)}
    before["elsewhere"] = what_is_on(elsewhere)
    move(scratch, elsewhere)

    assert run_request(request.pk) == "failed"
    request.refresh_from_db()
    restore = RestoreRun.objects.get(request=request)
    assert request.status == "failed" and restore.status == "failed"
    moved_to = f"{elsewhere.host}:{elsewhere.port}"
    assert restore.error == (
        f"scratch was at {approved_at} when restore request #{request.pk} was made; its DSN now reaches "
        f"{moved_to}: nothing was restored; ask for the restore again and have another DBA approve it there"
    )
    after = {"production": what_is_on(sample_cluster), "scratch": what_is_on(scratch_cluster)}
    after["elsewhere"] = what_is_on(elsewhere)
    assert after == before
    assert JournalEntry.objects.filter(action="restore_failed", details__error=restore.error).exists()
    client.force_login(bob)
    assert restore.error in client.get(reverse("restore-request", args=[request.pk])).content.decode()


def test_the_approver_is_told_when_the_server_moved_since_the_request(
    client, alice, bob, good_run, scratch, scratch_cluster, elsewhere
):
    request = ask(client, alice, good_run, into_server=scratch)
    move(scratch, elsewhere)
    client.force_login(bob)
    page = client.get(reverse("restore-request", args=[request.pk])).content.decode()
    assert 'id="destination-moved"' in page and f"{elsewhere.host}:{elsewhere.port}" in page

    before = what_is_on(elsewhere), what_is_on(scratch_cluster)
    client.post(reverse("restore-request-approve", args=[request.pk]), {"note": "ok"})
    request.refresh_from_db()
    assert request.status == "failed"
    assert "nothing was restored" in RestoreRun.objects.get(request=request).error
    assert (what_is_on(elsewhere), what_is_on(scratch_cluster)) == before


def test_a_request_whose_server_did_not_move_restores_there(
    client, alice, bob, good_run, scratch, scratch_cluster, elsewhere
):
    request = ask(client, alice, good_run, into_server=scratch)
    request.approve(bob)
    assert run_request(request.pk) in ("succeeded", "succeeded with warnings")
    with scratch_cluster.connect("restored_by_request") as conn:
        assert sampledata.counts(conn) == good_run.details["row_counts"]
    assert "restored_by_request" not in what_is_on(elsewhere)[0]


def test_replacing_production_after_its_dsn_moved_fails_and_touches_nothing(
    alice, bob, good_run, sample_cluster, elsewhere
):
    request = replace_request(good_run, alice)
    assert request.into_destination == good_run.server.destination
    request.approve(bob, confirm_database="reliabilitymaldives")
    before = what_is_on(sample_cluster), what_is_on(elsewhere)
    move(good_run.server, elsewhere)

    assert run_request(request.pk) == "failed"
    request.refresh_from_db()
    restore = RestoreRun.objects.get(request=request)
    assert request.status == "failed" and restore.kind == "replace"
    assert restore.error.startswith(f"maldives was at {request.into_destination} when restore request #")
    assert (what_is_on(sample_cluster), what_is_on(elsewhere)) == before
    assert not BackupRun.objects.exclude(pk=good_run.pk).exists()  # not even a safety backup


def test_the_command_line_replace_of_a_moved_server_is_refused_too(alice, bob, good_run, sample_cluster, elsewhere):
    request = replace_request(good_run, alice)
    request.approve(bob, confirm_database="reliabilitymaldives")
    before = what_is_on(sample_cluster), what_is_on(elsewhere)
    move(good_run.server, elsewhere)

    with pytest.raises(CommandError) as refused:
        call_command("restore", str(good_run.pk), "--replace", "--request", str(request.pk), stdout=StringIO())

    assert str(refused.value).startswith(f"maldives was at {request.into_destination} when restore request #")
    assert str(refused.value).endswith(
        "nothing was restored; ask for the restore again and have another DBA approve it"
    )
    request.refresh_from_db()
    assert request.status == "approved"  # not used up: nothing ran
    assert (what_is_on(sample_cluster), what_is_on(elsewhere)) == before


def test_a_held_server_refuses_to_connect_elsewhere_in_one_line(
    client, alice, good_run, scratch, scratch_cluster, elsewhere
):
    """The worker's second guard: the server object it restores into connects only to the recorded
    place, whatever its DSN says by then."""
    request = ask(client, alice, good_run, into_server=scratch)
    target = request.restores_into()
    target.dsn = elsewhere.dsn("postgres")
    before = what_is_on(elsewhere), what_is_on(scratch_cluster)

    restore = run_logical(good_run, target, "restored_by_request", "alice")
    assert restore.status == "failed"
    assert "\n" not in restore.error and scratch.destination in restore.error
    assert f"{elsewhere.host}:{elsewhere.port}" in restore.error
    assert (what_is_on(elsewhere), what_is_on(scratch_cluster)) == before


def test_a_request_approved_before_destinations_were_recorded_runs_as_it_did(
    client, alice, bob, good_run, scratch, elsewhere
):
    request = ask(client, alice, good_run, into_server=scratch)
    request.approve(bob)
    RestoreRequest.objects.filter(pk=request.pk).update(into_destination="")
    move(scratch, elsewhere)
    assert run_request(request.pk) in ("succeeded", "succeeded with warnings")
    assert "restored_by_request" in what_is_on(elsewhere)[0]


def replace_request(good_run, alice):
    """Alice's request to replace production from `good_run`, waiting for approval."""
    return RestoreRequest.objects.create(
        server=good_run.server,
        backup_run=good_run,
        destination="replace",
        target_database="reliabilitymaldives",
        reason="drill",
        requested_by=alice,
    )


def test_no_request_goes_unheld_when_its_targets_dsn_cannot_be_read(client, alice, bob, good_run, scratch):
    """The request records HOST:PORT when it is made: one made while the DSN could not be read
    would run wherever the DSN reaches once fixed, unseen by its approver."""
    Server.objects.filter(pk=scratch.pk).update(dsn="host=")  # what no libpq reads
    client.force_login(alice)
    response = client.post(
        reverse("restore-request-new"),
        {
            "server": good_run.server_id,
            "backup_run": good_run.pk,
            "destination": "new_database",
            "target_database": "restored_by_request",
            "into_server": scratch.pk,
            "reason": "a copy for the auditors",
        },
    )
    assert response.status_code == 200 and not RestoreRequest.objects.exists()
    assert response.context["form"].non_field_errors() == [
        "scratch's DSN cannot be read: fix it (manage.py checkserver scratch) and ask again."
    ]
    # One that got in unheld all the same (a pending one from before destinations were recorded).
    unheld = RestoreRequest.objects.create(
        server=good_run.server, backup_run=good_run, destination="new_database", target_database="x",
        into_server=Server.objects.get(pk=scratch.pk), reason="r", requested_by=alice,
    )  # fmt: skip
    assert unheld.into_destination == ""
    with pytest.raises(ValidationError, match=f"Request #{unheld.pk} names no HOST:PORT to restore into"):
        unheld.approve(bob)
    unheld.refresh_from_db()
    assert unheld.status == "pending"
