"""The operations journal: an entry for every kind of action, a chain that catches any
tampering, and the auditor's pages (filters, keyset pages, CSV export, links to objects).

Tampering is done the way an attacker with database access would: with the real psql against
a PostgreSQL portal database (a throwaway cluster, driven through manage.py in a subprocess so
the portal runs exactly as deployed), and with raw SQL on SQLite.
"""

import csv
import datetime
import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from backupportal import journal
from backupportal.lib.osuser import free_port
from backupportal.lib.pgdatadir import pg_bin
from backupportal.models import JournalEntry
from backups.models import BackupSchedule, Server, StorageLocation
from tests.helpers import DEMO_PASSWORD, make_user
from watching.alerts import raise_alert, resolve_alert

ROOT = Path(__file__).resolve().parent.parent


def actions(**filters):
    """The actions journaled, oldest first; logins (force_login sends one) left out."""
    entries = JournalEntry.objects.filter(**filters).exclude(action="login").order_by("id")
    return list(entries.values_list("action", flat=True))


def follow_object(client, entry):
    """Where the entry's object link leads."""
    response = client.get(entry.get_object_url())
    assert response.status_code == 302, response.content[:300]
    return response["Location"]


# --- Every kind of action writes an entry. ------------------------------------------------


def test_logins_failed_logins_and_logouts_are_journaled(client, db):
    make_user("dora", "DBA")
    client.post(reverse("login"), {"username": "dora", "password": "nope"}, REMOTE_ADDR="10.1.2.3")
    client.post(reverse("login"), {"username": "dora", "password": DEMO_PASSWORD}, REMOTE_ADDR="10.1.2.3")
    client.post(reverse("logout"), REMOTE_ADDR="10.1.2.3")
    entries = list(JournalEntry.objects.filter(actor="dora").order_by("id"))
    assert [(e.action, e.outcome) for e in entries] == [("login_failed", "failed"), ("login", "ok"), ("logout", "ok")]
    assert all(e.details["address"] == "10.1.2.3" for e in entries)
    assert "nope" not in json.dumps([e.details for e in entries])  # the password tried is never kept


def test_a_failed_login_journals_the_user_name_only_when_an_account_has_it(client, db):
    """A password typed into the user-name box must not stay in the append-only journal, which
    every role reads and every evidence pack exports: a name no account has is journaled as
    unknown, with a keyed hash so that one name tried again and again shows as such."""
    make_user("dora", "DBA")
    charlie = make_user("charlie", "Auditor")
    typed = "S3cret-Pass!word"
    for username in (typed, typed, "somebody-else", "DORA"):
        client.post(reverse("login"), {"username": username, "password": "dora"}, REMOTE_ADDR="10.1.2.3")

    failed = list(JournalEntry.objects.filter(action="login_failed").order_by("id"))
    assert [e.actor for e in failed] == ["(unknown user name)"] * 3 + ["dora"]  # an account's: in any case
    hashes = [e.details.get("name_hmac") for e in failed]
    assert hashes[0] == hashes[1] != hashes[2] and hashes[3] is None
    assert all(e.details["address"] == "10.1.2.3" for e in failed)
    everything = json.dumps(list(JournalEntry.objects.values("actor", "object_repr", "details")))
    assert typed not in everything and "somebody-else" not in everything
    client.force_login(charlie)
    assert typed not in client.get(reverse("journal")).content.decode()
    export = client.get(reverse("journal-export"), {"action": "login_failed"})
    exported = b"".join(export.streaming_content).decode()
    assert "(unknown user name)" in exported and typed not in exported


