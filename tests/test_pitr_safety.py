"""A PITR copy is production's data directory: it must never act like production. Against real
clusters: --target latest that ends short fails; a subscriber's copy takes nothing from the
publisher's slot; a base backup of a standby does not follow production; production's leftover
recovery settings do not break a restore."""

import os
import resource
import shutil
import subprocess
import time
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from django.utils import timezone

from backupportal.lib.osuser import chown_to_db_user, free_port
from backupportal.lib.pgdatadir import make_base_dir
from backups import walingest, walnames, walspool
from restores import pitr as pitr_module
from restores import pitr_host, pitr_libraries, pitr_recovery, pitr_verdict
from restores.models import RestoreRun
from restores.pitr_plan import Target
from tests.helpers import (
    DB,
    a_second_later,
    archive_some_wal,
    enable_push,
    pitr,
    pitr_to,
    push_with_base,
    rows,
    run_command,
    switch_wal,
    wait_archived,
    wait_for,
    write,
)

pytest_plugins = ["tests.walfixtures"]


def a_plan(kind="time", value=None, timeline=None, **more):
    """What recovery_settings and the verdict read of a plan, without a restore."""
    value = value if value is not None else timezone.localtime().replace(microsecond=0)
    plan = SimpleNamespace(staging=Path("/nonexistent/bp_restore_wal"), port=5999, recovered={}, damaged={}, **more)
    plan.target = Target(kind, value, str(value))
    if timeline is not None:
        plan.timeline = timeline
    return plan


# ----------------------------------------------------------------------------- without a cluster


def test_recovery_follows_the_plans_timeline_when_it_names_one_and_the_latest_otherwise():
    assert pitr_recovery.recovery_settings(a_plan())["recovery_target_timeline"] == "latest"
    assert pitr_recovery.recovery_settings(a_plan(timeline=3))["recovery_target_timeline"] == "3"


def test_every_recovery_target_is_written_and_the_chosen_one_after_the_emptied_ones():
    written = pitr_recovery.recovery_settings(a_plan("lsn", "0/3000028"))
    targets = [
        name
        for name in written
        if name.startswith("recovery_target") and name not in ("recovery_target_timeline", "recovery_target_action")
    ]
    assert targets[-2:] == ["recovery_target_lsn", "recovery_target_inclusive"]
    assert {name: written[name] for name in targets} == {
        "recovery_target": "",
        "recovery_target_xid": "",
        "recovery_target_time": "",
        "recovery_target_name": "",
        "recovery_target_lsn": "0/3000028",
        "recovery_target_inclusive": "off",  # every record beginning before the LSN, nothing after
    }
    assert pitr_recovery.recovery_settings(a_plan("time"))["recovery_target_inclusive"] == "on"  # a commit at T is in
    # Python reads an offset to the microsecond, PostgreSQL to the second: written in UTC.
    odd = datetime(
        2026, 12, 7, 10, 0, 0, 250000, tzinfo=dt_timezone(timedelta(hours=5, seconds=15, microseconds=500000))
    )
    assert (
        pitr_recovery.recovery_settings(a_plan("time", odd))["recovery_target_time"]
        == "2026-12-07 04:59:44.750000+00:00"
    )
    latest = pitr_recovery.recovery_settings(a_plan("latest", ""))
    assert all(latest[name] == "" for name in pitr_recovery.ALL_TARGETS)
    assert latest["primary_conninfo"] == latest["primary_slot_name"] == ""
    assert latest["max_logical_replication_workers"] == "0" and latest["archive_mode"] == "off"
    assert latest["max_worker_processes"] == "0" and latest["hot_standby"] == "off"


