"""addserver registers a reachable PostgreSQL 15+ server and refuses everything else with one line."""

import socket
import struct
import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups.models import BackupSchedule, Server
from backups.schedules import ensure_for


def addserver(*args, **env):
    return call_command("addserver", *args)


@pytest.mark.parametrize("pg_major", [15, 18])
def test_it_registers_a_server_and_reads_its_version(sample_cluster, db, capsys, pg_major):
    addserver("maldives", "--dsn", sample_cluster.dsn("reliabilitymaldives"))
    server = Server.objects.get(name="maldives")
    assert server.pg_version // 10000 == pg_major
    assert server.dbname == "reliabilitymaldives"
    assert "Registered maldives" in capsys.readouterr().out
    # The strategy's daily 02:00 logical backup, as a django-q2 schedule named after the server.
    schedule = BackupSchedule.objects.get(server=server, job="logical")
    assert schedule.cron == "0 2 * * *"
    from django_q.models import Schedule

    assert Schedule.objects.get(name="logical:maldives").cron == "0 2 * * *"
    assert JournalEntry.objects.filter(action="server_added", object_id=str(server.pk)).exists()


def test_registering_twice_keeps_one_schedule(sample_cluster, db):
    addserver("maldives", "--dsn", sample_cluster.dsn("reliabilitymaldives"))
    ensure_for(Server.objects.get(name="maldives"))
    from django_q.models import Schedule

    assert Schedule.objects.filter(name="logical:maldives").count() == 1


def refused(*args):
    with pytest.raises(CommandError) as e:
        addserver(*args)
    message = str(e.value)
    assert "\n" not in message
    assert not Server.objects.exists()
    return message


def test_it_refuses_an_unreachable_host(db):
    port = free_port()
    message = refused("x", "--dsn", f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert f"127.0.0.1:{port}" in message and "connection refused" in message


def test_it_refuses_a_wrong_password(pg_cluster, db, monkeypatch):
    pg_cluster.create_role("app", password="right-password")
    monkeypatch.setenv("PGPASSWORD", "wrong-password")
    message = refused("x", "--dsn", pg_cluster.dsn("postgres", user="app"))
    assert "password authentication failed for user app" in message
    assert "wrong-password" not in message


def test_it_accepts_the_right_password_from_a_private_file(pg_cluster, db, tmp_path):
    pg_cluster.create_role("app", password="right-password")
    secret = tmp_path / "pw"
    secret.write_text("right-password\n")
    secret.chmod(0o600)
    addserver("x", "--dsn", pg_cluster.dsn("postgres", user="app"), "--password-file", str(secret))
    server = Server.objects.get(name="x")
    assert server.password == "right-password"
    assert "right-password" not in server.dsn


def test_it_refuses_a_world_readable_password_file(pg_cluster, db, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("pw")
    secret.chmod(0o644)
    assert "can be read by others" in refused("x", "--dsn", pg_cluster.dsn(), "--password-file", str(secret))


def test_it_refuses_a_password_file_that_is_not_text_in_one_line(pg_cluster, db, tmp_path):
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xff\xfe\x00p")
    secret.chmod(0o600)
    said = refused("x", "--dsn", pg_cluster.dsn(), "--password-file", str(secret))
    assert said == f"password file {secret} is not text (UTF-8): write the password in it, one line"


def test_it_refuses_the_name_of_the_wal_locations_directory_inside_the_primary(pg_cluster, backup_root):
    """Found by review: WAL_ROOT is BACKUP_ROOT/wal by default; a server named wal kept its files in
    the WAL location's tree, and a rebuild of the primary skipped them as that location's."""
    said = refused("wal", "--dsn", pg_cluster.dsn())
    assert said == "name: 'wal' is where location wal keeps its files: choose another name"


def test_it_refuses_a_password_in_the_dsn(pg_cluster, db):
    message = refused("x", "--dsn", f"postgresql://postgres:hunter2@127.0.0.1:{pg_cluster.port}/postgres")
    assert "process list" in message and "hunter2" not in message


def test_it_refuses_a_missing_database(pg_cluster, db):
    assert "database nosuchdb does not exist" in refused("x", "--dsn", pg_cluster.dsn("nosuchdb"))


@pytest.mark.parametrize(
    "dsn", ["mysql://root@localhost/db", "not a dsn", "postgresql://postgres@127.0.0.1:notaport/db"]
)
def test_it_refuses_a_malformed_dsn(db, dsn):
    assert "malformed DSN" in refused("x", "--dsn", dsn)


def test_it_refuses_a_bad_name(pg_cluster, db):
    assert "name" in refused("Bad Name!", "--dsn", pg_cluster.dsn())


def test_it_refuses_a_duplicate_name(pg_cluster, db):
    addserver("x", "--dsn", pg_cluster.dsn())
    with pytest.raises(CommandError, match="already registered"):
        addserver("x", "--dsn", pg_cluster.dsn())
    assert Server.objects.count() == 1


class OldPostgres:
    """A TCP peer that speaks the start of PostgreSQL's protocol as a 14.9 server would.

    No PostgreSQL older than 15 is packaged for this machine; the version check only reads
    the server_version that a server announces when a session starts, which this answers.
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    @staticmethod
    def message(kind, payload):
        return kind + struct.pack("!I", len(payload) + 4) + payload

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                length, code = struct.unpack("!II", conn.recv(8))
                if code == 80877103:  # SSLRequest: no SSL here
                    conn.sendall(b"N")
                    length, code = struct.unpack("!II", conn.recv(8))
                conn.recv(length - 8)
                params = {
                    "server_version": "14.9",
                    "server_encoding": "UTF8",
                    "client_encoding": "UTF8",
                    "DateStyle": "ISO, MDY",
                    "integer_datetimes": "on",
                    "standard_conforming_strings": "on",
                }
                out = self.message(b"R", struct.pack("!I", 0))
                for k, v in params.items():
                    out += self.message(b"S", k.encode() + b"\0" + v.encode() + b"\0")
                out += self.message(b"K", struct.pack("!II", 1, 2)) + self.message(b"Z", b"I")
                conn.sendall(out)
                conn.recv(1024)  # Terminate

    def close(self):
        self.sock.close()


def test_it_refuses_postgresql_older_than_15(db):
    old = OldPostgres()
    try:
        message = refused("old", "--dsn", f"postgresql://postgres@127.0.0.1:{old.port}/postgres")
    finally:
        old.close()
    assert "PostgreSQL 14, older than 15" in message