def test_admin_changes_to_servers_locations_and_schedules_are_journaled(client, pg_cluster, sam, alice, settings):
    client.force_login(sam)
    dsn = pg_cluster.dsn("postgres")
    form = {
        "name": "atoll",
        "dsn": dsn,
        "new_password": "Hunter2-secret",
        "archiving": "none",
        "enabled": "on",
        "rpo_minutes": 15,
        "rto_critical_minutes": 240,
        "rto_full_minutes": 480,
        "logical_retention_days": 30,
        "base_retention_days": 30,
        "wal_retention_days": 7,
        "incremental_retention_days": 7,
        "keep_weekly": 0,
        "keep_monthly": 0,
        "keep_yearly": 0,
        "retention_floor": 3,
        "critical_tables": '["users"]',
        "initial-critical_tables": '["users"]',  # a callable default: the browser posts its hidden initial
        "shrink_threshold_pct": 20,
    }
    assert client.post(reverse("admin:backups_server_add"), form).status_code == 302
    server = Server.objects.get(name="atoll")
    form["rpo_minutes"] = 10
    assert client.post(reverse("admin:backups_server_change", args=[server.pk]), form).status_code == 302

    settings.BACKUP_ROOT = Path(tempfile.mkdtemp(prefix="bp-journal-loc-"))
    location = {"name": "raid", "kind": "primary", "path": str(settings.BACKUP_ROOT / "raid"), "enabled": "on"}
    assert client.post(reverse("admin:backups_storagelocation_add"), location).status_code == 302
    location["capacity_bytes"] = "10000000000"  # retiring it (enabled off) would wait for a second approval
    raid = StorageLocation.objects.get(name="raid")
    assert client.post(reverse("admin:backups_storagelocation_change", args=[raid.pk]), location).status_code == 302

    client.force_login(alice)
    # Not logical: the server came with its default schedules; a base backup's is added by hand.
    schedule = {"server": server.pk, "job": "base", "cron": "0 2 * * *", "enabled": "on"}
    assert client.post(reverse("admin:backups_backupschedule_add"), schedule).status_code == 302
    pk = BackupSchedule.objects.get(server=server, job="base").pk
    schedule["cron"] = "15 1 * * *"
    assert client.post(reverse("admin:backups_backupschedule_change", args=[pk]), schedule).status_code == 302

    # Saving a new server looks at its cluster: the DSN's database is the one backed up.
    expected = ["server_added", "database_found", "server_changed", "location_added", "location_changed"]
    assert actions(actor="sam") == expected
    assert actions(actor="alice") == ["schedule_changed", "schedule_changed"]
    changed = JournalEntry.objects.get(action="server_changed")
    assert changed.server == "atoll" and changed.details["fields"] == ["rpo_minutes"]
    assert "Hunter2" not in json.dumps(list(JournalEntry.objects.values_list("details", flat=True)))
    assert JournalEntry.objects.filter(action="schedule_changed").order_by("id").last().details["cron"] == "15 1 * * *"
    assert follow_object(client, changed) == server.get_absolute_url()
    shutil.rmtree(settings.BACKUP_ROOT, ignore_errors=True)


def test_admin_deletions_and_changes_to_users_are_journaled_with_the_superuser(client, db):
    root = make_user("root", "Sysadmin", superuser=True)  # a role: the journal is a portal page
    client.force_login(root)
    doomed = Server.objects.create(name="doomed", dsn="postgresql://postgres@127.0.0.1:1/x")
    response = client.post(reverse("admin:backups_server_delete", args=[doomed.pk]), {"post": "yes"})
    assert response.status_code == 302 and not Server.objects.filter(name="doomed").exists()
    a, b = (Server.objects.create(name=n, dsn="postgresql://postgres@127.0.0.1:1/x") for n in ("reef", "lagoon"))
    bulk = {"action": "delete_selected", "_selected_action": [a.pk, b.pk], "post": "yes"}
    assert client.post(reverse("admin:backups_server_changelist"), bulk).status_code == 302
    bob = make_user("bob", "DBA")
    user_form = {"username": "bob", "is_active": "on", "is_staff": "on", "groups": [], "date_joined_0": "2026-01-01"}
    user_form |= {"date_joined_1": "00:00:00", "last_login_0": "", "last_login_1": ""}
    assert client.post(reverse("admin:auth_user_change", args=[bob.pk]), user_form).status_code == 302

    deleted = JournalEntry.objects.filter(action="admin_deleted", actor="root")
    assert sorted(deleted.values_list("object_repr", flat=True)) == ["doomed", "lagoon", "reef"]
    assert set(deleted.values_list("object_type", flat=True)) == {"backups.Server"}
    role_change = JournalEntry.objects.get(action="admin_changed", actor="root", object_type="auth.User")
    assert role_change.object_repr == "bob" and "Groups" in json.dumps(role_change.details)
    # A deleted object's link says so instead of failing (to an auditor: a superuser without
    # a role sees only the admin).
    client.force_login(make_user("charlie", "Auditor"))
    response = client.get(deleted.first().get_object_url())
    assert response.status_code == 404 and b"no longer exists" in response.content


