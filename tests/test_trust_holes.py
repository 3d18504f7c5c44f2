"""Holes a security review found in whom the portal trusts, closed.

- Where a server's restore tests restore (its sandbox, or itself) decides who receives its newest
  backup, decrypted. Choosing it waits for a DBA's approval: Sam, a Sysadmin, edits servers but
  may neither ask for a restore nor approve one. Moving a server restore tests restore into to
  another host or port applies to its DSN at once (its backups follow a failover), and restore
  tests going to the new HOST:PORT wait for a DBA. A restore test goes only where a DBA approved.
- The admin's "Back up now" and "Verify copies now" go by the role: a superuser without one (or
  a Sysadmin who is a superuser) may not.

(The schedules judged over a year, not a month: tests/test_change_requests.py.)

Sam and Sandra are Sysadmins, Alice and Bob DBAs. The admin's server form probes its server, so
those tests have a real cluster; "evil" is the same cluster under another name, and "localhost"
another destination that reaches it, as a cluster Sam runs would.
"""

import psycopg
import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.urls import reverse
from django.utils import timezone

from backupportal.models import JournalEntry
from backups.changes import NO_SANDBOX, sandbox_changed
from backups.models import BackupCopy, BackupRun, ChangeRequest, Server, StorageLocation, Verification
from restores.models import RestoreRun
from restores.restoretest import run_restore_test
from tests.adminform_helpers import admin_form_data
from tests.helpers import backup_json, make_user, register

Kind = ChangeRequest.Kind


def change_server(client, server, **changes):
    url = reverse("admin:backups_server_change", args=[server.pk])
    return client.post(url, admin_form_data(client, url, **changes))


def at_localhost(server):
    """The same cluster by another name: to the portal, another destination."""
    return server.dsn.replace("@127.0.0.1:", "@localhost:")


def last_entry(action):
    return JournalEntry.objects.filter(action=action).latest("id")


# --- 1. Where restore tests restore ------------------------------------------------------------


def test_a_sysadmin_choosing_a_sandbox_waits_for_a_dba_not_another_sysadmin(client, sample_cluster, server, sam, alice):
    evil = register(sample_cluster, name="evil", dbname="postgres")
    client.force_login(sam)
    response = change_server(client, server, sandbox_server=evil.pk, rpo_minutes=10)
    assert response.status_code == 200 and "give its reason" in response.content.decode()

    response = change_server(client, server, sandbox_server=evil.pk, rpo_minutes=10, change_reason="off prod")
    assert response.status_code == 302
    assert "waits for a DBA to approve" in client.get(response.url).content.decode()
    server.refresh_from_db()
    assert server.sandbox_server is None and server.rpo_minutes == 10  # the rest applies at once
    assert last_entry("server_changed").details["fields"] == ["rpo_minutes"]
    change = ChangeRequest.objects.get()
    assert change.kind == Kind.SET_SANDBOX and change.changes == {
        "sandbox": {"from": NO_SANDBOX, "to": "evil"},
        "sandbox_destination": {"from": server.destination, "to": evil.destination},
    }

    sandra = make_user("sandra", "Sysadmin")
    for sysadmin in (sam, sandra):
        assert not change.awaits_decision_by(sysadmin)
        with pytest.raises(PermissionDenied):
            change.approve(sysadmin)
    client.force_login(sandra)
    assert f'id="approve-{change.pk}"' not in client.get(reverse("changes")).content.decode()
    assert client.post(reverse("change-approve", args=[change.pk])).status_code == 403

    client.force_login(alice)
    client.post(reverse("change-approve", args=[change.pk]))
    server.refresh_from_db()
    assert server.sandbox_server == evil and server.sandbox_destination == evil.destination
    assert last_entry("server_changed").actor == "sam (approved by alice)"