def test_library_lists_are_split_and_written_as_postgresql_reads_them(tmp_path):
    assert pitr_libraries.split_list(' pg_prewarm ,"odd, name", "say ""hi""",,') == [
        "pg_prewarm",
        "odd, name",
        'say "hi"',
    ]
    assert pitr_libraries.split_list("") == []
    for name in ("plain", "odd, name", 'say "hi"', "Mixed_Case"):
        assert pitr_libraries.split_list(pitr_libraries.quote_name(name)) == [name]
    (tmp_path / "lib" / "plugins").mkdir(parents=True)
    (tmp_path / "lib" / "here.so").write_text("")
    (tmp_path / "lib" / "plugins" / "plug.so").write_text("")
    (tmp_path / "elsewhere.so").write_text("")
    (tmp_path / "lib" / "link.so").symlink_to(tmp_path / "elsewhere.so")
    libdir = tmp_path / "lib"
    for name in ("here", "here.so", "$libdir/here", f"{libdir}/here", "$libdir/plugins/plug"):
        assert pitr_libraries.in_libdir(name, libdir), name
    for name in ("gone", "./here", "lib/here", f"{tmp_path}/elsewhere", "$libdir/../elsewhere", "link"):
        assert not pitr_libraries.in_libdir(name, libdir), name  # not there, or not this host's $libdir
    assert pitr_libraries.in_libdir("plug", libdir, plugins=True)
    assert pitr_libraries.in_libdir("$libdir/plugins/plug", libdir, plugins=True)
    for name in ("here", "$libdir/here", f"{libdir}/plugins/plug"):  # not in plugins, or a path
        assert not pitr_libraries.in_libdir(name, libdir, plugins=True), name


def test_pg_cron_is_seen_in_shared_preload_libraries_however_it_is_listed():
    assert pitr_recovery.runs_pg_cron("pg_stat_statements, pg_cron")
    assert pitr_recovery.runs_pg_cron('"pg_cron"')
    assert not pitr_recovery.runs_pg_cron("pg_cronish,pg_stat_statements")
    assert not pitr_recovery.runs_pg_cron("")


def test_latest_is_reached_only_when_replay_went_into_the_last_planned_segment():
    size = 1 << 20
    plan = a_plan("latest", "", staged={14: "00000001000000000000000E", 15: "00000001000000000000000F"})
    plan.segment_size, plan.datadir = size, Path("/nonexistent")
    plan.recovered = {"recovered_lsn": "0/F00000"}  # the end of 0E: 0F never replayed
    assert pitr_verdict.latest_moment(plan, "") is None
    assert pitr_verdict.shortfall(plan, "").startswith(
        "recovery ended at LSN 0/F00000, short of the end of the archived WAL"
        " (segment 00000001000000000000000F, through LSN 0/1000000)"
    )
    plan.recovered = {"recovered_lsn": "0/1000000"}  # 0F ended by a WAL switch
    assert "replayed to LSN 0/1000000" in pitr_verdict.latest_moment(plan, "")
    # ... unless a planned segment's WAL could not be read to its end: recovery stopped there.
    plan.damaged = {15: ("00000001000000000000000F", "0/F00150", "invalid magic number 0000")}
    assert pitr_verdict.latest_moment(plan, "") is None
    assert pitr_verdict.shortfall(plan, "").endswith(
        "WAL segment 00000001000000000000000F is damaged from LSN 0/F00150 (invalid magic number 0000): replay"
        " cannot go past it, and the WAL after it is lost from this archive; restore to a target before it"
        " (--target-lsn, --target-time) and take a new base backup now"
    )


# ----------------------------------------------------------------------------- real clusters


def test_latest_fails_when_the_last_archived_segment_cannot_be_replayed(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, monkeypatch
):
    # The tablespace check reads each segment first and refuses this one already (pg_waldump finds
    # no header: tests/test_pitr_checks.py); here it stands aside so that the verdict alone is seen.
    monkeypatch.setattr("restores.pitr_checks.tablespace_creations", lambda *args: [])
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    last = archive_some_wal(sample_cluster)  # t2 is created in the last segment only
    # Archived, but no WAL past its header: PostgreSQL reads it as the end of the WAL and would
    # promote there. (A segment zeroed whole is refused by the ingest: backups.walcheck.)
    spooled = walspool.spool_dir(server) / last
    header = spooled.read_bytes()[:40]
    spooled.write_bytes(header + bytes(spooled.stat().st_size - len(header)))
    walingest.ingest(server)

    datadir = restored()
    result = pitr(datadir, free_port(), "--target", "latest")

    assert result["status"] == "failed", result
    start = walnames.segno_of(last, server.wal_segment_size) * server.wal_segment_size
    where = pitr_verdict.lsn_text(start)
    assert result["error"].startswith(f"recovery ended at LSN {where}"), result["error"]
    assert f"short of the end of the archived WAL (segment {last}, through LSN " in result["error"]
    assert f"replay never went into segment {last}" in result["error"]
    assert not datadir.exists() or not any(datadir.iterdir())


