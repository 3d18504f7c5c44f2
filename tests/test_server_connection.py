"""A server's connection: the DSN read as libpq reads it, and a stored password that only ever
goes to the user, host and port it was entered for, sealed at rest with a key kept outside the
catalog.

Sam is a sysadmin: he edits servers and never sees their passwords. The hostile side is a real
listener on 127.0.0.1 that asks for the password in clear text (or as md5) and keeps whatever
arrives (tests/pgauth_helpers.py).
"""

import subprocess

import psycopg
import pytest
from django import forms
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.urls import reverse

from backupportal.lib.childenv import child_env
from backupportal.lib.libpq import DsnError, parse
from backupportal.lib.sealed import SealError
from backupportal.models import JournalEntry
from backups.models import BackupRun, Server
from backups.pipeline import BackupFailed
from tests.helpers import DSN_PASSWORD, backup_json
from tests.pgauth_helpers import CLEARTEXT, MD5, PasswordListener


@pytest.fixture
def listener():
    hostile = PasswordListener(CLEARTEXT)
    yield hostile
    hostile.close()


def admin_form_data(client, url, **changes):
    """GET an admin add or change page and return its form as a browser posts it, with `changes`."""
    form = client.get(url).context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form[name].value()  # already as the page renders it
        if isinstance(field, forms.BooleanField):
            if value:
                data[name] = "on"
            continue
        data[name] = "" if value is None else value
        if field.show_hidden_initial:  # a callable default: the page carries its initial value too
            data[f"initial-{name}"] = data[name]
    return data | changes


def change_in_admin(client, server, **changes):
    url = reverse("admin:backups_server_change", args=[server.pk])
    return client.post(url, admin_form_data(client, url, **changes))


def dsn_at(server, port=None, user=None, dbname=None):
    parts = parse(server.dsn)
    return f"postgresql://{user or parts.user}@{parts.host}:{port or parts.port}/{dbname or parts.dbname}"


# --- 1. The stored password goes only to the user, host and port it was entered for. ----------


@pytest.mark.parametrize("method", [CLEARTEXT, MD5])
def test_a_sysadmin_who_points_a_server_at_his_own_listener_never_receives_its_password(
    client, sam, secret_server, method
):
    hostile = PasswordListener(method)
    try:
        client.force_login(sam)
        response = change_in_admin(client, secret_server, dsn=dsn_at(secret_server, port=hostile.port))
        assert response.status_code == 200  # refused, not saved
        page = response.content.decode()
        kind = "cleartext" if method == CLEARTEXT else "hashed"
        assert f"asked for a {kind} password, which the portal never sends" in page
        assert hostile.connections >= 1, "the admin's check did go there"
        assert hostile.answered == 0 and not hostile.heard(DSN_PASSWORD)
        # Typing a password in the same change does not make the listener's request acceptable.
        response = change_in_admin(
            client, secret_server, dsn=dsn_at(secret_server, port=hostile.port), new_password="Typed-By-Sam-1"
        )
        assert response.status_code == 200
        assert hostile.answered == 0 and not hostile.heard("Typed-By-Sam-1")
    finally:
        hostile.close()
    secret_server.refresh_from_db()
    assert secret_server.password == DSN_PASSWORD and f":{hostile.port}/" not in secret_server.dsn


def test_the_admin_says_why_the_stored_password_was_not_sent_to_a_new_user(client, sam, secret_server, sample_cluster):
    # A user who needs a SCRAM password of his own, which Sam did not type.
    sample_cluster.create_role("other_user", password="another-password")
    client.force_login(sam)
    response = change_in_admin(client, secret_server, dsn=dsn_at(secret_server, user="other_user"))
    assert response.status_code == 200
    page = response.content.decode()
    assert f"127.0.0.1:{sample_cluster.port} asks for a password" in page
    assert f"the stored password is only ever sent to backup_user@127.0.0.1:{sample_cluster.port}" in page
    secret_server.refresh_from_db()
    assert secret_server.password == DSN_PASSWORD