def test_a_server_added_with_a_sandbox_is_added_without_it_until_a_dba_approves(
    client, sample_cluster, server, sam, bob
):
    client.force_login(sam)
    url = reverse("admin:backups_server_add")
    form = admin_form_data(client, url, name="atoll", dsn=sample_cluster.dsn("postgres"), sandbox_server=server.pk)
    assert client.post(url, form).status_code == 200  # no reason given: nothing added
    assert client.post(url, form | {"change_reason": "tests off atoll"}).status_code == 302
    atoll = Server.objects.get(name="atoll")
    assert atoll.sandbox_server is None and atoll.sandbox_destination == atoll.destination
    assert "sandbox_server" not in last_entry("server_added").details["fields"]
    ChangeRequest.objects.get(kind=Kind.SET_SANDBOX, target_id=atoll.pk).approve(bob)
    atoll.refresh_from_db()
    assert atoll.sandbox_server == server


def test_a_move_applies_its_dsn_and_password_at_once_and_restore_tests_there_wait_for_a_dba(
    client, sample_cluster, server, sam, alice
):
    """A server without a sandbox is its own: moved (a failover), its backups follow at once with the
    password typed for the new host; only restore tests into it wait for a DBA, failing meanwhile."""
    old, new_dsn, moved_to = server.destination, at_localhost(server), f"localhost:{sample_cluster.port}"
    Server.objects.filter(pk=server.pk).update(pg_version=None)  # the new host's probe tells it
    client.force_login(sam)
    form = {"dsn": new_dsn, "new_password": "Typed-With-The-Move-1"}
    assert change_server(client, server, **form).status_code == 200  # no reason given: nothing changes
    assert Server.objects.get(pk=server.pk).dsn == server.dsn
    response = change_server(client, server, **form, change_reason="failover")
    assert response.status_code == 302
    assert "its new DSN applies now (backups go there)" in client.get(response.url).content.decode()
    server.refresh_from_db()
    assert server.dsn == new_dsn and server.password == "Typed-With-The-Move-1" and server.pg_version
    assert server.sandbox_destination == old
    entry = last_entry("server_changed").details
    assert "dsn" in entry["fields"] and entry["credentials_changed"] is True
    move = ChangeRequest.objects.get(kind=Kind.MOVE_SANDBOX)
    assert move.changes == {"sandbox_destination": {"from": old, "to": moved_to}}

    # Meanwhile a restore test into it fails saying why; its own connections (backups) go on.
    with pytest.raises(psycopg.OperationalError, match=f"may be reached at {old} only, as a DBA approved"):
        server.sandbox.connection_settings()
    assert server.connection_settings()["host"] == "localhost"
    # Saved again meanwhile, nothing more is asked: the move's request approves that destination.
    assert change_server(client, server, rpo_minutes=7).status_code == 302
    assert ChangeRequest.objects.count() == 1

    with pytest.raises(PermissionDenied):
        move.approve(make_user("sandra", "Sysadmin"))
    move.approve(alice)
    server.refresh_from_db()
    assert server.sandbox_destination == moved_to and server.password == "Typed-With-The-Move-1"
    assert server.sandbox.connection_settings()["host"] == "localhost"
    assert last_entry("server_changed").details["fields"] == ["sandbox_destination"]


def test_moving_a_sandbox_waits_for_a_dba_for_the_restore_tests_it_receives(client, sample_cluster, server, sam, alice):
    evil = register(sample_cluster, name="evil", dbname="postgres")
    approved, moved_to = evil.destination, f"localhost:{sample_cluster.port}"
    Server.objects.filter(pk=server.pk).update(sandbox_server=evil, sandbox_destination=approved)
    client.force_login(sam)
    # maldives receives no restore test (evil is its sandbox): it moves with nothing to approve.
    assert change_server(client, server, dsn=at_localhost(server)).status_code == 302
    assert Server.objects.get(pk=server.pk).dsn == at_localhost(server)
    assert not ChangeRequest.objects.exists()

    assert change_server(client, evil, dsn=at_localhost(evil)).status_code == 200  # no reason given
    assert change_server(client, evil, dsn=at_localhost(evil), change_reason="failover").status_code == 302
    assert Server.objects.get(pk=evil.pk).dsn == at_localhost(evil)  # at once
    assert Server.objects.get(pk=server.pk).sandbox_destination == approved  # not yet
    # maldives edited meanwhile: its sandbox is not asked for again beside the move waiting.
    assert change_server(client, Server.objects.get(pk=server.pk), rpo_minutes=9).status_code == 302
    move = ChangeRequest.objects.get()
    assert move.kind == Kind.MOVE_SANDBOX and move.target_id == evil.pk

    # Failed back where restore tests were approved to go: nothing to ask, and the move left
    # waiting is refused when approved.
    assert change_server(client, Server.objects.get(pk=evil.pk), dsn=evil.dsn).status_code == 302
    assert ChangeRequest.objects.count() == 1
    with pytest.raises(ValidationError, match=f"evil now points at {approved}, not {moved_to} as asked"):
        move.approve(alice)
    move.reject(alice)

    evil.refresh_from_db()
    assert change_server(client, evil, dsn=at_localhost(evil), change_reason="failover").status_code == 302
    ChangeRequest.objects.pending().get().approve(alice)
    assert [s.sandbox_destination for s in Server.objects.order_by("name")] == [moved_to, moved_to]
    assert Server.objects.get(pk=server.pk).sandbox.connection_settings()["host"] == "localhost"


