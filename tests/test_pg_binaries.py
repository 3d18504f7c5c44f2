"""The PostgreSQL programs the portal runs come only from the directories PG_BIN_DIRS lists.

Sam, a sysadmin, edits servers, yet may only choose among the operator's directories: naming
one would let him run his own pg_dump as the worker. Client tools come from the server's major
version (or the newest at least as new); programs of a data directory from its exact major.
"""

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from backups import binaries
from backups.models import BackupRun, Server
from tests.adminform_helpers import admin_form_data
from tests.helpers import portal_env, register, restore_json
from tests.test_logical_backup import gpg_decrypt

PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def second_dir(tmp_path):
    """Another bin directory: the PostgreSQL 15 programs linked in (their version is honestly 15),
    with pg_dump a wrapper that notes each run before it runs the real one."""
    directory = tmp_path / "pg15-alt" / "bin"
    directory.mkdir(parents=True)
    for program in PG15.iterdir():
        (directory / program.name).symlink_to(program)
    (directory / "pg_dump").unlink()
    wrapper = directory / "pg_dump"
    wrapper.write_text(f'#!/bin/sh\necho ran >> "{directory}/pg_dump.ran"\nexec {PG15}/pg_dump "$@"\n')
    wrapper.chmod(0o755)
    return directory


@pytest.fixture
def rogue_dir(tmp_path):
    """What a sysadmin might type: a directory whose pg_dump is his own program."""
    directory = tmp_path / "rogue"
    directory.mkdir()
    marker = tmp_path / "rogue-ran"
    (directory / "pg_dump").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (directory / "pg_dump").chmod(0o755)
    return directory


def test_a_directory_s_version_is_asked_of_its_own_programs(second_dir, tmp_path):
    assert binaries.dir_major(str(PG15)) == 15
    assert binaries.dir_major(str(second_dir)) == 15
    empty = tmp_path / "empty"
    empty.mkdir()
    assert binaries.dir_major(str(empty)) is None


def test_the_admin_offers_the_listed_directories_and_refuses_a_typed_path(
    client, sam, server, settings, second_dir, rogue_dir
):
    settings.PG_BIN_DIRS = [str(PG15), str(second_dir)]
    client.force_login(sam)
    url = reverse("admin:backups_server_change", args=[server.pk])
    page = client.get(url).content.decode()
    assert f'<option value="{second_dir}">{second_dir} (PostgreSQL 15)</option>' in page
    response = client.post(url, admin_form_data(client, url, pg_bin=str(rogue_dir)))
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    server.refresh_from_db()
    assert server.pg_bin == ""
    response = client.post(url, admin_form_data(client, url, pg_bin=str(second_dir)))
    assert response.status_code == 302, response.context["adminform"].form.errors
    server.refresh_from_db()
    assert server.pg_bin == str(second_dir)


def test_a_backup_runs_the_chosen_directory_s_pg_dump(server, settings, second_dir, passphrase_file, backup_root):
    settings.PG_BIN_DIRS = [str(PG15), str(second_dir)]
    Server.objects.filter(pk=server.pk).update(pg_bin=str(second_dir))
    call_command("backup", "maldives", "--kind", "logical", stdout=StringIO())
    assert BackupRun.objects.get().status == "succeeded"
    assert (second_dir / "pg_dump.ran").read_text() == "ran\n"


def test_a_stored_directory_no_longer_listed_fails_the_backup_by_name(server, rogue_dir, passphrase_file, backup_root):
    # As a row written before directories were checked: the backup refuses it, never runs it.
    Server.objects.filter(pk=server.pk).update(pg_bin=str(rogue_dir))
    with pytest.raises((CommandError, SystemExit)):
        call_command("backup", "maldives", "--kind", "logical", stdout=StringIO(), stderr=StringIO())
    run = BackupRun.objects.get()
    assert run.status == "failed"
    assert f"names {rogue_dir} as its PostgreSQL bin directory, which is not in PG_BIN_DIRS" in run.error
    assert not (rogue_dir.parent / "rogue-ran").exists()


def test_addserver_refuses_a_pg_bin_outside_pg_bin_dirs(sample_cluster, db, rogue_dir):
    with pytest.raises(CommandError) as e:
        call_command(
            "addserver", "maldives", "--dsn", sample_cluster.dsn("reliabilitymaldives"), "--pg-bin", str(rogue_dir)
        )
    assert f"{rogue_dir} is not in PG_BIN_DIRS ({PG15}): choose one of those directories" in str(e.value)
    assert not Server.objects.exists()