def test_backups_started_succeeded_and_failed_are_journaled(server, passphrase_file, backup_root, client, charlie):
    call_command("backup", "maldives", "--kind", "logical", stdout=io.StringIO())
    down = Server.objects.create(name="down", dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    with pytest.raises(SystemExit):
        call_command("backup", "down", "--kind", "logical", stdout=io.StringIO(), stderr=io.StringIO())
    assert [a for a in actions(server="maldives") if a.startswith("backup")] == ["backup_started", "backup_succeeded"]
    assert actions(server="down") == ["backup_started", "backup_failed", "alert_opened"]
    failed = JournalEntry.objects.get(action="backup_failed")
    assert failed.outcome == "failed" and failed.object_type == "backups.BackupRun" and failed.details["error"]
    client.force_login(charlie)
    run = down.runs.get()
    assert follow_object(client, failed) == run.get_absolute_url()


def test_alerts_opened_acknowledged_and_resolved_are_journaled(client, db, alice, charlie):
    server = Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/x")
    alert, opened = raise_alert("backup_failed", server=server, message="the nightly backup failed")
    assert opened
    raise_alert("backup_failed", server=server, message="still failing")  # the same alert: no new entry
    client.force_login(alice)
    ack = {"note": "rerunning it by hand"}
    assert client.post(reverse("alert-acknowledge", args=[alert.pk]), ack).status_code == 302
    resolve_alert("backup_failed", server=server)
    entries = list(JournalEntry.objects.filter(object_type="watching.Alert").order_by("id"))
    assert [(e.action, e.actor, e.server) for e in entries] == [
        ("alert_opened", "job:monitor", "atoll"),
        ("alert_acknowledged", "alice", "atoll"),
        ("alert_resolved", "job:monitor", "atoll"),
    ]
    assert entries[1].details["note"] == "rerunning it by hand"
    # An alert being opened is news, not a failed action: what failed is on the row it is about.
    assert [e.outcome for e in entries] == ["info", "ok", "ok"]
    client.force_login(charlie)
    assert follow_object(client, entries[0]) == reverse("alert", args=[alert.pk])


def test_details_never_carry_a_secret_and_survive_odd_values(db):
    entry = journal.record(
        "test",
        actor="bad\x00name",
        dsn="postgresql://u:topsecret@h/db",
        password="p",
        nested={"AWS_SECRET_access": "x", "ok": [1.0, 2.5, 1e20, float("nan")]},
    )
    entry.refresh_from_db()
    text = json.dumps(entry.details)
    assert "topsecret" not in text and '"password": "***"' in text and '"AWS_SECRET_access": "***"' in text
    assert entry.actor == "badname" and entry.details["nested"]["ok"] == [1, 2.5, 10**20, "nan"]
    assert entry.hmac == journal.compute_hmac(entry)  # what was signed is what reads back


# --- The chain on SQLite: raw SQL on the test database. -----------------------------------

# With DATABASE_URL=postgres://... (as in CI) the trigger refuses the raw tampering below;
# the test_postgres_* tests further down tamper as a superuser instead.
tampers_on_sqlite = pytest.mark.skipif(
    "sqlite" not in django_settings.DATABASES["default"]["ENGINE"], reason="the portal's test database is not SQLite"
)


@pytest.fixture
def chain(db, django_capture_on_commit_callbacks):
    """The journal's start and twelve entries, committed as far as the head file is concerned."""
    with django_capture_on_commit_callbacks(execute=True):
        for i in range(12):
            journal.record("backup_succeeded", actor="job:backup", server="maldives", size=1000 + i, seconds=i / 3)
    return list(JournalEntry.objects.order_by("id").values_list("id", flat=True))


def verifyjournal():
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verifyjournal", stdout=out, stderr=err)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, out.getvalue() + err.getvalue()


def sql(statement, params=()):
    with connection.cursor() as cur:
        cur.execute(statement, params)


SQLITE_TRIGGERS = importlib.import_module("backupportal.migrations.0007_journal_sqlite_trigger")


def drop_sqlite_triggers():
    """What an attacker who can write the SQLite file does first (rolled back with the test)."""
    for statement in SQLITE_TRIGGERS.DROP:
        sql(statement)


@tampers_on_sqlite
def test_sqlite_the_triggers_refuse_update_and_delete_but_let_record_sign(chain):
    from django.db import IntegrityError, transaction

    for statement in (
        "UPDATE backupportal_journalentry SET actor = 'mallory' WHERE id = %s",
        "UPDATE backupportal_journalentry SET hmac = '' WHERE id = %s",
        "DELETE FROM backupportal_journalentry WHERE id = %s",
    ):
        with pytest.raises(IntegrityError, match="append-only: (UPDATE|DELETE) refused"), transaction.atomic():
            sql(statement, [chain[4]])
    with pytest.raises(IntegrityError, match="append-only: DELETE refused"), transaction.atomic():
        JournalEntry.objects.all().delete()
    assert JournalEntry.objects.count() == 13 and verifyjournal()[0] == 0


def test_sqlite_an_intact_journal_verifies(chain):
    code, text = verifyjournal()
    assert code == 0 and "13 entries" in text
    started = JournalEntry.objects.get(pk=chain[0])
    assert started.action == "journal_started" and started.prev_hmac == journal.GENESIS
    assert f"journal {started.details['journal']} intact" in text


@tampers_on_sqlite
def test_sqlite_an_update_is_caught(chain):
    drop_sqlite_triggers()
    sql("UPDATE backupportal_journalentry SET actor = 'mallory' WHERE id = %s", [chain[4]])
    code, text = verifyjournal()
    assert code == 1 and f"entry #{chain[4]}: its HMAC does not match" in text


@tampers_on_sqlite
def test_sqlite_a_delete_is_caught(chain):
    drop_sqlite_triggers()
    sql("DELETE FROM backupportal_journalentry WHERE id = %s", [chain[4]])
    code, text = verifyjournal()
    assert code == 1 and f"entry #{chain[5]}: it does not follow entry #{chain[3]}" in text


@tampers_on_sqlite
def test_sqlite_cutting_off_the_newest_entries_is_caught_even_after_new_appends(
    chain, django_capture_on_commit_callbacks
):
    drop_sqlite_triggers()
    sql("DELETE FROM backupportal_journalentry WHERE id >= %s", [chain[9]])
    code, text = verifyjournal()
    assert code == 1 and f"after #{chain[8]} are missing" in text and f"names #{chain[-1]} as the newest" in text
    with django_capture_on_commit_callbacks(execute=True):
        newer = journal.record("login", actor="alice")
    code, text = verifyjournal()
    assert code == 1 and f"entry #{newer.pk}: it does not follow entry #{chain[8]}" in text


@tampers_on_sqlite
def test_sqlite_a_forged_insert_with_a_correct_sha256_is_caught_and_one_with_the_key_is_not(chain):
    drop_sqlite_triggers()
    forged = forge_row(chain[-1] + 1, JournalEntry.objects.get(pk=chain[-1]).hmac)
    insert(forged, hashlib.sha256(journal.canonical(forged)).hexdigest())
    code, text = verifyjournal()
    assert code == 1 and f"entry #{forged.id}: its HMAC does not match" in text
    # Control: the same row signed with the key passes, so it is the key that caught the forgery.
    sql("DELETE FROM backupportal_journalentry WHERE id = %s", [forged.id])
    insert(forged, journal.compute_hmac(forged))
    assert verifyjournal()[0] == 0


def test_sqlite_a_missing_head_file_is_caught(chain, settings):
    Path(settings.JOURNAL_HEAD_FILE).unlink()
    code, text = verifyjournal()
    assert code == 1 and "head file" in text and "missing" in text


def test_verifyjournal_speaks_json(chain):
    out = io.StringIO()
    call_command("verifyjournal", "--json", stdout=out)
    result = json.loads(out.getvalue().splitlines()[-1])
    assert result["ok"] is True and result["entries_checked"] == 13 and result["exit_code"] == 0
    assert result["journal"] == JournalEntry.objects.get(pk=chain[0]).details["journal"]


class Row:
    """An entry as a forger would write it, with the fields the HMAC covers."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def forge_row(entry_id, prev_hmac):
    return Row(
        id=entry_id,
        at=datetime.datetime(2026, 1, 1, 3, 0, tzinfo=datetime.UTC),
        actor="alice",
        action="restore_approved",
        object_type="",
        object_id="",
        object_repr="",
        server="maldives",
        outcome="ok",
        details={"note": "approved by bob"},
        prev_hmac=prev_hmac,
    )


COLUMNS = "id, at, actor, action, object_type, object_id, object_repr, server, outcome, details, prev_hmac, hmac"


def insert(row, hmac_value):
    values = [getattr(row, c) for c in COLUMNS.split(", ")[:-1]]
    values[1] = values[1].strftime("%Y-%m-%d %H:%M:%S")  # how SQLite stores a UTC timestamp
    values[9] = json.dumps(values[9])
    sql(f"INSERT INTO backupportal_journalentry ({COLUMNS}) VALUES ({', '.join(['%s'] * 12)})", [*values, hmac_value])


# --- The chain on PostgreSQL: the trigger, and psql as the attacker's tool. ---------------


class PortalOnPostgres:
    """The portal as deployed, on a PostgreSQL database of a throwaway cluster: manage.py in a
    subprocess, with its own key and head file."""

    def __init__(self, cluster, workdir):
        self.cluster, self.workdir = cluster, workdir
        self.key, self.head = workdir / "journal.key", workdir / "journal.head"

    def env(self, dbname):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_"))}
        env |= {
            "DJANGO_SETTINGS_MODULE": "backupportal.settings",
            "DATABASE_URL": self.cluster.dsn(dbname),
            "VAR_DIR": str(self.workdir / "var"),
            "JOURNAL_KEY_FILE": str(self.key),
            "JOURNAL_HEAD_FILE": str(self.head),
        }
        return env

    def manage(self, dbname, *args):
        return subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            env=self.env(dbname),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def psql(self, dbname, statement):
        """The real psql, as an attacker with the database superuser would use it."""
        argv = [str(pg_bin() / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"]
        argv += ["-p", str(self.cluster.port), "-U", "postgres", "-d", dbname, "-c", statement]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def rows(self, dbname):
        """The journal as read back by psycopg: the values the forger recomputes hashes from."""
        with self.cluster.connect(dbname) as conn:
            return conn.execute(f"SELECT {COLUMNS} FROM backupportal_journalentry ORDER BY id").fetchall()


SEED = """
from backupportal import journal
for i in range(10):
    journal.record("backup_succeeded", actor="job:backup", server="maldives", size=10**9 + i, took=i * 1.5,
                   note="Malé ✓")
"""


@pytest.fixture(scope="module")
def pg_portal(pg_cluster_module):
    """A migrated portal database with ten entries, used as the template of each test's copy."""
    workdir = Path(tempfile.mkdtemp(prefix="bp-journal-pg-"))
    portal = PortalOnPostgres(pg_cluster_module, workdir)
    pg_cluster_module.create_database("portal_template")
    for args in (["migrate", "-v", "0"], ["shell", "-c", SEED]):
        done = portal.manage("portal_template", *args)
        assert done.returncode == 0, done.stderr
    portal.seed_head = portal.head.read_text()
    yield portal
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pg_db(pg_portal, request):
    """A fresh copy of the seeded portal database, and the head file as the seed left it."""
    name = f"portal_{request.node.name.split('[')[0][-40:]}".lower()
    pg_portal.cluster.execute(f'CREATE DATABASE "{name}" TEMPLATE portal_template')
    pg_portal.head.write_text(pg_portal.seed_head)
    yield name
    pg_portal.cluster.execute(f'DROP DATABASE "{name}"')


def check(portal, dbname):
    done = portal.manage(dbname, "verifyjournal")
    return done.returncode, done.stdout + done.stderr


# Superuser bypass of the trigger, as an attacker with the database superuser would do.
BYPASS = "SET session_replication_role = replica; "


def test_postgres_an_intact_journal_verifies(pg_portal, pg_db):
    code, text = check(pg_portal, pg_db)
    assert code == 0 and "11 entries" in text, text  # the journal's start and the ten


def test_postgres_the_trigger_refuses_update_and_delete(pg_portal, pg_db):
    update = pg_portal.psql(pg_db, "UPDATE backupportal_journalentry SET actor = 'mallory' WHERE id = 3")
    assert update.returncode != 0 and "append-only: UPDATE refused" in update.stderr
    delete = pg_portal.psql(pg_db, "DELETE FROM backupportal_journalentry WHERE id = 3")
    assert delete.returncode != 0 and "append-only: DELETE refused" in delete.stderr
    # Re-signing a signed row is an UPDATE too.
    resign = pg_portal.psql(pg_db, "UPDATE backupportal_journalentry SET hmac = repeat('0', 64) WHERE id = 3")
    assert resign.returncode != 0
    assert check(pg_portal, pg_db)[0] == 0


def recomputed(row_values, **changes):
    """The row with its changes and a correctly recomputed sha256 over exactly what is signed."""
    row = Row(**dict(zip(COLUMNS.split(", "), row_values, strict=True)))
    row.__dict__.update(changes)
    return row, hashlib.sha256(journal.canonical(row)).hexdigest()


def test_postgres_an_update_with_a_recomputed_sha256_is_caught(pg_portal, pg_db):
    row, digest = recomputed(pg_portal.rows(pg_db)[4], actor="mallory")
    done = pg_portal.psql(
        pg_db, f"{BYPASS}UPDATE backupportal_journalentry SET actor = 'mallory', hmac = '{digest}' WHERE id = {row.id}"
    )
    assert done.returncode == 0, done.stderr
    code, text = check(pg_portal, pg_db)
    assert code == 1 and f"entry #{row.id}: its HMAC does not match its content" in text, text


def test_postgres_a_delete_is_caught(pg_portal, pg_db):
    assert pg_portal.psql(pg_db, f"{BYPASS}DELETE FROM backupportal_journalentry WHERE id = 5").returncode == 0
    code, text = check(pg_portal, pg_db)
    assert code == 1 and "entry #6: it does not follow entry #4" in text, text


def test_postgres_cutting_off_the_newest_entries_is_caught(pg_portal, pg_db):
    assert pg_portal.psql(pg_db, f"{BYPASS}DELETE FROM backupportal_journalentry WHERE id >= 8").returncode == 0
    code, text = check(pg_portal, pg_db)
    assert code == 1 and "entries after #7 are missing" in text and "names #11 as the newest" in text, text
    # The portal goes on writing: the cut stays visible.
    assert (
        pg_portal.manage(pg_db, "shell", "-c", "from backupportal import journal; journal.record('login')").returncode
        == 0
    )
    code, text = check(pg_portal, pg_db)
    assert code == 1 and "entry #12: it does not follow entry #7" in text, text


def test_postgres_a_forged_insert_with_a_recomputed_sha256_is_caught(pg_portal, pg_db):
    last = pg_portal.rows(pg_db)[-1]
    forged = forge_row(last[0] + 1, prev_hmac=last[-1])
    digest = hashlib.sha256(journal.canonical(forged)).hexdigest()
    done = pg_portal.psql(pg_db, insert_sql(forged, digest))
    assert done.returncode == 0, done.stderr  # the trigger lets INSERTs through: the chain catches them
    code, text = check(pg_portal, pg_db)
    assert code == 1 and f"entry #{forged.id}: its HMAC does not match its content" in text, text
    # Control: signed with the key instead, the same row passes; the key is what caught it.
    pg_portal.psql(pg_db, f"{BYPASS}DELETE FROM backupportal_journalentry WHERE id = {forged.id}")
    with override_key(pg_portal.key):
        good = journal.compute_hmac(forged)
    assert pg_portal.psql(pg_db, insert_sql(forged, good)).returncode == 0
    code, text = check(pg_portal, pg_db)
    assert code == 0, text


def insert_sql(row, hmac_value):
    def literal(value):
        return "'" + str(value).replace("'", "''") + "'"

    values = [getattr(row, c) for c in COLUMNS.split(", ")[:-1]]
    values[1] = values[1].isoformat()
    values[9] = json.dumps(values[9])
    rendered = [str(values[0])] + [literal(v) for v in values[1:]] + [literal(hmac_value)]
    return f"INSERT INTO backupportal_journalentry ({COLUMNS}) VALUES ({', '.join(rendered)})"


class override_key:
    def __init__(self, path):
        from django.test import override_settings

        self.override = override_settings(JOURNAL_KEY_FILE=path)

    def __enter__(self):
        self.override.enable()

    def __exit__(self, *exc):
        self.override.disable()


# --- The auditor's pages. -----------------------------------------------------------------


@pytest.fixture
def busy_journal(db):
    """Three hundred entries over ten days, by three users, on two servers."""
    start = timezone.now() - datetime.timedelta(days=10)
    rows = []
    for i in range(300):
        entry = JournalEntry(
            at=start + datetime.timedelta(hours=i * 0.8),
            actor=["alice", "bob", "job:backup"][i % 3],
            action=["backup_succeeded", "login", "alert_opened"][i % 3],
            server=["maldives", "atoll"][i % 2],
            object_type="backups.Server",
            object_id="1",
            object_repr=f"thing {i}",
            details={"i": i},
            prev_hmac="",
            hmac="",
        )
        rows.append(entry)
    JournalEntry.objects.bulk_create(rows)
    return rows


def test_the_auditor_filters_by_date_user_action_and_server(client, charlie, busy_journal):
    client.force_login(charlie)
    day = timezone.localdate(busy_journal[100].at)
    query = {"date_from": day, "date_to": day, "actor": "bob", "action": "login", "server": "atoll"}
    response = client.get(reverse("journal"), query)
    shown = response.context["entries"]
    expected = [
        e
        for e in busy_journal
        if timezone.localdate(e.at) == day and e.actor == "bob" and e.action == "login" and e.server == "atoll"
    ]
    assert shown and [e.object_repr for e in shown] == [e.object_repr for e in reversed(expected)]
    bad = client.get(reverse("journal"), {"date_from": "2026-02-30"})
    assert bad.status_code == 200 and "Enter a valid date" in bad.content.decode()
    swapped = client.get(reverse("journal"), {"date_from": "2026-03-02", "date_to": "2026-03-01"})
    assert "swap From and To" in swapped.content.decode()


def test_pages_walk_the_whole_journal_without_counting_and_with_a_fixed_number_of_queries(
    client, charlie, busy_journal, django_assert_max_num_queries
):
    client.force_login(charlie)
    from django.test.utils import CaptureQueriesContext

    seen, url = [], reverse("journal") + "?server=maldives"
    while url:
        # session, user, permissions (2), role, the cursor entry, the page, server names: per page, not per row.
        with CaptureQueriesContext(connection) as queries, django_assert_max_num_queries(8):
            response = client.get(url)
        assert not [q for q in queries if "COUNT(" in q["sql"].upper()]
        seen += [e.object_repr for e in response.context["entries"]]
        older = response.context["older"]
        url = reverse("journal") + f"?server=maldives&older_than={older}" if older else None
    expected = [e.object_repr for e in sorted(busy_journal, key=lambda e: e.at, reverse=True) if e.server == "maldives"]
    assert seen == expected  # every entry once, newest first, over three pages
    # And back: the newer link of the last page leads to the page before it.
    newer = response.context["newer"]
    back = client.get(reverse("journal") + f"?server=maldives&newer_than={newer}")
    assert [e.object_repr for e in back.context["entries"]] == expected[50:100]


def test_each_entry_links_to_its_object(client, charlie, db):
    server = Server.objects.create(name="atoll", dsn="postgresql://postgres@127.0.0.1:1/x")
    entry = journal.record("server_changed", actor="sam", obj=server)
    client.force_login(charlie)
    page = client.get(reverse("journal")).content.decode()
    assert f'href="{entry.get_object_url()}"' in page
    assert follow_object(client, entry) == "/servers/atoll/"
    detail = client.get(entry.get_absolute_url()).content.decode()
    assert entry.hmac in detail and entry.get_object_url() in detail


def test_csv_export_streams_the_filtered_view_and_defuses_formulas(client, charlie, busy_journal):
    journal.record("login_failed", actor='=HYPERLINK("http://evil")', outcome="failed")
    client.force_login(charlie)
    response = client.get(reverse("journal-export"), {"actor": "alice", "server": "maldives"})
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/csv") and "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    expected = [e for e in busy_journal if e.actor == "alice" and e.server == "maldives"]
    assert [r["object_repr"] for r in rows] == [
        e.object_repr for e in sorted(expected, key=lambda e: e.at, reverse=True)
    ]
    assert json.loads(rows[0]["details"]) == {"i": expected[-1].details["i"]}
    everything = client.get(reverse("journal-export"), {"action": "login_failed"})
    text = b"".join(everything.streaming_content).decode()
    assert "'=HYPERLINK" in text  # a spreadsheet shows it, never runs it
    exported = JournalEntry.objects.filter(action="journal_exported", actor="charlie")
    assert exported.count() == 2 and exported.order_by("id").first().details["filters"]["actor"] == "alice"
    # Sent by another site's page (an <img src=...> the browser fetches with the session): refused,
    # nothing journaled; from the journal's own page, or typed in (no site), it exports.
    for site, status in (("cross-site", 403), ("same-site", 403), ("same-origin", 200), ("none", 200)):
        response = client.get(reverse("journal-export"), {"actor": "x"}, headers={"Sec-Fetch-Site": site})
        assert response.status_code == status, site
    assert exported.count() == 4


def test_an_auditor_cannot_change_the_journal_by_any_route(client, charlie, busy_journal):
    client.force_login(charlie)
    entry, count = busy_journal[0], JournalEntry.objects.count()
    for url in (reverse("journal"), reverse("journal-entry", args=[entry.pk]), reverse("journal-export")):
        assert client.post(url, {"actor": "x"}).status_code == 403
    assert client.post(reverse("admin:backupportal_journalentry_change", args=[entry.pk]), {}).status_code == 403
    assert (
        client.post(reverse("admin:backupportal_journalentry_delete", args=[entry.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert JournalEntry.objects.count() == count
    assert User.objects.get(username="charlie").groups.get().name == "Auditor"


def test_details_read_as_labels_and_rounded_values_and_times_in_one_format_in_the_portals_zone(client, charlie):
    entry = journal.record(
        "restore_test_passed", actor="job:restoretest", duration_s=0.5867414599999847, tables=["a", "b"]
    )
    client.force_login(charlie)
    page = client.get(reverse("journal")).content.decode()
    assert "<b>duration</b> 0.587 s" in page and "<b>tables</b> a, b" in page and "0.58674" not in page
    assert "Times are in Indian/Maldives (+0500)" in page
    detail = client.get(entry.get_absolute_url()).content.decode()
    assert "<th>Duration</th><td>0.587 s</td>" in detail
    assert "&quot;duration_s&quot;: 0.5867414599999847" in detail  # and exactly as signed, for the auditor
    # Django's en-GB default ("3 Dec 2026, 2:30 p.m.") is gone: a template without a format writes ISO.
    from django.template import Context, Template

    moment = timezone.make_aware(datetime.datetime(2026, 12, 3, 14, 30))
    assert Template("{{ t }} {{ t|date }}").render(Context({"t": moment})) == "2026-12-03 14:30 2026-12-03"
    assert str(entry).startswith(f"{timezone.localtime(entry.at):%Y-%m-%d %H:%M:%S} job:restoretest")