def test_changing_the_user_in_the_admin_forgets_the_password_and_says_so(client, sam, secret_server):
    client.force_login(sam)
    # postgres is trusted on 127.0.0.1 in the test clusters: the change is valid without a password.
    response = change_in_admin(client, secret_server, dsn=dsn_at(secret_server, user="postgres"))
    assert response.status_code == 302, response.content.decode()[:3000]
    secret_server.refresh_from_db()
    assert secret_server.password == "" and secret_server.password_sealed == ""
    entry = JournalEntry.objects.filter(action="server_changed").latest("id")
    assert entry.details["credentials_forgotten"] is True
    page = client.get(response["Location"]).content.decode()
    assert "The stored password of maldives was forgotten" in page


def test_a_new_password_given_with_the_change_is_kept_for_the_new_target(client, sam, secret_server, sample_cluster):
    sample_cluster.create_role("other_user", password="Other-Secret-2", superuser=True)
    client.force_login(sam)
    response = change_in_admin(
        client, secret_server, dsn=dsn_at(secret_server, user="other_user"), new_password="Other-Secret-2"
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    secret_server.refresh_from_db()
    assert secret_server.password == "Other-Secret-2"
    assert secret_server.password_target == f"other_user@127.0.0.1:{sample_cluster.port}"


def test_any_change_of_host_port_or_user_forgets_the_password_not_only_the_admins(secret_server, sample_cluster):
    port = sample_cluster.port
    for dsn in [
        f"postgresql://backup_user@127.0.0.2:{port}/reliabilitymaldives",  # host
        f"postgresql://backup_user@127.0.0.1:{port + 1}/reliabilitymaldives",  # port
        f"postgresql://someone_else@127.0.0.1:{port}/reliabilitymaldives",  # user
    ]:
        server = Server.objects.get(pk=secret_server.pk)
        server.dsn = dsn
        assert server.password == "", "never handed out for another target, even before saving"
        server.save(update_fields=["dsn"])
        server = Server.objects.get(pk=secret_server.pk)
        assert server.password_sealed == "" and server.password == ""
        server.dsn = secret_server.dsn
        server.password = DSN_PASSWORD
        server.save()
    # What is not about whom we talk to keeps it: another database, another application_name.
    server = Server.objects.get(pk=secret_server.pk)
    server.dsn = f"postgresql://backup_user@127.0.0.1:{port}/postgres?application_name=nightly"
    server.save()
    assert Server.objects.get(pk=secret_server.pk).password == DSN_PASSWORD


VERIFIED = "sslmode=verify-full&sslrootcert=/etc/ssl/atoll-ca.pem"


@pytest.mark.parametrize(
    "entered_with, changed_to, kept",
    [
        (VERIFIED, "sslmode=require", False),  # a listener on the way may stand in for the server
        (VERIFIED, "sslmode=verify-full&sslrootcert=/tmp/sams-ca.pem", False),  # a CA of his choosing
        (VERIFIED, "sslmode=verify-ca&sslrootcert=/etc/ssl/atoll-ca.pem", False),  # any host it signed
        ("sslmode=require", "sslmode=disable", False),
        ("sslmode=require", "", False),  # libpq's default, prefer, falls back to no TLS
        ("", "sslmode=allow", False),
        ("", VERIFIED, True),  # surer: kept
        ("sslmode=require", "sslmode=verify-ca&sslrootcert=/etc/ssl/atoll-ca.pem", True),
        ("sslmode=verify-ca&sslrootcert=/etc/ssl/atoll-ca.pem", VERIFIED, True),
        (VERIFIED, VERIFIED + "&connect_timeout=5", True),  # nothing about TLS changed
        # require with a root certificate verifies it (libpq): dropping or swapping the file is weaker
        ("sslmode=require&sslrootcert=/etc/ssl/atoll-ca.pem", "sslmode=require", False),
        ("sslmode=require&sslrootcert=/etc/ssl/atoll-ca.pem", "sslmode=require&sslrootcert=/tmp/sams-ca.pem", False),
        (
            "sslmode=require&sslrootcert=/etc/ssl/atoll-ca.pem",
            "sslmode=verify-ca&sslrootcert=/etc/ssl/atoll-ca.pem",
            True,
        ),
    ],
)
def test_a_dsn_less_sure_of_its_server_forgets_the_password_a_surer_one_keeps_it(
    secret_server, entered_with, changed_to, kept
):
    base = secret_server.dsn.split("?")[0]
    server = Server.objects.get(pk=secret_server.pk)
    server.dsn = f"{base}?{entered_with}".rstrip("?")
    server.password = DSN_PASSWORD
    server.save()
    server.dsn = f"{base}?{changed_to}".rstrip("?")
    assert (server.password == DSN_PASSWORD) is kept, "never handed out before saving either"
    server.save()
    server = Server.objects.get(pk=secret_server.pk)
    assert (server.password == DSN_PASSWORD) is kept and bool(server.password_sealed) is kept


def test_a_backup_against_a_listener_at_an_unchanged_host_and_port_never_sends_the_password(
    db, listener, passphrase_file, backup_root
):
    # The password was entered for this very host and port; whoever answers there now asks for it in clear.
    server = Server(name="maldives", dsn=f"postgresql://backup_user@127.0.0.1:{listener.port}/reliabilitymaldives")
    server.password = DSN_PASSWORD
    server.save()
    result = backup_json()
    assert result["status"] == "failed"
    assert BackupRun.objects.get().error.startswith(f"127.0.0.1:{listener.port} asked for a cleartext password")
    # The client tools (libpq 15, no require_auth) get their environment only after the same check.
    with pytest.raises(BackupFailed, match="asked for a cleartext password"):
        server.libpq_env()
    assert listener.connections >= 2
    assert listener.answered == 0 and not listener.heard(DSN_PASSWORD)


def test_the_tools_libpq_alone_would_have_sent_it(db, listener):
    """Why the check before each tool exists: the system libpq (15) answers a cleartext request."""
    server = Server(name="x", dsn=f"postgresql://backup_user@127.0.0.1:{listener.port}/db")
    server.password = DSN_PASSWORD
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(listener.port), "PGUSER": "backup_user", "PGPASSWORD": DSN_PASSWORD}
    subprocess.run([str(server.bin_dir() / "psql"), "-X", "-c", "select 1"], env=child_env(env), capture_output=True)
    assert listener.heard(DSN_PASSWORD)