def test_addserver_takes_a_listed_directory(sample_cluster, db, settings, second_dir):
    settings.PG_BIN_DIRS = [str(PG15), str(second_dir)]
    call_command(
        "addserver", "maldives", "--dsn", sample_cluster.dsn("reliabilitymaldives"), "--pg-bin", str(second_dir)
    )
    assert Server.objects.get().pg_bin == str(second_dir)


def test_client_tools_come_from_the_server_s_major_or_the_newest_at_least_as_new(server):
    assert binaries.client_tool(server, "pg_dump") == PG15 / "pg_dump"
    # A PostgreSQL 14 server is read by the 15 tools, the newest present.
    server.pg_version = 140011
    assert binaries.client_dir(server) == PG15
    # A PostgreSQL 18 server cannot be dumped by pg_dump 15: refused, by name.
    server.pg_version = 180001
    with pytest.raises(binaries.MissingBinaries) as e:
        binaries.client_tool(server, "pg_dump")
    assert str(e.value).startswith(
        f"no PostgreSQL 18 or newer client tools in PG_BIN_DIRS ({PG15}): server maldives needs them"
    )


def test_programs_of_a_data_directory_must_be_of_its_exact_major():
    assert binaries.cluster_tool(15, "pg_ctl", "a restore") == PG15 / "pg_ctl"
    with pytest.raises(binaries.MissingBinaries) as e:
        binaries.cluster_tool(18, "pg_ctl", "a point-in-time restore of maldives")
    assert str(e.value).startswith(
        f"no PostgreSQL 18 binaries in PG_BIN_DIRS ({PG15}): pg_ctl 18 is needed for a point-in-time restore of maldives"
    )
    with pytest.raises(binaries.MissingBinaries, match="no PostgreSQL 14 binaries"):
        binaries.cluster_tool(14, "pg_waldump", "reading the WAL")


def test_checkserver_and_the_server_page_say_which_directory_is_used(server, client, alice, passphrase_file):
    out = StringIO()
    call_command("checkserver", "maldives", "--json", stdout=out)
    checks = {c["check"]: c for c in json.loads(out.getvalue().splitlines()[-1])["checks"]}
    found = checks["PostgreSQL binaries"]
    assert found["verdict"] == "ok"
    assert found["detail"] == f"client tools from {PG15} (PostgreSQL 15); PG_BIN_DIRS: {PG15} (PostgreSQL 15)"
    client.force_login(alice)
    assert f"client tools from {PG15} (PostgreSQL 15)" in client.get(server.get_absolute_url()).content.decode()


def test_checkserver_fails_when_no_listed_directory_can_serve_the_server(server, settings, tmp_path, passphrase_file):
    settings.PG_BIN_DIRS = [str(tmp_path / "gone")]
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("checkserver", "maldives", "--json", stdout=out, stderr=StringIO())
    checks = {c["check"]: c for c in json.loads(out.getvalue().splitlines()[-1])["checks"]}
    assert checks["PostgreSQL binaries"]["verdict"] == "fail"
    assert "no PostgreSQL 15 or newer client tools in PG_BIN_DIRS" in checks["PostgreSQL binaries"]["detail"]


def startup(settings, **env):
    """`manage.py check` with the environment given: what every process of the portal reads at start."""
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        env=portal_env(settings) | env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_listed_directory_that_is_missing_is_skipped_with_a_warning_at_startup(settings, db, tmp_path):
    gone = tmp_path / "gone" / "bin"
    proc = startup(settings, PG_BIN_DIRS=f"{PG15}:{gone}")
    assert proc.returncode == 0, proc.stderr
    assert f"PG_BIN_DIRS lists {gone}, which does not exist: skipped" in proc.stderr
    settings.PG_BIN_DIRS = [str(PG15), str(gone)]
    assert binaries.usable_dirs() == [(PG15, 15)]


def test_a_relative_directory_in_pg_bin_dirs_stops_the_portal(settings, db):
    proc = startup(settings, PG_BIN_DIRS="bin")
    assert proc.returncode != 0
    assert "PG_BIN_DIRS: 'bin' is not an absolute path" in proc.stderr