def test_a_subscribers_copy_is_detached_from_the_publishers_slot_and_starts_no_apply_worker(
    server, sample_cluster, pg_cluster_of, passphrase_file, backup_root, wal_spool, restored
):
    publisher = pg_cluster_of(15)
    publisher.configure(wal_level="logical")
    publisher.restart()
    publisher.execute("CREATE TABLE feed(x int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE feed")
    enable_push(sample_cluster)
    write(sample_cluster, "CREATE TABLE feed(x int PRIMARY KEY)")
    write(
        sample_cluster,
        f"CREATE SUBSCRIPTION prod_sub CONNECTION 'host=127.0.0.1 port={publisher.port} user=postgres"
        " dbname=postgres' PUBLICATION pub",
    )
    publisher.execute("INSERT INTO feed VALUES (1)")
    wait_for(lambda: sample_cluster.execute("SELECT count(*) FROM feed", dbname=DB)[0][0] == 1, what="replication")
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    target = a_second_later()  # production's subscription is enabled at the target ...
    write(sample_cluster, "ALTER SUBSCRIPTION prod_sub DISABLE")  # ... and stops taking rows after it
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    slot = "SELECT active, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'prod_sub'"
    wait_for(lambda: publisher.execute(slot)[0][0] is False, what="production's apply worker to stop")
    publisher.execute("INSERT INTO feed VALUES (2)")  # waiting in the slot for the real subscriber
    before = publisher.execute(slot)[0]

    port = free_port()
    result = pitr_to(restored(), port, target)

    assert result["status"] == "succeeded", result
    deadline = time.monotonic() + 4  # an apply worker would have taken the slot by now
    while time.monotonic() < deadline:
        assert publisher.execute(slot)[0] == before
        time.sleep(0.2)
    assert rows(port, "SELECT x FROM feed") == [(1,)]
    assert rows(port, "SELECT subname, subenabled, subslotname FROM pg_subscription") == [("prod_sub", False, None)]
    assert rows(port, "SELECT pid FROM pg_stat_subscription") == [(None,)]
    assert rows(port, "SHOW max_logical_replication_workers") == [("0",)]
    (warning,) = result["warnings"]
    assert 'subscription "prod_sub" in reliabilitymaldives was disabled and detached from slot prod_sub' in warning
    assert "ALTER SYSTEM SET max_logical_replication_workers" in warning
    assert RestoreRun.objects.get(pk=result["id"]).warnings == [warning]
    assert pitr_recovery.WORKERS_OFF_NOTE in result["notes"]


def base_then_latest(cluster, server, restored):
    """A base backup of production as it is now, some archived WAL, then a PITR to the latest:
    (data directory, port, the restore's result)."""
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    archive_some_wal(cluster)
    walingest.ingest(server)
    datadir, port = restored(), free_port()
    return datadir, port, pitr(datadir, port, "--target", "latest")