def test_scram_and_trust_still_work_for_connections_and_tools(secret_server, sample_cluster):
    with secret_server.connect() as conn:
        assert conn.execute("select current_user").fetchone()[0] == "backup_user"
    env = child_env(secret_server.libpq_env())
    assert env["PGPASSWORD"] == DSN_PASSWORD  # SCRAM: the check passed, the tool gets it
    psql = [str(secret_server.bin_dir() / "psql"), "-X", "-At", "-c", "select current_user"]
    assert subprocess.run(psql, env=env, capture_output=True, text=True, check=True).stdout.strip() == "backup_user"
    trusted = Server(name="t", dsn=sample_cluster.dsn())
    assert trusted.probe() // 10000 == 15


# --- 3, 7. Every libpq parameter reaches every connection and every tool; bad DSNs are refused. --


def test_percent_encoded_parts_are_decoded_as_libpq_does(pg_cluster, db):
    parts = parse("postgresql://app%40corp@%2Fvar%2Frun%2Fpostgresql:5433/sales%20db?application_name=a%26b")
    assert (parts.user, parts.host, parts.port, parts.dbname) == ("app@corp", "/var/run/postgresql", 5433, "sales db")
    assert parts.params == {"application_name": "a&b"}
    assert parse("postgresql://u@[::1]:6543/db").host == "::1"

    pg_cluster.create_database("sales db")
    server = Server(name="sales", dsn=f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/sales%20db")
    with server.connect() as conn:
        assert conn.execute("select current_database()").fetchone()[0] == "sales db"
    psql = [str(server.bin_dir() / "psql"), "-X", "-At", "-c", "select current_database()"]
    out = subprocess.run(psql, env=child_env(server.libpq_env()), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "sales db"


def test_dsn_parameters_reach_the_portals_connections_and_the_tools(pg_cluster, db):
    dsn = pg_cluster.dsn() + "?application_name=bp-nightly&sslmode=disable&connect_timeout=7"
    dsn += "&target_session_attrs=read-write"
    server = Server(name="params", dsn=dsn)
    with server.connect() as conn:
        assert conn.execute("show application_name").fetchone()[0] == "bp-nightly"
        assert conn.info.get_parameters()["sslmode"] == "disable"
        assert conn.info.get_parameters()["connect_timeout"] == "7"
    env = server.libpq_env()
    assert env["PGSSLMODE"] == "disable" and env["PGCONNECT_TIMEOUT"] == "7"
    assert env["PGTARGETSESSIONATTRS"] == "read-write" and env["PGAPPNAME"] == "bp-nightly"
    psql = [str(server.bin_dir() / "psql"), "-X", "-At", "-c", "show application_name"]
    out = subprocess.run(psql, env=child_env(env), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "bp-nightly"


def _tool_argv(bindir, tool, tmp_path, dump):
    return {
        "pg_dump": [bindir / "pg_dump", "--schema-only"],
        "pg_dumpall": [bindir / "pg_dumpall", "--globals-only"],
        "pg_basebackup": [bindir / "pg_basebackup", "--pgdata", tmp_path / "base", "--wal-method=none"],
        "pg_receivewal": [bindir / "pg_receivewal", "--directory", tmp_path, "--no-loop"],
        "psql": [bindir / "psql", "-X", "-c", "select 1"],
        "pg_restore": [bindir / "pg_restore", "--dbname=postgres", dump],
    }[tool]


@pytest.mark.parametrize("tool", ["pg_dump", "pg_dumpall", "pg_basebackup", "pg_receivewal", "psql", "pg_restore"])
def test_sslmode_require_reaches_every_tool(pg_cluster, db, tmp_path, tool):
    server = Server(name="ssl", dsn=pg_cluster.dsn() + "?sslmode=require")
    bindir = server.bin_dir()
    dump = tmp_path / "tiny.dump"
    plain = child_env(Server(name="plain", dsn=pg_cluster.dsn()).libpq_env())
    subprocess.run([bindir / "pg_dump", "-Fc", "-f", dump, "--schema-only"], env=plain, check=True)
    argv = [str(a) for a in _tool_argv(bindir, tool, tmp_path, dump)]
    done = subprocess.run(argv, env=child_env(server.libpq_env()), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "server does not support SSL, but SSL was required" in done.stderr


def test_a_backup_with_sslmode_require_fails_clearly_against_a_server_without_ssl(
    sample_cluster, db, passphrase_file, backup_root
):
    Server.objects.create(name="maldives", dsn=sample_cluster.dsn("reliabilitymaldives") + "?sslmode=require")
    result = backup_json()
    assert result["status"] == "failed"
    error = BackupRun.objects.get().error
    assert "server does not support SSL, but SSL was required" in error and "\n" not in error
    # psql says the same of the same DSN.
    psql = subprocess.run(
        [str(Server.objects.get().bin_dir() / "psql"), sample_cluster.dsn() + "?sslmode=require", "-c", "select 1"],
        capture_output=True,
        text=True,
    )
    assert "server does not support SSL, but SSL was required" in psql.stderr


BAD_DSNS = [
    ("postgresql://u@[::1/db", "no closing ']'"),
    ("postgresql://u@127.0.0.1:99999/db", "port is not a number from 1 to 65535"),
    ("postgresql://u@127.0.0.1:five/db", "port is not a number from 1 to 65535"),
    ("postgresql:///db", "names no host"),
    ("postgresql://u@/db", "names no host"),
    ("postgresql://u@h1:5432,h2:5432/db", "several hosts"),
    ("mysql://u@h/db", "must start with postgresql://"),
    ("postgresql://u@h/d%zzb", "'%' that is not followed by two hex digits"),
    ("postgresql://u@h/db?sslmdoe=require", "parameter 'sslmdoe' is not supported"),
    ("postgresql://u@h/db?sslmode=sometimes", "sslmode='sometimes' is not one of"),
    ("postgresql://u@h/db?host=other", "parameter 'host' is not accepted"),
    ("postgresql://u@h/db?password=x", "holds a password"),
    ("postgresql://u@h/db?connect_timeout=soon", "not a number of seconds"),
    # Read before as user "me@corp" on db.example.com, by libpq as user "me" on "corp@db...": refused.
    ("postgresql://me@corp@db.example.com:5432/app", "an '@' that is not the one before its host"),
    ("postgresql://db1?sslmode=verify-full&application_name=ops@corp", "an '@' that is not the one before its host"),
]


@pytest.mark.parametrize("dsn,problem", BAD_DSNS)
def test_a_bad_dsn_is_refused_with_one_line_by_addserver_and_the_admin(client, sam, dsn, problem):
    with pytest.raises(DsnError, match=problem.replace("[", r"\[").replace("?", r"\?")):
        parse(dsn)
    with pytest.raises(CommandError) as e:
        call_command("addserver", "x", "--dsn", dsn)
    assert problem in str(e.value) and "\n" not in str(e.value)
    client.force_login(sam)
    url = reverse("admin:backups_server_add")
    response = client.post(url, admin_form_data(client, url, name="x", dsn=dsn))
    assert response.status_code == 200
    assert problem.replace("'", "&#x27;") in response.content.decode()
    assert not Server.objects.exists()


@pytest.mark.parametrize(
    "dsn,problem",
    [
        # libpq reads up to the first '@' before any '/': "?" and ":" belong to the password.
        ("postgresql://pwuser:Dsn-Secret-7f3a9?x@127.0.0.1:5432/db", "the DSN holds a password"),
        ("postgresql://pwuser:ab:Dsn-Secret-7f3a9@127.0.0.1:5432/db", "the DSN holds a password"),
        # Its '@' forgotten, the password reads as a port: said, never quoted.
        ("postgresql://pwuser:Dsn-Secret-7f3a9/db", "port is not a number from 1 to 65535"),
        ("postgresql://pwuser:Dsn-Secret-7f3a9?sslmode=require", "port is not a number from 1 to 65535"),
        ("postgresql://[::1]Dsn-Secret-7f3a9@x/db", "the DSN holds a password"),
        ("postgresql://[::1Dsn-Secret-7f3a9/db", "no closing ']'"),
    ],
)
def test_a_password_in_a_dsn_is_never_echoed_whatever_is_wrong_with_it(client, sam, dsn, problem):
    with pytest.raises(CommandError) as e:
        call_command("addserver", "x", "--dsn", dsn)
    assert problem in str(e.value) and "Dsn-Secret" not in str(e.value)
    client.force_login(sam)
    url = reverse("admin:backups_server_add")
    page = client.post(url, admin_form_data(client, url, name="x", dsn=dsn)).content.decode()
    assert problem.lower() in page.replace("&#x27;", "'").lower()
    assert "Dsn-Secret" not in page  # not even in the field it was typed in
    assert not Server.objects.exists()


def test_addserver_on_the_command_line_says_what_is_wrong_without_a_traceback(settings, db):
    from tests.helpers import manage

    proc = manage(settings, "addserver", "x", "--dsn", "postgresql://u@[::1/db")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err and "no closing ']'" in err and len(err.strip().splitlines()) == 1


# --- 9. The password is sealed at rest, with a key kept outside the catalog. -----------------


def raw_row(server):
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM backups_server WHERE id = %s", [server.pk])
        return [str(value) for value in cursor.fetchone()]


def test_the_catalog_holds_no_password_in_clear(secret_server, settings):
    assert not any(DSN_PASSWORD in value for value in raw_row(secret_server))
    assert secret_server.password_sealed.startswith("aesgcm1:")
    assert settings.SECRETS_KEY_FILE.stat().st_mode & 0o777 == 0o600
    assert Server.objects.get().password == DSN_PASSWORD


def test_a_catalog_copied_without_the_key_gives_up_no_password(secret_server, settings, tmp_path, passphrase_file):
    settings.SECRETS_KEY_FILE = tmp_path / "not-copied.key"
    server = Server.objects.get()
    with pytest.raises(SealError, match="secrets key .*not-copied.key \\(SECRETS_KEY_FILE\\) is missing"):
        server.password  # noqa: B018
    with pytest.raises(psycopg.OperationalError, match="is missing"):
        server.connect()
    with pytest.raises(BackupFailed, match="is missing"):
        server.libpq_env()
    assert not settings.SECRETS_KEY_FILE.exists(), "reading never makes a new key"


def test_another_key_or_an_altered_row_opens_nothing(secret_server, settings, tmp_path):
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    other.chmod(0o600)
    settings.SECRETS_KEY_FILE = other
    with pytest.raises(SealError, match="does not open with the secrets key"):
        Server.objects.get().password  # noqa: B018


def test_a_sealed_password_moved_to_another_host_behind_the_portals_back_opens_for_nobody(secret_server):
    # Someone with write access to the catalog (not to the key) points the row at their host.
    Server.objects.filter(pk=secret_server.pk).update(
        dsn="postgresql://backup_user@203.0.113.9:5432/reliabilitymaldives",
        password_target="backup_user@203.0.113.9:5432",
    )
    with pytest.raises(SealError):
        Server.objects.get().password  # noqa: B018


def test_a_key_file_others_can_read_is_refused(secret_server, settings):
    settings.SECRETS_KEY_FILE.chmod(0o644)
    try:
        with pytest.raises(SealError, match="can be read by others: chmod 600"):
            Server.objects.get().password  # noqa: B018
    finally:
        settings.SECRETS_KEY_FILE.chmod(0o600)


def test_addserver_seals_the_password_from_its_file(pg_cluster, db, tmp_path):
    pg_cluster.create_role("app", password="right-password")
    secret = tmp_path / "pw"
    secret.write_text("right-password\n")
    secret.chmod(0o600)
    call_command("addserver", "x", "--dsn", pg_cluster.dsn("postgres", user="app"), "--password-file", str(secret))
    server = Server.objects.get()
    assert not any("right-password" in value for value in raw_row(server))
    assert server.password == "right-password"


def test_clear_text_passwords_of_an_older_catalog_are_sealed_by_the_migration(transactional_db):
    from django.db.migrations.executor import MigrationExecutor

    before = [("backups", "0004_catalog_indexes")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old_server = executor.loader.project_state(before).apps.get_model("backups", "Server")
    old_server.objects.create(name="legacy", dsn="postgresql://app@db.example:5433/sales", password="Legacy-Clear-1")
    old_server.objects.create(name="trusted", dsn="postgresql://postgres@db.example/sales", password="")

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    legacy = Server.objects.get(name="legacy")
    assert not any("Legacy-Clear-1" in value for value in raw_row(legacy))
    assert legacy.password_target == "app@db.example:5433" and legacy.password == "Legacy-Clear-1"
    assert Server.objects.get(name="trusted").password_sealed == ""


def test_a_replication_user_who_may_not_connect_to_the_database_still_gets_its_tools(sample_cluster, db):
    # pg_receivewal's user: REPLICATION, but no CONNECT on the DSN's database.
    sample_cluster.execute("CREATE ROLE receiver LOGIN REPLICATION PASSWORD 'Receiver-Secret-3'")
    sample_cluster.execute("REVOKE CONNECT ON DATABASE reliabilitymaldives FROM PUBLIC")
    server = Server(name="pull", dsn=sample_cluster.dsn("reliabilitymaldives", user="receiver"))
    server.password = "Receiver-Secret-3"
    env = child_env(server.libpq_env())
    assert env["PGPASSWORD"] == "Receiver-Secret-3"
    argv = [str(server.bin_dir() / "pg_receivewal"), "--create-slot", "--slot", "bp_probe", "--no-password"]
    subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    assert sample_cluster.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'bp_probe'") == [(1,)]


def test_the_key_is_made_by_a_new_portals_migrate_and_never_at_use(secret_server, settings, tmp_path):
    from django.apps import apps

    from backups.apps import create_secrets_key_on_migrate

    # A worker host without the key cannot seal a password under a key of its own.
    settings.SECRETS_KEY_FILE = tmp_path / "worker.key"
    with pytest.raises(SealError, match="is missing"):
        Server(name="y", dsn="postgresql://app@db.example/sales").password = "Any-Secret-4"
    # Nor does its migrate make one while the catalog holds passwords sealed with the real key.
    create_secrets_key_on_migrate(apps.get_app_config("backups"), apps=apps)
    assert not settings.SECRETS_KEY_FILE.exists()
    # A new portal's migrate (no sealed password yet) makes it, private.
    Server.objects.all().delete()
    create_secrets_key_on_migrate(apps.get_app_config("backups"), apps=apps)
    assert settings.SECRETS_KEY_FILE.stat().st_mode & 0o777 == 0o600


def test_the_first_backup_of_a_server_it_cannot_reach_says_so_once(db, passphrase_file, backup_root, caplog):
    """Found by a probe: before the right line, stderr said "the cluster's system identifier was not
    compared with its earlier backups': connection refused", of a server that has no backups."""
    from backupportal.lib.osuser import free_port
    from backups.models import Server
    from tests.helpers import backup_json

    Server.objects.create(name="maldives", dsn=f"postgresql://portal@127.0.0.1:{free_port()}/reliabilitymaldives")
    result = backup_json()
    assert result["status"] == "failed" and "127.0.0.1" in result["error"], result
    assert not [r for r in caplog.records if "system identifier" in r.getMessage()]