def test_pg_bin_alone_is_the_single_directory_form(settings, db):
    code = "import django; django.setup(); from django.conf import settings; print(settings.PG_BIN_DIRS)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=portal_env(settings) | {"PG_BIN": str(PG15)},
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == repr([str(PG15)]), proc.stderr


def test_pg_restore_is_the_target_s_own_unless_it_cannot_read_the_dump(pg18_bin, settings):
    older = Server(name="older", pg_version=150020)
    settings.PG_BIN_DIRS = [str(PG15)]
    assert binaries.client_tool(older, "pg_restore") == PG15 / "pg_restore"
    with pytest.raises(binaries.MissingBinaries) as e:
        binaries.client_tool(older, "pg_restore", dump_major=18)
    assert str(e.value).startswith(f"no PostgreSQL 18 or newer pg_restore in PG_BIN_DIRS ({PG15}): ")
    settings.PG_BIN_DIRS = [str(PG15), str(pg18_bin)]
    # The exact version where it reads the dump (or the dump's version is not known), as before.
    assert binaries.client_tool(older, "pg_restore") == PG15 / "pg_restore"
    assert binaries.client_tool(older, "pg_restore", dump_major=15) == PG15 / "pg_restore"
    assert binaries.client_tool(older, "pg_dump", dump_major=18) == PG15 / "pg_dump"
    newer = Server(name="newer", pg_version=180006)
    assert binaries.client_tool(newer, "pg_restore", dump_major=15) == pg18_bin / "pg_restore"
    # Only tools of 17 or later listed: whatever the dump, they cannot restore into a 15 server.
    settings.PG_BIN_DIRS = [str(pg18_bin)]
    with pytest.raises(binaries.MissingBinaries) as e:
        binaries.client_tool(older, "pg_restore", dump_major=15)
    assert str(e.value) == (
        f"pg_restore 18 ({pg18_bin}) cannot restore into PostgreSQL 15: it sets transaction_timeout, which 15 lacks;"
        " list PostgreSQL 15 client tools in PG_BIN_DIRS"
    )


def test_an_18_backup_is_refused_for_a_15_server_for_the_reasons_it_says(
    pg_cluster_of, db, passphrase_file, backup_root, tmp_path, pg18_bin
):
    new, old = pg_cluster_of(18), pg_cluster_of(15)
    new.create_database("shop")
    new.execute("CREATE TABLE orders (id int PRIMARY KEY, item text NOT NULL)", dbname="shop")
    register(new, "maldives", "shop")
    older = register(old, "older", "postgres")
    call_command("backup", "maldives", stdout=StringIO())
    run = BackupRun.objects.get(server__name="maldives", status="succeeded", kind="logical")
    assert run.details["pg_dump_major"] == 18

    with pytest.raises(binaries.MissingBinaries) as e:
        binaries.client_tool(older, "pg_restore", dump_major=run.details["pg_dump_major"])

    assert str(e.value) == (
        "a backup made by pg_dump 18 cannot be restored into PostgreSQL 15: only pg_restore 18 or newer reads it,"
        " and it sets transaction_timeout, which 15 lacks; restore into a server of PostgreSQL 17 or newer"
    )
    # Both reasons, as stock tools give them.
    (tmp_path / "gnupg").mkdir(mode=0o700)
    dump = tmp_path / "shop.dump"
    gpg_decrypt(backup_root / run.key, passphrase_file, dump)
    refused = subprocess.run([str(PG15 / "pg_restore"), "--list", str(dump)], capture_output=True, text=True)
    assert "unsupported version (1.16) in file header" in refused.stderr
    old.create_database("shop")
    into_15 = [str(pg18_bin / "pg_restore"), "--exit-on-error", "-h", old.host, "-p", str(old.port), "-U", "postgres"]
    failed = subprocess.run([*into_15, "-d", "shop", str(dump)], capture_output=True, text=True)
    assert failed.returncode != 0 and "transaction_timeout" in failed.stderr
    assert binaries.client_tool(register(new, "newer", "postgres"), "pg_restore", dump_major=18).parent == pg18_bin
    # The restore says so before it creates anything on the 15 server.
    result = restore_json(str(run.pk), "--into-server", "older", "--into-database", "shop_copy")
    assert result["status"] == "failed" and result["error"] == str(e.value)
    assert not old.execute("SELECT 1 FROM pg_database WHERE datname = 'shop_copy'")
