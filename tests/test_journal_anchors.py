"""The journal's identity, its anchors in the storage locations, and its key.

Someone who can write VAR_DIR can rewrite the head file (and, on SQLite, the database): the
anchors in the locations catch what they cut. A portal pointed at a new database with VAR_DIR
kept says so, instead of calling the new journal tampered, until a person acknowledges the move.
The key is made by the first migrate only; anywhere else a missing key is a one-line error.
"""

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils.module_loading import import_string
from django_q.models import Schedule

from backupportal import journal
from backupportal.models import JournalEntry
from backups.tasks import GLOBAL_SCHEDULES, ensure_global_schedules

ROOT = Path(__file__).resolve().parent.parent


def verifyjournal(*args):
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verifyjournal", *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, out.getvalue() + err.getvalue()


def record(n, django_capture_on_commit_callbacks, action="backup_succeeded"):
    """n entries, committed as far as the head file is concerned."""
    with django_capture_on_commit_callbacks(execute=True):
        return [journal.record(action, actor="job:backup", server="maldives", i=i) for i in range(n)]


def tamper(statement, params=()):
    """Raw SQL past the append-only triggers, as an intruder with the database would; rolled back after the test."""
    with connection.cursor() as cur:
        if connection.vendor == "sqlite":
            cur.execute("DROP TRIGGER IF EXISTS journal_append_only_update")
            cur.execute("DROP TRIGGER IF EXISTS journal_append_only_delete")
        else:
            cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute(statement, params)
        if connection.vendor == "postgresql":
            cur.execute("SET LOCAL session_replication_role = origin")


def anchor_files(root):
    return sorted(p.name for p in (Path(root) / "journal-anchors").rglob("*.json"))


def s3_anchor_keys(tiers):
    listed = tiers.s3.list_objects_v2(Bucket=tiers.bucket, Prefix="backupportal/journal-anchors/")
    return sorted(o["Key"] for o in listed.get("Contents", []))


# --- Anchors: written to every location, read back by verifyjournal. ------------------------


def test_anchors_go_to_every_location_and_verifyjournal_says_which_it_used(
    tiers, django_capture_on_commit_callbacks, settings
):
    entries = record(4, django_capture_on_commit_callbacks)
    written = journal.write_anchors()
    journal_id = journal.journal_id()
    assert written["journal"] == journal_id and written["entry"] == entries[-1].pk and written["count"] == 5
    assert sorted(r["location"] for r in written["locations"] if r["written"]) == ["nas", "primary", "s3"]
    name = f"{5:012d}-{entries[-1].pk:012d}-{entries[-1].hmac}.json"
    assert anchor_files(tiers.primary) == [name] and anchor_files(tiers.nas) == [name]
    assert s3_anchor_keys(tiers) == [f"backupportal/journal-anchors/{journal_id}/{name}"]
    body = json.loads((tiers.primary / "journal-anchors" / journal_id / name).read_text())
    assert body["journal"] == journal_id and body["hmac"] == entries[-1].hmac and body["count"] == 5
    # Nothing moved: the hourly run writes nothing new.
    assert not any(r["written"] for r in journal.write_anchors()["locations"])
    record(2, django_capture_on_commit_callbacks)
    journal.write_anchors()

    code, text = verifyjournal()
    assert code == 0, text
    assert "7 entries" in text and "checked against the head file and 6 anchors" in text
    for location in ("nas", "primary", "s3"):
        assert f"anchors in location {location}: 2 anchors read" in text
    out = io.StringIO()
    call_command("verifyjournal", "--json", stdout=out)
    result = json.loads(out.getvalue().splitlines()[-1])
    assert result["journal"] == journal_id and {a["location"]: a["anchors"] for a in result["anchors"]} == {
        "nas": 2,
        "primary": 2,
        "s3": 2,
    }


def test_cutting_rows_and_rewriting_the_head_file_is_caught_by_the_anchors_elsewhere(
    tiers, django_capture_on_commit_callbacks, settings
):
    entries = record(8, django_capture_on_commit_callbacks)
    journal.write_anchors()
    # The intruder cuts the last three entries, writes a head file that agrees with what is
    # left, and removes the anchors on this host's disk. The NAS and the bucket still have theirs.
    tamper("DELETE FROM backupportal_journalentry WHERE id >= %s", [entries[5].pk])
    left = entries[4]
    head = {"journal": journal.journal_id(), "entry": left.pk, "hmac": left.hmac, "count": 6}
    Path(settings.JOURNAL_HEAD_FILE).write_text(json.dumps(head) + "\n")
    shutil.rmtree(tiers.primary / "journal-anchors")

    code, text = verifyjournal()
    assert code == 1, text
    assert f"entries after #{left.pk} are missing" in text and f"names #{entries[-1].pk} as the newest" in text
    assert "the anchor in location" in text and "anchors in location s3: 1 anchor read" in text

    # Written again after the cut, an anchor with fewer entries does not hide it: counts never go down.
    journal.write_anchors()
    code, text = verifyjournal()
    assert code == 1 and f"names #{entries[-1].pk} as the newest" in text, text