def test_a_sandbox_whose_dsn_cannot_be_read_is_refused_in_one_line(client, sample_cluster, server, sam, alice):
    # Two hosts: registered before the rules got stricter; nothing connects with it.
    bad = Server.objects.create(name="bad", dsn="postgresql://postgres@h1:5432,h2:5432/postgres")
    client.force_login(sam)
    response = change_server(client, server, sandbox_server=bad.pk, change_reason="tests off prod")
    assert response.status_code == 200
    assert "The DSN of bad cannot be read: fix it first." in response.content.decode()
    assert not ChangeRequest.objects.exists() and Server.objects.get(pk=server.pk).sandbox_server is None
    # Its own page is not held up by it: its DSN reaches nowhere, so there is nothing to approve.
    assert sandbox_changed(bad, None) == {}

    # A request asked for before the form refused: its approval refuses in one line, nothing changes.
    to_nowhere = {"sandbox": {"from": NO_SANDBOX, "to": "bad"}, "sandbox_destination": {"from": "x", "to": None}}
    change = ChangeRequest.open(Kind.SET_SANDBOX, server, sam, "tests off prod", to_nowhere)
    with pytest.raises(ValidationError, match="The DSN of bad cannot be read: reject change request"):
        change.approve(alice)
    assert change.state == "pending" and Server.objects.get(pk=server.pk).sandbox_server is None


def test_a_restore_test_never_goes_to_a_sandbox_moved_since_a_dba_approved_it(
    sample_cluster, server, passphrase_file, backup_root, sam, alice
):
    assert backup_json()["status"] == "succeeded"
    sandbox = register(sample_cluster, name="sandbox", dbname="postgres")
    ChangeRequest.open(Kind.SET_SANDBOX, server, sam, "tests off prod", sandbox_changed(server, sandbox)).approve(alice)
    test = run_restore_test(Server.objects.get(pk=server.pk))
    assert test.status == "passed", test.error
    assert RestoreRun.objects.get(restore_test=test).into_server == sandbox

    # Moved behind the portal's back (a shell): the next test refuses, nothing restored there.
    Server.objects.filter(pk=sandbox.pk).update(dsn=at_localhost(sandbox))
    test = run_restore_test(Server.objects.get(pk=server.pk))
    assert test.status == "failed"
    assert f"may be reached at 127.0.0.1:{sample_cluster.port} only, as a DBA approved, not at localhost:" in test.error
    assert not sample_cluster.execute("SELECT datname FROM pg_database WHERE datname LIKE 'restoretest%'")