def children(datadir):
    """The process titles of a running cluster's postmaster's children (a background worker that
    connects to no database is not in pg_stat_activity)."""
    postmaster = (Path(datadir) / "postmaster.pid").read_text().split("\n", 1)[0]
    titles = ""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == postmaster:
                titles += (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") + "\n"
        except (OSError, IndexError):
            continue  # gone meanwhile
    return titles


def test_productions_libraries_start_no_worker_in_the_copy_and_one_this_host_lacks_is_left_out(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    # Production runs pg_prewarm's autoprewarm worker, and has since been set to load libraries
    # this host lacks (not yet restarted): the base backup carries that postgresql.auto.conf.
    sample_cluster.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_prewarm'")
    sample_cluster.restart()
    sample_cluster.execute("ALTER SYSTEM SET shared_preload_libraries = pg_prewarm, no_such_library")
    sample_cluster.execute("ALTER SYSTEM SET session_preload_libraries = auto_explain, '$libdir/gone_too'")
    wait_for(lambda: "autoprewarm leader" in children(sample_cluster.datadir), what="production's autoprewarm worker")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert rows(port, "SHOW shared_preload_libraries") == [("pg_prewarm",)]
    assert rows(port, "SHOW session_preload_libraries") == [("auto_explain",)]
    assert rows(port, "SHOW max_worker_processes") == [("0",)]
    deadline = time.monotonic() + 3  # production's worker started within a second of start-up
    while time.monotonic() < deadline:
        assert "autoprewarm leader" not in children(datadir)
        time.sleep(0.2)
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
    shared, session = result["warnings"]
    assert shared.startswith(
        "shared_preload_libraries named no_such_library, which this host's PostgreSQL does not have"
    )
    assert "so that it starts" in shared
    assert session.startswith("session_preload_libraries named $libdir/gone_too,") and "takes connections" in session
    assert RestoreRun.objects.get(pk=result["id"]).warnings == [shared, session]
    assert pitr_libraries.WORKERS_NOTE in result["notes"]


def encrypted_key_and_certificate(directory):
    """A self-signed certificate and its key, the key encrypted: PostgreSQL asks
    ssl_passphrase_command for the passphrase when it starts."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "copy")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "evil.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "evil.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    for part in ("evil.crt", "evil.key"):
        (directory / part).chmod(0o600)
        chown_to_db_user(directory / part)


def test_productions_files_run_no_program_and_load_no_library_of_theirs_when_the_copy_starts(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """A production superuser writes files into the data directory and settings that PostgreSQL
    acts on when it starts (not reloaded: production is unaffected). The copy starts on the
    portal's host: none of it may run there."""
    marker = sample_cluster.datadir.parent / "ran"  # where the database OS user may write
    enable_push(sample_cluster)
    encrypted_key_and_certificate(sample_cluster.datadir)
    (sample_cluster.datadir / "evil.so").write_bytes(b"not a library")
    for setting in (
        "ssl = on",
        "ssl_cert_file = 'evil.crt'",
        "ssl_key_file = 'evil.key'",
        f"ssl_passphrase_command = 'touch {marker}; echo secret'",
        "shared_preload_libraries = './evil'",
        "jit_provider = './evil'",
        "external_pid_file = 'pid-elsewhere'",
    ):
        sample_cluster.execute(f"ALTER SYSTEM SET {setting}")
    with open(sample_cluster.datadir / "postgresql.conf", "a") as conf:  # never allowed in ALTER SYSTEM
        conf.write("hba_file = '/nonexistent/pg_hba.conf'\nident_file = '/nonexistent/pg_ident.conf'\n")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert not marker.exists()
    assert rows(port, "SHOW ssl") == [("off",)]
    assert rows(port, "SHOW shared_preload_libraries") == [("",)]
    assert rows(port, "SHOW jit") == [("off",)]
    assert rows(port, "SHOW hba_file") == [(str(datadir / "pg_hba.conf"),)]
    assert rows(port, "SHOW data_directory") == [(str(datadir),)]
    assert not (datadir / "pid-elsewhere").exists()
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
    assert any(w.startswith("shared_preload_libraries named ./evil, ") for w in result["warnings"]), result["warnings"]


def test_a_copy_of_a_production_tuned_for_a_bigger_host_starts_on_this_one(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Production was tuned for its own host (ALTER SYSTEM, taken at its next restart): shared
    buffers four times this host's memory, huge pages required, dynamic shared memory reserved.
    Each would stop the copy at start-up here ("could not map anonymous shared memory")."""
    enable_push(sample_cluster)
    memory = pitr_host.host_memory()
    sample_cluster.execute(f"ALTER SYSTEM SET shared_buffers = '{4 * memory // 2**20}MB'")
    sample_cluster.execute("ALTER SYSTEM SET huge_pages = on")
    sample_cluster.execute("ALTER SYSTEM SET min_dynamic_shared_memory = '64MB'")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert rows(port, "SHOW huge_pages") == [("try",)]
    assert rows(port, "SHOW min_dynamic_shared_memory") == [("0",)]
    (shared,) = rows(port, "SELECT setting::bigint * 8192 FROM pg_settings WHERE name = 'shared_buffers'")[0]
    (segment,) = rows(port, "SELECT setting::bigint FROM pg_settings WHERE name = 'shared_memory_size'")[0]
    assert pitr_host.SMALLEST_BUFFERS <= shared and segment * 2**20 <= memory // pitr_host.COPY_SHARE + 2**20
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
    (warning,) = result["warnings"]
    assert warning.startswith("production's shared memory (") and "min_dynamic_shared_memory = 0" in warning
    assert f"shared_buffers = {shared // 2**20}MB" in warning
    assert "production's huge_pages = on would stop the copy where this host reserved none" in result["notes"]


@pytest.mark.parametrize("group", ["no_such_group_bp", "root"])  # none here; one the database OS user is not in
def test_a_copy_makes_its_sockets_where_this_host_can_when_productions_cannot_be_made_here(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, group
):
    """Production's own layout: socket directories this host lacks (or one relative to the data
    directory), for a group it does not have. Any of them stopped the copy ("could not create any
    Unix-domain sockets"); the portal reaches the copy on 127.0.0.1, a DBA by its socket too."""
    enable_push(sample_cluster)
    sample_cluster.execute("ALTER SYSTEM SET unix_socket_directories = '/nonexistent/bp-sockets', 'relative'")
    sample_cluster.execute(f"ALTER SYSTEM SET unix_socket_group = '{group}'")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert rows(port, "SHOW unix_socket_group") == [("",)]
    ((directories,),) = rows(port, "SHOW unix_socket_directories")
    if directories:  # this host's PostgreSQL's default, where the database OS user may write
        with psycopg.connect(host=directories, port=port, user="postgres", dbname=DB) as conn:
            assert conn.execute("SELECT count(*) FROM t2").fetchone() == (1,)
    assert (
        f"production's Unix-domain sockets cannot be made on this host (unix_socket_group = '{group}',"
        " unix_socket_directories = '\"/nonexistent/bp-sockets\", relative'): the copy's are made with"
        f" unix_socket_group = '', unix_socket_directories = '{directories}'"
    ) in result["notes"]
    assert not result.get("warnings")


def test_a_copy_reads_no_configuration_file_of_this_host_that_productions_configuration_names(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, request
):
    """production's configuration includes files of its own host: a missing one stopped the copy
    ("could not open configuration file"); one that exists here under that name is this host's,
    and fed the copy its settings. Wherever the include is (postgresql.conf, a file it includes
    from the data directory, postgresql.auto.conf) and however it is spelled (octal escapes), as
    PostgreSQL reads it. Includes inside the data directory are production's: kept."""
    reachable = make_base_dir(None, "bp-elsewhere-")  # this host's file, where the database OS user can read it
    request.addfinalizer(lambda: shutil.rmtree(reachable))
    elsewhere = reachable / "tuning.conf"
    elsewhere.write_text("work_mem = '77MB'\n")
    elsewhere.chmod(0o644)
    confd = sample_cluster.datadir / "conf.d"
    confd.mkdir()
    (confd / "ours.conf").write_text("maintenance_work_mem = '99MB'\ninclude '/nonexistent/bp-nested.conf'\n")
    chown_to_db_user(confd)
    chown_to_db_user(confd / "ours.conf")
    enable_push(sample_cluster)
    with open(sample_cluster.datadir / "postgresql.conf", "a") as conf:  # not reloaded: production is unaffected
        conf.write(
            f"include '/nonexistent/bp-tuning.conf'\nInclude_If_Exists = '{elsewhere}'\ninclude_dir 'conf.d'\n"
            "include '\\057nonexistent\\057bp-octal.conf'\nbp.note = 'a\rinclude /y'\n"  # \r: no line break
        )
    with open(sample_cluster.datadir / "postgresql.auto.conf", "a") as conf:  # a superuser may write it
        conf.write("include_if_exists '/nonexistent/bp-auto.conf'\n")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert rows(port, "SHOW work_mem") == [("4MB",)]
    assert rows(port, "SHOW maintenance_work_mem") == [("99MB",)]
    assert rows(port, "SHOW bp.note") == [("a\rinclude /y",)]
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
    assert result["warnings"] == [
        "production's configuration names include '/nonexistent/bp-tuning.conf' (in postgresql.conf),"
        f" include_if_exists '{elsewhere}' (in postgresql.conf), include '/nonexistent/bp-octal.conf' (in"
        " postgresql.conf), include_if_exists '/nonexistent/bp-auto.conf' (in postgresql.auto.conf), include"
        " '/nonexistent/bp-nested.conf' (in conf.d/ours.conf), outside its data directory: not in the backup, and"
        " this host's file of that name is not production's; left out of the copy, whose settings there are"
        " PostgreSQL's defaults or those of production's other files (where the copy needs them, copy the file"
        " into its data directory and include it from there)"
    ]


def test_a_copy_starts_with_what_this_host_offers_where_it_refuses_productions_values(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """Values valid on production's host that this one refuses ("invalid value for parameter"):
    a locale and a time zone it lacks (initdb writes production's locale into postgresql.conf), a
    stack deeper than its limit. Any of them stopped the copy, and hid every other setting."""
    limited = resource.getrlimit(resource.RLIMIT_STACK)[0] != resource.RLIM_INFINITY  # else any depth is valid
    enable_push(sample_cluster)
    with open(sample_cluster.datadir / "postgresql.conf", "a") as conf:  # not reloaded
        conf.write("lc_monetary = 'xx_BP.UTF-8'\nlc_time = 'xx_BP.UTF-8'\nTimeZone = 'Mars/Olympus'\n")
        conf.write("max_stack_depth = '100GB'\n" if limited else "")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert rows(port, "SHOW lc_monetary") == rows(port, "SHOW lc_time") == [("C",)]
    assert rows(port, "SHOW TimeZone") == [("UTC",)]
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
    stack = (", max_stack_depth = '104857600kB'", ", max_stack_depth = 2MB") if limited else ("", "")
    assert result["warnings"] == [
        f"production's lc_monetary = 'xx_BP.UTF-8', lc_time = 'xx_BP.UTF-8', TimeZone = 'Mars/Olympus'{stack[0]}"
        " are refused by this host's PostgreSQL (a locale, time zone, stack limit, I/O method or compression it"
        f" lacks): the copy runs with lc_monetary = C, lc_time = C, TimeZone = UTC{stack[1]}; where it needs"
        " production's, give this host what it lacks and ALTER SYSTEM RESET it there"
    ]
    if limited:
        assert rows(port, "SHOW max_stack_depth") == [("2MB",)]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds a library with gcc")
def test_no_library_of_productions_runs_while_the_copys_shared_memory_is_sized(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """postgres -C shared_memory_size (computed at run time) loads shared_preload_libraries: read
    before pitr_libraries left out production's own, it ran a library of the data directory's on
    the portal's host. The copy must not run it, at any step."""
    marker = sample_cluster.datadir.parent / "ran"
    (sample_cluster.datadir / "x").mkdir()
    source = sample_cluster.datadir.parent / "evil.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void evil(void) {\n"
        f'  FILE *f = fopen("{marker}", "a"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n'
    )
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", sample_cluster.datadir / "x" / "evil.so", source], check=True)
    chown_to_db_user(sample_cluster.datadir / "x")
    enable_push(sample_cluster)
    sample_cluster.execute("ALTER SYSTEM SET shared_preload_libraries = 'x/evil'")  # taken at the next restart
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert not marker.exists()
    assert rows(port, "SHOW shared_preload_libraries") == [("",)]


def test_a_copy_of_a_bigger_host_is_sized_from_its_own_files_whatever_production_lists(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """A library this host lacks made postgres -C fail, and production's data_directory made it read
    another directory's postgresql.auto.conf: either way the shared memory was not read, and the
    copy did not start ("could not map anonymous shared memory")."""
    enable_push(sample_cluster)
    memory = pitr_host.host_memory()
    sample_cluster.execute(f"ALTER SYSTEM SET shared_buffers = '{4 * memory // 2**20}MB'")
    sample_cluster.execute("ALTER SYSTEM SET shared_preload_libraries = 'no_such_library_bp'")
    with open(sample_cluster.datadir / "postgresql.conf", "a") as conf:  # not reloaded
        conf.write("data_directory = '/nonexistent/bp-pgdata'\n")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    (segment,) = rows(port, "SELECT setting::bigint FROM pg_settings WHERE name = 'shared_memory_size'")[0]
    assert segment * 2**20 <= memory // pitr_host.COPY_SHARE + 2**20
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
    library, memory_warning = result["warnings"]
    assert library.startswith("shared_preload_libraries named no_such_library_bp,")
    assert memory_warning.startswith("production's shared memory (")


@pytest.fixture
def db_owned_dir():
    """A directory the database OS user owns and reaches, as a copy's data directory is: the
    portal writes its configuration files as that user."""
    home = make_base_dir(None, "bp-conf-")
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_min_dynamic_shared_memory_is_counted_once_in_the_copys_shared_memory(monkeypatch, db_owned_dir):
    """shared_memory_size holds min_dynamic_shared_memory already (15 and 18): 4 GiB of buffers and
    4 GiB of dynamic shared memory fit a 6 GiB share once the dynamic part is 0."""
    gib = 1 << 30
    monkeypatch.setattr(pitr_host, "host_memory", lambda: 24 * gib)
    said = {"shared_memory_size": str(8 * 1024 + 200), "min_dynamic_shared_memory": str(4 * 1024)}
    said |= {"shared_buffers": str(4 * gib // 8192), "block_size": "8192"}
    monkeypatch.setattr(pitr_host, "configured", lambda postgres, datadir, name: said[name])
    (db_owned_dir / "postgresql.auto.conf").write_text("")
    chown_to_db_user(db_owned_dir)  # the copy's files are the database OS user's
    plan = SimpleNamespace(datadir=db_owned_dir, warnings=[])
    pitr_host._fit_shared_memory(plan, "postgres")
    written = (db_owned_dir / "postgresql.auto.conf").read_text()
    assert "min_dynamic_shared_memory = '0'" in written and "shared_buffers" not in written


@pytest.mark.parametrize("pg_major", [18])
def test_a_copy_of_a_production_with_io_uring_starts_where_postgresql_has_no_liburing(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """The wheel's PostgreSQL 18 offers sync and worker only, and no lz4 (nor this host an xx_BP locale): a
    production host built with liburing and lz4 may run them (here written into its
    postgresql.conf, not yet restarted). Until the copy's values are set, postgres cannot read
    any of the copy's settings: the libraries production loads must not be emptied for it."""
    enable_push(sample_cluster)
    sample_cluster.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_prewarm'")
    with open(sample_cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write("io_method = io_uring\nwal_compression = lz4\nlc_numeric = 'xx_BP.UTF-8'\n")
    datadir, port, result = base_then_latest(sample_cluster, server, restored)

    assert result["status"] == "succeeded", result
    assert rows(port, "SHOW io_method") == [("worker",)]
    assert rows(port, "SHOW wal_compression") == [("off",)]
    assert rows(port, "SHOW shared_preload_libraries") == [("pg_prewarm",)]
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]
    assert result["warnings"] == [
        "production's io_method = 'io_uring', wal_compression = 'lz4', lc_numeric = 'xx_BP.UTF-8' are refused"
        " by this host's PostgreSQL (a locale, time zone, stack limit, I/O method or compression it lacks): the"
        " copy runs with io_method = worker, wal_compression = off, lc_numeric = C; where it needs production's,"
        " give this host what it lacks and ALTER SYSTEM RESET it there"
    ]


def test_a_base_backup_of_a_standby_is_promoted_and_never_streams_from_production(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, monkeypatch, settings
):
    settings.BACKUP_TIMEOUT = 60  # a copy left in standby mode never promotes: fail within a minute

    def as_from_a_standby(plan):
        """What pg_basebackup of a standby (or -R) leaves in the data directory."""
        (plan.datadir / "standby.signal").touch()
        with open(plan.datadir / "postgresql.auto.conf", "a") as conf:
            conf.write(f"primary_conninfo = 'host=127.0.0.1 port={sample_cluster.port} user=postgres'\n")
        pitr_recovery.write_recovery_settings(plan)

    monkeypatch.setattr(pitr_module, "write_recovery_settings", as_from_a_standby)
    push_with_base(sample_cluster, server)

    datadir, port = restored(), free_port()
    result = pitr(datadir, port, "--target", "latest")

    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT pg_is_in_recovery(), (SELECT count(*) FROM pg_stat_wal_receiver)") == [(False, 0)]
    assert sample_cluster.execute("SELECT count(*) FROM pg_stat_replication")[0][0] == 0
    assert not (datadir / "standby.signal").exists()
    assert "the backup held standby.signal (taken from a standby): removed" in result["notes"]
    assert rows(port, "SELECT count(*) FROM t2") == [(1,)]


def test_leftover_recovery_targets_in_productions_postgresql_conf_do_not_break_a_time_target(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    enable_push(sample_cluster)
    # Left from an old recovery of production; a primary ignores them, its copy would not.
    with open(sample_cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write("recovery_target_inclusive = off\nrecovery_target_xid = '1234'\n")
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    write(sample_cluster, "CREATE TABLE probe(tx text)")
    write(sample_cluster, "INSERT INTO probe VALUES ('A')")
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))

    port = free_port()
    result = pitr_to(restored(), port, target)

    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe") == [("A",)]
    assert rows(port, "SHOW recovery_target_xid") == [("",)]


def test_a_cluster_that_stopped_as_recovery_ended_is_no_restore(tmp_path):
    """recovery.signal is gone (recovery reached its target) but the postmaster died before the
    end-of-recovery record (a full disk): its log's "recovery stopping" line must not make it a
    success. A data directory whose postmaster.pid names no live process stands for it."""
    (tmp_path / "postmaster.pid").write_text("2147480000\n")  # no such process
    log = tmp_path / "pitr-restore.log"
    log.write_text(
        "LOG:  recovery stopping before commit of transaction 740, time 2026-12-05 09:00:01+05\n"
        'PANIC:  could not write to file "pg_wal/xlogtemp.77": No space left on device\n'
    )
    with pytest.raises(pitr_recovery.RestoreFailed) as stopped:
        pitr_recovery.require_running(SimpleNamespace(datadir=tmp_path), log)
    said = str(stopped.value)
    assert said.startswith("the restored cluster stopped as recovery ended, nothing runs there: the restored")
    assert "No space left on device" in said and "\n" not in said


def test_the_hosts_memory_is_its_control_groups_where_one_of_them_is_limited(tmp_path):
    """A container's limit (cgroup v1, as on this machine) or systemd's MemoryMax= on a parent
    group (v2): the copy gets a quarter of that, not of the host's memory."""
    mib, mounts = 1 << 20, tmp_path / "cgroup"  # limits below any host's memory
    v1 = mounts / "memory" / "process_api" / "abc"
    v1.mkdir(parents=True)
    (mounts / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    (v1 / "memory.limit_in_bytes").write_text(f"{3 * mib}\n")
    v2 = mounts / "system.slice" / "backupportal.service"
    v2.mkdir(parents=True)
    (mounts / "system.slice" / "memory.max").write_text(f"{2 * mib}\n")
    (v2 / "memory.max").write_text("max\n")
    groups = tmp_path / "groups"
    groups.write_text("4:memory:/process_api/abc\n1:cpu:/\n")
    assert pitr_host.host_memory(groups, mounts) == 3 * mib
    groups.write_text("0::/system.slice/backupportal.service\n")
    assert pitr_host.host_memory(groups, mounts) == 2 * mib
    groups.write_text("0::/\n")
    assert pitr_host.host_memory(groups, mounts) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_include_names_that_cannot_be_resolved_are_left_out_without_failing_the_restore(db_owned_dir):
    """A NUL (octal escape) ends a name where PostgreSQL's C strings end it; a symbolic link loop
    cannot be resolved: neither may fail the restore as an internal error."""
    (db_owned_dir / "loop").symlink_to(db_owned_dir / "loop")
    (db_owned_dir / "postgresql.conf").write_bytes(b"include '/nonexistent/a\\000b.conf'\ninclude 'loop'\nport = 5\n")
    chown_to_db_user(db_owned_dir)  # the copy's files are the database OS user's
    plan = SimpleNamespace(datadir=db_owned_dir, warnings=[])
    pitr_host.leave_out_includes(plan)
    lines = (db_owned_dir / "postgresql.conf").read_bytes().split(b"\n")
    assert [line.startswith(pitr_host.LEFT_OUT) for line in lines] == [True, True, False, False]
    (warning,) = plan.warnings
    assert warning.startswith(
        "production's configuration names include '/nonexistent/a' (in postgresql.conf), include 'loop' (in"
    )