def test_an_anchor_that_disagrees_with_the_entry_it_names_is_caught(backup_root, django_capture_on_commit_callbacks):
    entries = record(5, django_capture_on_commit_callbacks)
    journal_id = journal.journal_id()
    anchors = backup_root / "journal-anchors" / journal_id
    anchors.mkdir(parents=True)
    # The entry it names had another HMAC when it was anchored: the journal was rewritten since.
    third = entries[2]
    (anchors / f"{4:012d}-{third.pk:012d}-{'e' * 64}.json").write_text("{}")
    code, text = verifyjournal()
    assert code == 1 and f"entry #{third.pk}: does not match the anchor in location primary" in text, text
    # The right HMAC, but more entries up to it than the journal has now: entries went missing before it.
    for stale in anchors.iterdir():
        stale.unlink()
    (anchors / f"{9:012d}-{third.pk:012d}-{third.hmac}.json").write_text("{}")
    code, text = verifyjournal()
    assert code == 1 and f"the anchor in location primary counts 9 entries up to #{third.pk}, the journal has 4" in text
    # Control: the anchor as the portal writes it passes.
    for stale in anchors.iterdir():
        stale.unlink()
    (anchors / f"{4:012d}-{third.pk:012d}-{third.hmac}.json").write_text("{}")
    assert verifyjournal()[0] == 0


def test_deleting_every_row_and_the_head_file_is_caught_by_the_anchors(
    tiers, django_capture_on_commit_callbacks, settings
):
    entries = record(3, django_capture_on_commit_callbacks)
    journal.write_anchors()
    old_id = journal.journal_id()
    tamper("DELETE FROM backupportal_journalentry")
    Path(settings.JOURNAL_HEAD_FILE).unlink()

    code, text = verifyjournal()
    assert f"the anchors in locations nas, primary, s3 name journal {old_id}" in text, text
    assert code == 1 and f"(its last known entry #{entries[-1].pk}, 4 entries)" in text, text
    assert "which this database does not hold (it holds no journal yet)" in text

    # The portal goes on writing: a new journal starts, and the old one's anchors still say what was lost.
    record(1, django_capture_on_commit_callbacks, action="login")
    new_id = journal.journal_id()
    code, text = verifyjournal()
    assert code == 1 and new_id != old_id and f"it holds journal {new_id} (2 entries)" in text, text
    assert "does not follow" not in text


def test_a_head_file_of_another_journal_is_never_overwritten_by_new_entries(
    db, django_capture_on_commit_callbacks, settings
):
    other = {"journal": "ab" * 16, "entry": 41, "hmac": "c" * 64, "count": 41}
    Path(settings.JOURNAL_HEAD_FILE).write_text(json.dumps(other))
    record(2, django_capture_on_commit_callbacks)
    assert json.loads(Path(settings.JOURNAL_HEAD_FILE).read_text()) == other
    code, text = verifyjournal()
    assert code == 1 and f"the head file names journal {'ab' * 16} (its last known entry #41, 41 entries)" in text


# --- A new database with VAR_DIR kept: said so, until a person acknowledges it. ------------