def test_what_a_dba_approves_is_what_runs(sam, alice):
    prod = Server.objects.create(name="prod", dsn="postgresql://postgres@10.0.0.1:5432/postgres")
    sandbox = Server.objects.create(name="sandbox", dsn="postgresql://postgres@10.0.0.2:5432/postgres")
    change = ChangeRequest.open(Kind.SET_SANDBOX, prod, sam, "tests off prod", sandbox_changed(prod, sandbox))
    Server.objects.filter(pk=sandbox.pk).update(dsn="postgresql://postgres@10.6.6.6:5432/postgres")
    with pytest.raises(ValidationError, match="now points at 10.6.6.6:5432, not 10.0.0.2:5432 as asked"):
        change.approve(alice)
    prod.refresh_from_db()
    assert change.state == "pending" and prod.sandbox_server is None

    # A move whose server has moved again since it was asked for is refused the same way.
    to = {"sandbox_destination": {"from": "10.0.0.1:5432", "to": "10.0.0.9:5432"}}
    move = ChangeRequest.open(Kind.MOVE_SANDBOX, prod, sam, "x", to)
    with pytest.raises(ValidationError, match="prod now points at 10.0.0.1:5432, not 10.0.0.9:5432 as asked"):
        move.approve(alice)
    # One asked for when a move held its DSN back (that DSN never applied): refused in one line.
    move.reject(alice)
    old = ChangeRequest.open(Kind.MOVE_SANDBOX, prod, sam, "x", {"dsn": {"from": prod.dsn, "to": "d"}})
    with pytest.raises(ValidationError, match="from before a move's DSN applied at once: reject it"):
        old.approve(alice)


def test_a_sandbox_moved_or_deleted_behind_the_forms_back_is_refused_and_asked_for_again(sam, alice):
    prod = Server.objects.create(name="prod", dsn="postgresql://postgres@10.0.0.1:5432/postgres")
    sandbox = Server.objects.create(name="sandbox", dsn="postgresql://postgres@10.0.0.2:5432/postgres")
    ChangeRequest.open(Kind.SET_SANDBOX, prod, sam, "tests off prod", sandbox_changed(prod, sandbox)).approve(alice)
    prod.refresh_from_db()
    assert prod.sandbox.connection_settings()["host"] == "10.0.0.2" and sandbox_changed(prod, sandbox) == {}

    Server.objects.filter(pk=sandbox.pk).update(dsn="postgresql://postgres@10.6.6.6:5432/postgres")
    with pytest.raises(
        psycopg.OperationalError,
        match="sandbox may be reached at 10.0.0.2:5432 only, as a DBA approved, not at 10.6.6.6",
    ):
        prod.sandbox.connect()
    assert sandbox_changed(prod, Server.objects.get(pk=sandbox.pk))["sandbox_destination"]["to"] == "10.6.6.6:5432"

    # Deleted, its tests would restore into prod itself: not before a DBA approves that.
    sandbox.delete()
    prod.refresh_from_db()
    with pytest.raises(
        psycopg.OperationalError,
        match="prod may be reached at 10.0.0.2:5432 only, as a DBA approved, not at 10.0.0.1:5432",
    ):
        prod.sandbox.connection_settings()
    assert sandbox_changed(prod, None)["sandbox"] == {"from": NO_SANDBOX, "to": NO_SANDBOX}


# --- 3. Admin actions go by the role -----------------------------------------------------------


def test_back_up_now_and_verify_go_by_the_role_not_by_being_a_superuser(client, alice, backup_root, monkeypatch):
    queued = []
    monkeypatch.setattr("backups.tasks.async_task", lambda name, *args, **kwargs: queued.append(name))
    server = Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/postgres")
    run = BackupRun.objects.create(server=server, kind="logical", status="succeeded", finished_at=timezone.now())
    primary = StorageLocation.objects.get(name="primary")
    BackupCopy.objects.create(run=run, location=primary, key="atoll/x.dump.gpg", size=1, status="ok")
    servers, runs = reverse("admin:backups_server_changelist"), reverse("admin:backups_backuprun_changelist")

    for user in (make_user("root", superuser=True), make_user("rootsys", "Sysadmin", superuser=True)):
        client.force_login(user)
        assert "back_up_now" not in client.get(servers).content.decode()
        client.post(servers, {"action": "back_up_now", "_selected_action": [server.pk]})
        client.post(runs, {"action": "verify_copies", "_selected_action": [run.pk]})
    assert queued == [] and BackupRun.objects.count() == 1 and not Verification.objects.exists()

    client.force_login(alice)
    client.post(servers, {"action": "back_up_now", "_selected_action": [server.pk]})
    client.post(runs, {"action": "verify_copies", "_selected_action": [run.pk]})
    assert queued == ["backups.tasks.run_backup", "backups.tasks.verify_copies"]