class Portal:
    """manage.py in a subprocess, as deployed, with a VAR_DIR kept across a change of database."""

    def __init__(self, workdir):
        self.var, self.backups = workdir / "var", workdir / "backups"

    def manage(self, database_url, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_", "PG"))}
        env |= {
            "DJANGO_SETTINGS_MODULE": "backupportal.settings",
            "DATABASE_URL": database_url,
            "VAR_DIR": str(self.var),
            "BACKUP_ROOT": str(self.backups),
            "WAL_ROOT": str(self.backups / "wal"),
            "NAS_ROOT": "",
            "S3_BUCKET": "",
        }
        argv = [sys.executable, str(ROOT / "manage.py"), *args]
        return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    def ok(self, database_url, *args):
        done = self.manage(database_url, *args)
        assert done.returncode == 0, done.stderr
        return done


SEED = """
from backupportal import journal
from backups.anchors import anchor_journal
for i in range(3):
    journal.record("backup_succeeded", actor="job:backup", server="maldives", i=i)
anchor_journal()
"""


def test_a_portal_moved_from_sqlite_to_postgresql_says_so_until_the_move_is_acknowledged(pg_cluster, tmp_path):
    portal = Portal(tmp_path)
    sqlite_url = f"sqlite:///{portal.var / 'portal.sqlite3'}"
    portal.ok(sqlite_url, "migrate", "-v", "0")
    portal.ok(sqlite_url, "shell", "-c", SEED)
    assert portal.manage(sqlite_url, "verifyjournal").returncode == 0
    with sqlite3.connect(portal.var / "portal.sqlite3") as conn:
        old_id = json.loads(conn.execute("SELECT details FROM backupportal_journalentry WHERE id = 1").fetchone()[0])
    old_id = old_id["journal"]

    # The same VAR_DIR, a new PostgreSQL database: the portal goes on working and journaling.
    pg_cluster.create_database("portal")
    pg_url = pg_cluster.dsn("portal")
    portal.ok(pg_url, "migrate", "-v", "0")
    portal.ok(pg_url, "shell", "-c", "from backupportal import journal; journal.record('login', actor='alice')")
    done = portal.manage(pg_url, "verifyjournal")
    assert done.returncode == 1
    assert f"the head file and the anchor in location primary name journal {old_id}" in done.stderr, done.stderr
    assert "(its last known entry #4, 4 entries)" in done.stderr
    assert "--start-new-chain" in done.stderr and "does not follow" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    refused = portal.manage(pg_url, "verifyjournal", "--start-new-chain")
    assert refused.returncode == 1 and '--start-new-chain needs --reason "..."' in refused.stderr
    assert portal.manage(pg_url, "verifyjournal").returncode == 1  # nothing was acknowledged

    moved = portal.ok(
        pg_url, "verifyjournal", "--start-new-chain", "--reason", "moved from the SQLite demo to PostgreSQL"
    )
    assert f"acknowledged: journal {old_id} (last known entry #4, 4 entries" in moved.stdout
    assert "intact: 3 entries" in moved.stdout
    assert portal.manage(pg_url, "verifyjournal").returncode == 0
    again = portal.manage(pg_url, "verifyjournal", "--start-new-chain", "--reason", "again")
    assert again.returncode == 1 and "nothing to acknowledge" in again.stderr

    with pg_cluster.connect("portal") as conn:
        rows = conn.execute("SELECT action, actor, details FROM backupportal_journalentry ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["journal_started", "login", "journal_move_acknowledged"]
    new_id = rows[0][2]["journal"]
    ack = rows[2][2]
    assert rows[2][1].startswith("os:") and ack["reason"] == "moved from the SQLite demo to PostgreSQL"
    assert [m["journal"] for m in ack["left_behind"]] == [old_id] and ack["left_behind"][0]["last_entry"] == 4
    assert json.loads((portal.var / "journal.head").read_text())["journal"] == new_id

    # Back on the old database, its own journal still verifies against its anchors.
    # (The head file now names the new journal: the old database says so.)
    back = portal.manage(sqlite_url, "verifyjournal")
    assert back.returncode == 1 and f"the head file names journal {new_id}" in back.stderr


@pytest.mark.django_db(transaction=True)  # committed for real: --start-new-chain writes the head on commit
def test_a_head_file_from_before_ids_left_by_another_database_is_never_called_entry_1_not_following(settings):
    # The SQLite demo's head, written before journals had ids; this database is new.
    old_head = f"900041 {'d' * 64}\n"
    Path(settings.JOURNAL_HEAD_FILE).write_text(old_head)
    for _ in range(2):
        journal.record("login", actor="alice")
    assert Path(settings.JOURNAL_HEAD_FILE).read_text() == old_head  # not ours to replace
    code, text = verifyjournal()
    assert code == 1 and "does not follow" not in text, text
    assert "the head file kept outside the database names #900041 as the newest" in text
    assert "(or the portal now uses a new database: then run verifyjournal --start-new-chain" in text

    code, text = verifyjournal("--start-new-chain", "--reason", "moved to PostgreSQL")
    assert code == 0 and "acknowledged: a journal from before journal ids (last known entry #900041, seen in" in text, (
        text
    )
    assert "intact: 4 entries" in text and verifyjournal()[0] == 0
    ack = JournalEntry.objects.get(action="journal_move_acknowledged")
    assert ack.details["left_behind"] == [
        {"journal": None, "last_entry": 900041, "count": None, "seen_in": "the head file"}
    ]


def test_the_move_cannot_be_acknowledged_without_another_journal_or_without_a_reason(
    db, django_capture_on_commit_callbacks
):
    record(2, django_capture_on_commit_callbacks)
    with pytest.raises(Exception, match="nothing to acknowledge"):
        call_command("verifyjournal", "--start-new-chain", "--reason", "just because", stdout=io.StringIO())
    with pytest.raises(Exception, match="--reason goes with --start-new-chain"):
        call_command("verifyjournal", "--reason", "x", stdout=io.StringIO())
    assert not JournalEntry.objects.filter(action="journal_move_acknowledged").exists()


# --- Journals made before ids: they still verify, and get an id without re-signing anything. ----


def test_a_journal_from_before_ids_still_verifies_and_gets_an_id_appended(
    db, django_capture_on_commit_callbacks, settings
):
    # Entries as the portal wrote them before this change: no journal_started, a head "ID HMAC".
    prev, old = journal.GENESIS, []
    for i in range(4):
        entry = JournalEntry(actor="alice", action="login", details={"i": i}, prev_hmac=prev, hmac="")
        entry.save()
        entry.hmac = journal.compute_hmac(entry)
        JournalEntry.objects.filter(pk=entry.pk, hmac="").update(hmac=entry.hmac)
        prev = entry.hmac
        old.append((entry.pk, entry.hmac))
    Path(settings.JOURNAL_HEAD_FILE).write_text(f"{old[-1][0]} {old[-1][1]}\n")

    code, text = verifyjournal()
    assert code == 0 and "journal (no id yet) intact: 4 entries" in text, text

    record(1, django_capture_on_commit_callbacks, action="logout")
    started = JournalEntry.objects.get(action="journal_started")
    assert started.pk > old[-1][0] and started.prev_hmac == old[-1][1]
    assert started.details["entries_before_the_id"] == 4
    assert list(JournalEntry.objects.filter(pk__lte=old[-1][0]).order_by("id").values_list("id", "hmac")) == old
    head = json.loads(Path(settings.JOURNAL_HEAD_FILE).read_text())
    assert head["journal"] == started.details["journal"] and head["count"] == 6
    code, text = verifyjournal()
    assert code == 0 and f"journal {started.details['journal']} intact: 6 entries" in text, text


# --- Written with every backup, and hourly. ---------------------------------------------------


def test_an_anchor_is_written_when_a_backup_finishes_and_by_the_hourly_schedule(
    server, passphrase_file, backup_root, settings
):
    settings.JOURNAL_ANCHORS = True
    call_command("backup", "maldives", "--kind", "logical", stdout=io.StringIO())
    succeeded = JournalEntry.objects.get(action="backup_succeeded")
    count = JournalEntry.objects.filter(pk__lte=succeeded.pk).count()
    assert anchor_files(backup_root) == [f"{count:012d}-{succeeded.pk:012d}-{succeeded.hmac}.json"]

    ensure_global_schedules()
    hourly = Schedule.objects.get(name="journal-anchors")
    assert (hourly.func, hourly.cron) == (GLOBAL_SCHEDULES["journal-anchors"][0], "5 * * * *")
    journal.record("login", actor="alice")
    result = import_string(hourly.func)()
    newest = JournalEntry.objects.order_by("-id").first()
    assert result["entry"] == newest.pk and [r["location"] for r in result["locations"] if r["written"]] == ["primary"]
    assert len(anchor_files(backup_root)) == 2


def test_an_unreachable_location_never_fails_a_backup(
    server, passphrase_file, tiers, settings, django_capture_on_commit_callbacks
):
    settings.JOURNAL_ANCHORS = True
    tiers.server.stop()
    with django_capture_on_commit_callbacks(execute=True):
        call_command("backup", "maldives", "--kind", "logical", stdout=io.StringIO(), stderr=io.StringIO())
    assert JournalEntry.objects.filter(action="backup_succeeded").exists()
    assert len(anchor_files(tiers.primary)) == 1
    code, text = verifyjournal()
    assert "anchors in location s3: unreachable: location s3: cannot reach the S3 endpoint" in text
    assert code == 0 and "anchors in location nas: 1 anchor read" in text, text


# --- The key: made by the first migrate, never silently anywhere else. ---------------------------


def test_a_missing_key_is_a_one_line_error_everywhere_but_the_first_migrate(tmp_path):
    portal = Portal(tmp_path)
    url = f"sqlite:///{portal.var / 'portal.sqlite3'}"
    key = portal.var / "journal.key"
    first = portal.ok(url, "migrate")
    assert f"Created the journal key {key} (mode 0600)" in first.stdout
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text()) == 64
    portal.ok(url, "shell", "-c", "from backupportal import journal; journal.record('login', actor='alice')")

    key.unlink()  # a worker host without it, or a lost key
    checked = portal.manage(url, "verifyjournal")
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert checked.stderr.strip() == (
        f"JournalKeyMissing: the journal key {key} (JOURNAL_KEY_FILE) is missing: copy it from the portal's host "
        "(mode 0600); only the first migrate of a new portal creates one"
    )
    again = portal.manage(url, "migrate")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "is missing but the journal has 2 entries: restore the key" in again.stderr
    assert not key.exists()


# --- Committed for real: the head follows commits; the triggers outlive the suite's flush. ------


@pytest.mark.django_db(transaction=True)
def test_committed_entries_move_the_head_and_verify(backup_root, settings):
    entries = [journal.record("login", actor="alice") for _ in range(3)]
    head = json.loads(Path(settings.JOURNAL_HEAD_FILE).read_text())
    assert head == {"journal": journal.journal_id(), "entry": entries[-1].pk, "hmac": entries[-1].hmac, "count": 4}
    journal.write_anchors()
    code, text = verifyjournal()
    assert code == 0 and "4 entries" in text and "checked against the head file and 1 anchor" in text, text
    # Teardown empties every table (flush): on SQLite the triggers are dropped for it, then made again.


def test_the_append_only_triggers_are_in_place_after_a_flush(db):
    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL's trigger (migration 0002) is not touched by a flush (TRUNCATE)")
    with connection.cursor() as cur:
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'backupportal_journalentry'")
        names = sorted(name for (name,) in cur.fetchall())
    assert names == ["journal_append_only_delete", "journal_append_only_update"]


def test_a_worker_without_the_key_journals_nothing_and_makes_no_key(db, settings, tmp_path):
    settings.JOURNAL_KEY_FILE = tmp_path / "elsewhere" / "journal.key"
    with pytest.raises(journal.JournalKeyMissing, match="is missing: copy it from the portal's host"):
        journal.record("backup_started", actor="job:backup")
    assert not settings.JOURNAL_KEY_FILE.exists() and not JournalEntry.objects.exists()


# --- The auditor's check in the browser, and the export that lets them re-check. ------------


def test_an_auditor_checks_the_chain_from_the_journal_page_and_the_check_changes_nothing(
    client, backup_root, django_capture_on_commit_callbacks
):
    from django.urls import reverse

    from tests.conftest import make_user

    entries = record(5, django_capture_on_commit_callbacks)
    client.force_login(make_user("carol", "Auditor"))
    assert 'href="/journal/verify/"' in client.get(reverse("journal")).content.decode()
    count = JournalEntry.objects.count()
    assert "Check the chain now" in client.get(reverse("journal-verify")).content.decode()
    page = client.get(reverse("journal-verify"), {"run": "1"}).content.decode()
    assert ">intact<" in page and f"<td>{count}</td>" in page
    assert JournalEntry.objects.count() == count  # a read: nothing journaled, nothing changed

    tamper("UPDATE backupportal_journalentry SET actor = 'mallory' WHERE id = %s", [entries[2].pk])
    page = client.get(reverse("journal-verify"), {"run": "1"}).content.decode()
    assert "NOT intact" in page and f"entry #{entries[2].pk}: its HMAC does not match its content" in page
    assert client.post(reverse("journal-verify"), {"run": "1"}).status_code in (403, 405)


def test_the_csv_carries_each_entry_s_hmac_and_its_predecessor_s(client, db, django_capture_on_commit_callbacks):
    import csv

    from django.urls import reverse

    from tests.conftest import make_user

    record(4, django_capture_on_commit_callbacks)
    client.force_login(make_user("carol", "Auditor"))
    response = client.get(reverse("journal-export"))
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    by_id = {e.pk: e for e in JournalEntry.objects.all()}
    assert rows and all(r["hmac"] == by_id[int(r["id"])].hmac for r in rows)
    chain = sorted(rows, key=lambda r: int(r["id"]))
    for before, after in zip(chain, chain[1:], strict=False):
        assert after["prev_hmac"] == before["hmac"]  # re-checkable outside the portal
    assert chain[0]["prev_hmac"] == journal.GENESIS
    for row in chain:
        assert journal.compute_hmac(by_id[int(row["id"])]) == row["hmac"]
