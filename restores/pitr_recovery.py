"""The restored cluster's recovery: its settings (recovery.signal and postgresql.auto.conf, the
PostgreSQL 12+ way), pg_ctl as the database OS user, waiting until it promotes, and where
recovery stopped, asked of the cluster and judged by pitr_verdict. Split from restores/pitr.py.

The copy is production's data directory: whatever production was set to do, it would do too.
Recovery is therefore told everything explicitly, after production's own settings: no archiving,
no standby (standby.signal removed, no primary_conninfo), exactly one recovery target, and no
logical replication worker, so that a subscription the copy brings never takes rows from the
production subscriber's slot. After promotion each subscription is detached from that slot.
"""

import os
import re
import shlex
import subprocess
import time
from datetime import UTC

import psycopg
from django.conf import settings
from django.utils import timezone

from backupportal.lib.libpq import SAFE_AUTH
from backupportal.lib.osuser import give_to_db_user, read_regular, write_as_db_user
from backups import binaries, walspool
from backups.binaries import backup_major
from backups.connection import SESSION_GUARD, guard_newer
from restores import pitr_databases, pitr_host, pitr_libraries, pitr_verdict, targetdb
from restores.models import RestoreRun
from restores.pitr_plan import RestoreFailed
from restores.pitr_prefetch import restore_command


def heartbeat(run):
    RestoreRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())


# Each kind of target and its setting; the others are written empty (target_settings).
TARGET_SETTINGS = {"time": "recovery_target_time", "lsn": "recovery_target_lsn", "name": "recovery_target_name"}
ALL_TARGETS = (
    "recovery_target",
    "recovery_target_xid",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_name",
)
WORKERS_OFF_NOTE = (
    "max_logical_replication_workers = 0 stays in the restored cluster's postgresql.auto.conf: no subscription"
    " it holds can start an apply worker, now or after a restart"
)
SUBSCRIBED_DATABASES = (
    "SELECT DISTINCT d.datname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid ORDER BY 1"
)


def recovery_settings(plan):
    timeline = getattr(plan, "timeline", None)  # the plan's choice, when it makes one
    settings_ = {
        # Waits for the prefetcher's copy of each file (restores/restore_wal.py).
        "restore_command": restore_command(plan.staging),
        "recovery_target_timeline": "latest" if timeline is None else str(timeline),
        # The restored cluster's new timeline must never reach the production archive.
        "archive_mode": "off",
        # A base backup taken from a standby carries how it followed production (standby.signal
        # is removed too): the copy replays the archive only, and never streams from production.
        "primary_conninfo": "",
        "primary_slot_name": "",
        # A standby's leftovers that would act on production's files, or hold replay back.
        "archive_cleanup_command": "",
        "recovery_end_command": "",
        "recovery_min_apply_delay": "0",
        # A subscription in the copy names the production subscriber's slot: an apply worker
        # would take production's rows from it, lost to the real subscriber. None can start, and
        # this stays after the restore (WORKERS_OFF_NOTE); quieten() detaches each after promotion.
        "max_logical_replication_workers": "0",
        # Production's libraries start no background worker here (pitr_libraries: WORKERS_NOTE).
        # Recovery refuses to run with fewer than production's while it takes connections
        # ("insufficient parameter settings"): it takes none (start_and_wait waits for promotion).
        "max_worker_processes": "0",
        "hot_standby": "off",
        # Production's files may name programs and libraries that would run on this host, as the
        # database OS user, when the copy starts: a production superuser can write them (ALTER
        # SYSTEM, a file in the data directory). ssl_passphrase_command is a shell command;
        # a library path relative to the data directory, or a JIT provider, loads code.
        # (pitr_libraries: only libraries in this host's $libdir stay listed.)
        "ssl": "off",
        "ssl_passphrase_command": "",
        "dynamic_library_path": "$libdir",
        "jit": "off",
        "jit_provider": "llvmjit",
        "external_pid_file": "",  # a file written anywhere the database OS user may
        # pg_cron's jobs keep the host and port they were scheduled for (cron.job.nodeport: often
        # production's, on the same host): from a copy they would run there a second time.
        # pg_cron 1.6 and later launches none with this; without pg_cron it is an unused name.
        "cron.launch_active_jobs": "off",
        "port": str(plan.port),
        "listen_addresses": "localhost",
        # A production with synchronous standbys would hang every commit of the copy.
        "synchronous_standby_names": "",
        # tar wrote without fsync, so recovery first syncs the data directory: one syncfs()
        # instead of an fsync per file (seconds even for a small cluster).
        "recovery_init_sync_method": "syncfs",
        # Whether recovery reached its target is read from its log (pitr_verdict): in one known
        # file, in the words the verdict looks for, whatever production's logging settings are.
        "logging_collector": "off",
        "log_destination": "stderr",
        "lc_messages": "C",
        "log_min_messages": "warning",  # its LOG lines ("restored log file", "recovery stopping") at least
    }
    settings_.update(target_settings(plan.target))
    # Without a target, recovery replays all the WAL and promotes by itself.
    settings_["recovery_target_action"] = "promote"
    return settings_


def target_settings(target):
    """Every recovery_target* setting, written after production's: a leftover one (say
    recovery_target_xid) would be a second target, which PostgreSQL refuses at start-up, and
    recovery_target_inclusive = off would stop before a commit stamped at the target time itself. The
    empty ones come first: PostgreSQL refuses to empty another target once one is set."""
    chosen = TARGET_SETTINGS.get(target.kind)
    values = {name: "" for name in ALL_TARGETS if name != chosen}
    if target.kind == "time":
        # In UTC: PostgreSQL reads an offset to the second at most, Python up to the microsecond
        # (a target of +05:00:15.5 was taken, then refused by the copy's start, after the extraction).
        values[chosen] = target.value.astimezone(UTC).isoformat(sep=" ")
    elif chosen:
        values[chosen] = target.value
    # An LSN is a place, not a moment: the copy holds every record that begins before it and
    # nothing after. "on" stopped after the first record beginning at or past the LSN, which could
    # be another transaction's commit (an LSN inside its insert, or read while it was open): the
    # copy held a transaction committed after the target.
    values["recovery_target_inclusive"] = "off" if target.kind == "lsn" else "on"
    return values


def write_recovery_settings(plan):
    """recovery.signal and postgresql.auto.conf: recovery.conf no longer exists (PostgreSQL 12+)."""
    if not (plan.datadir / "postgresql.conf").exists():
        # Debian keeps it in /etc: a copy of the data directory has none. Recovery (hot standby,
        # the default) refuses to run below production's values of the settings pg_control
        # records ("insufficient parameter settings"): those are written, the rest is default.
        recorded = control_parameters(plan)
        lines = ["# written by backupportal's PITR restore", *(f"{k} = {v}" for k, v in recorded.items())]
        write_as_db_user(plan.datadir / "postgresql.conf", ("\n".join(lines) + "\n").encode())
        plan.notes.append(
            "the backup had no postgresql.conf (kept outside the data directory): one was written with"
            + (f" production's {', '.join(f'{k} = {v}' for k, v in recorded.items())}" if recorded else " defaults")
        )
    if not (plan.datadir / "pg_hba.conf").exists():
        write_as_db_user(
            plan.datadir / "pg_hba.conf",
            b"local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
        )
        plan.notes.append("the backup had no pg_hba.conf: one allowing local connections was written")
    if not (plan.datadir / "pg_ident.conf").exists():
        write_as_db_user(
            plan.datadir / "pg_ident.conf", b"# written by backupportal's PITR restore: no user name maps\n"
        )
    if (plan.datadir / "standby.signal").exists():
        (plan.datadir / "standby.signal").unlink()
        plan.notes.append(
            "the backup held standby.signal (taken from a standby): removed, so that the copy recovers from the"
            " archive and promotes instead of following production"
        )
    lines = [
        f"\n# PITR restore by backupportal, {timezone.localtime():%Y-%m-%d %H:%M:%S%z}, target {plan.target.text!r}"
    ]  # a name may hold a line break
    lines += [f"{name} = {walspool.conf_quote(value)}" for name, value in recovery_settings(plan).items()]
    # As the database OS user, whose data directory this is: anything running as that user could
    # have put a link at these names since the extraction, and a write as root would follow it.
    write_as_db_user(plan.datadir / "postgresql.auto.conf", ("\n".join(lines) + "\n").encode(), append=True)
    write_as_db_user(plan.datadir / "recovery.signal", b"")
    (plan.datadir / "log").mkdir(exist_ok=True)  # a link there is given away itself, never followed
    give_to_db_user(plan.datadir / "log")  # what is in it (from the backup) is the user's already
    pitr_host.fit(plan)  # first: an io_method this host lacks hides every other setting
    pitr_libraries.leave_out_missing(plan)
    pitr_host.fit_shared_memory(plan)  # postgres -C shared_memory_size loads the libraries left


# pg_controldata's names of the settings recovery checks against production's, and theirs.
CONTROL_PARAMETERS = {
    "max_connections setting": "max_connections",
    "max_worker_processes setting": "max_worker_processes",
    "max_wal_senders setting": "max_wal_senders",
    "max_prepared_xacts setting": "max_prepared_transactions",
    "max_locks_per_xact setting": "max_locks_per_transaction",
}


def control_parameters(plan):
    """{setting: value} of CONTROL_PARAMETERS as the restored pg_control holds them; {} when it
    cannot be read (the start then says which setting is short)."""
    try:
        tool = binaries.cluster_tool(backup_major(plan.base), "pg_controldata", "reading the restored control file")
        done = subprocess.run(
            [str(tool), "-D", str(plan.datadir)],
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
            timeout=60,
        )
    except (binaries.MissingBinaries, OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in CONTROL_PARAMETERS and value.strip().isdigit():
            found[CONTROL_PARAMETERS[key.strip()]] = value.strip()
    return found


def pg_ctl(plan, *args):
    """binaries.pg_ctl on the restored cluster (of the backup's version until it has a PG_VERSION)."""
    return binaries.pg_ctl(plan.datadir, *args, major=backup_major(plan.base))


def own_files(plan):
    """pg_ctl's -o (through a shell): the copy's data directory and authentication files are its
    own, whatever production's postgresql.conf says (data_directory, hba_file and ident_file are
    read from it before postgresql.auto.conf, and a setting on the command line wins)."""
    files = {
        "data_directory": plan.datadir,
        "hba_file": plan.datadir / "pg_hba.conf",
        "ident_file": plan.datadir / "pg_ident.conf",
    }
    return " ".join(f"-c {shlex.quote(f'{name}={path}')}" for name, path in files.items())


def start_and_wait(plan, run, watch=lambda: None):
    """Start the cluster and wait until it promotes; `watch()` raises what went wrong meanwhile
    (the WAL prefetcher's failure), which is then the restore's error."""
    logfile = plan.datadir / "log" / "pitr-restore.log"
    proc = pg_ctl(plan, "start", "-W", "-l", str(logfile), "-o", own_files(plan))
    if proc.returncode != 0:
        raise RestoreFailed(f"pg_ctl could not start the restored cluster: {(proc.stderr or proc.stdout).strip()}")
    deadline = time.monotonic() + settings.BACKUP_TIMEOUT
    started = beat = time.monotonic()
    # PostgreSQL removes recovery.signal when recovery reached its target and it promotes:
    # looked at often (a short recovery is over in a second), the run's heartbeat written seldom.
    while (plan.datadir / "recovery.signal").exists():
        watch()
        if not postmaster_alive(plan) and time.monotonic() - started > 2:
            watch()  # a fetch failure stopped recovery: that is what to report
            raise RestoreFailed(startup_failure(plan, logfile))
        if time.monotonic() > deadline:
            raise RestoreFailed(f"recovery did not finish within {settings.BACKUP_TIMEOUT} s: see {logfile}")
        if time.monotonic() - beat > 2:
            heartbeat(run)
            beat = time.monotonic()
        time.sleep(0.05)
    plan.recovered = recovered_position(plan, logfile)
    require_running(plan, logfile)
    pitr_verdict.judge(plan, logfile)
    # An old base backup may lack a database's directory (a symbolic link the server skipped).
    pitr_databases.check_all_present(plan, connect)
    quieten(plan, run)


def require_running(plan, logfile):
    """A cluster that stopped as it left recovery (the history file and the end-of-recovery record
    come after recovery.signal is removed: a full disk) is no restore, whatever its log says."""
    if not postmaster_alive(plan):
        raise RestoreFailed(
            f"the restored cluster stopped as recovery ended, nothing runs there: {startup_failure(plan, logfile)}"
        )


def postmaster_alive(plan):
    try:
        pid = int(read_regular(plan.datadir / "postmaster.pid", 4096).split(b"\n", 1)[0])
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return True


def connect(plan, dbname):
    """A connection to the restored cluster as the server's role (production's pg_hba.conf
    decides), with production's event triggers off where the role may (targetdb.quietly)."""
    return targetdb.connect_to_copy(Restored(plan), dbname)


def recovered_position(plan, logfile, wait=30):
    """Where recovery stopped: asked of the promoted cluster, else read from its log."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and postmaster_alive(plan):
        try:
            with connect(plan, plan.server.dbname) as conn:
                in_recovery, replayed_at, lsn, walfile = conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn(), "
                    "CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END"
                ).fetchone()
        except psycopg.OperationalError as e:
            if "authentication" in str(e) or "pg_hba.conf" in str(e):
                break  # the restored cluster lets us in no more than production's rules say
            # Most often "not accepting connections": recovery.signal is gone, the end-of-recovery
            # checkpoint is not done. It ends within a second; waiting 0.3 s here cost 0.3 s a PITR.
            time.sleep(0.05)
            continue
        if in_recovery:  # promoting: recovery.signal is gone, the end-of-recovery checkpoint is not
            time.sleep(0.05)
            continue
        return {
            "recovered_to": timezone.localtime(replayed_at).isoformat(sep=" ") if replayed_at else f"LSN {lsn}",
            "recovered_lsn": str(lsn or ""),
            "timeline": int(walfile[:8], 16),
        }
    return {"recovered_to": logged_position(logfile)}


class Restored:
    """The restored cluster, as restores.targetdb's helpers connect to a server."""

    def __init__(self, plan):
        self.plan = plan
        self.pg_version = plan.server.pg_version  # production's: the copy is of its version

    def connection_settings(self, dbname=None):
        return {}

    def connect(self, dbname, **more):
        """As Server.connect: the session guard first, the caller's options after it."""
        server = self.plan.server
        more["options"] = f"{SESSION_GUARD} {more.get('options') or ''}".strip()
        conn = psycopg.connect(
            host=server.host if server.host.startswith("/") else "127.0.0.1",
            port=self.plan.port,
            user=server.user,
            password=server.password or None,
            require_auth=SAFE_AUTH,  # never the password in clear text, to whatever holds the port
            dbname=dbname,
            connect_timeout=3,
            autocommit=True,
            **more,
        )
        return guard_newer(conn)

    def __str__(self):
        return f"the restored cluster on port {self.plan.port}"


def quieten(plan, run):
    """After promotion, while no apply worker can start: each subscription detached from the
    production subscriber's slot, and pg_cron named. What the DBA must know goes into the result's
    warnings and the run's (its status stays "succeeded": the copy reached its target)."""
    warnings = list(plan.warnings)
    try:
        with connect(plan, plan.server.dbname) as conn:
            databases = [row[0] for row in conn.execute(SUBSCRIBED_DATABASES)]
            libraries = conn.execute(
                "SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'"
            ).fetchone()
            launchers = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type ~ '^pg_cron'").fetchone()
    except psycopg.Error as e:
        databases, libraries, launchers = [], None, (0,)
        warnings.append(
            f"the restored cluster's subscriptions could not be looked for ({first_line(e)}): none can start"
            " (max_logical_replication_workers = 0), but each may still name the production subscriber's slot:"
            " as a superuser, in each database, ALTER SUBSCRIPTION name DISABLE; ALTER SUBSCRIPTION name SET"
            " (slot_name = NONE)"
        )
    for dbname in databases:
        try:
            targetdb.detach_all(
                Restored(plan), dbname, warnings, lambda sub, slot, db=dbname: how_to_resume(sub, slot, db)
            )
        except psycopg.Error as e:
            warnings.append(
                f"the subscriptions in {dbname} could not be detached ({first_line(e)}): none can start"
                " (max_logical_replication_workers = 0), but they still name the production subscriber's slots:"
                f" as a superuser, in {dbname}, ALTER SUBSCRIPTION name DISABLE; ALTER SUBSCRIPTION name SET"
                " (slot_name = NONE)"
            )
    if runs_pg_cron(libraries[0] if libraries else "") or launchers[0]:
        warnings.append(PG_CRON_WARNING)
    plan.notes += [WORKERS_OFF_NOTE, pitr_libraries.WORKERS_NOTE, *unlogged_notes(plan)]
    if warnings:
        plan.recovered["warnings"] = warnings
        RestoreRun.objects.filter(pk=run.pk).update(warnings=warnings)


CONNECTABLE_DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
UNLOGGED_TABLES = (
    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p') ORDER BY 1 LIMIT 11"
)


def unlogged_notes(plan):
    """A note per database holding unlogged tables: recovery leaves them empty (their rows are
    never in the WAL), which a DBA comparing the copy with production should not take for a loss.
    A database the server's role cannot enter is passed over: this is a note, not a check."""
    notes = []
    try:
        with connect(plan, plan.server.dbname) as conn:
            databases = [row[0] for row in conn.execute(CONNECTABLE_DATABASES)]
    except psycopg.Error:
        return notes
    for dbname in databases:
        try:
            with connect(plan, dbname) as conn:
                tables = [row[0] for row in conn.execute(UNLOGGED_TABLES)]
        except psycopg.Error:
            continue
        if tables:
            shown = ", ".join(tables[:10]) + (" and more" if len(tables) > 10 else "")
            notes.append(
                f"unlogged tables in {dbname} are empty in the copy, as after any crash or recovery (their rows"
                f" are never in the WAL): {shown}"
            )
    return notes


def how_to_resume(sub, slot, dbname):
    return (
        f"subscription {sub} in {dbname} was disabled and detached from slot {slot} (the production subscriber's;"
        " the slot on the publisher was not touched). To make this copy replicate, give it a slot of its own:"
        " on the publisher SELECT pg_create_logical_replication_slot('NEW_SLOT', 'pgoutput'); then in"
        f" {dbname}: ALTER SUBSCRIPTION {sub} SET (slot_name = 'NEW_SLOT'); ALTER SUBSCRIPTION {sub} ENABLE;"
        " and ALTER SYSTEM SET max_logical_replication_workers = 4 with a restart (the restore left it 0)."
        f" Never point it at {slot} while production uses it"
    )


PG_CRON_WARNING = (
    "shared_preload_libraries holds pg_cron: the restore wrote cron.launch_active_jobs = off, so pg_cron 1.6"
    " and later launches none of production's jobs here; an older one runs them on their schedule, against"
    " the host and port each was scheduled for (often production's): check SHOW cron.launch_active_jobs, and"
    " if it is not off, UPDATE cron.job SET active = false in the database pg_cron runs in"
    " (cron.database_name), or remove pg_cron from shared_preload_libraries and restart"
)


def runs_pg_cron(libraries):
    """shared_preload_libraries (a comma-separated list, names maybe quoted) loads pg_cron."""
    return "pg_cron" in pitr_libraries.split_list(libraries or "")


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def logged_position(logfile):
    text = pitr_verdict.log_text(logfile)
    m = re.findall(r"last completed transaction was at log time (.+)$", text, re.M)
    return m[-1].strip() if m else f"see {logfile}"


def startup_failure(plan, logfile):
    """One line of why the cluster stopped. A failed restore removes its directory, and the log
    with it: the line quotes the log's last FATAL, and the cause logged just before it (an
    invalid setting, a port it could not bind), rather than pointing at the file."""
    text = pitr_verdict.log_text(logfile)
    lines = text.splitlines()
    fatal = [n for n, line in enumerate(lines) if "FATAL:" in line or "PANIC:" in line]
    if any("recovery ended before configured recovery target was reached" in lines[n] for n in fatal):
        return pitr_verdict.shortfall(plan, text)  # the log goes with the directory: the line says it all
    if not fatal:
        return "the restored cluster stopped during recovery before it logged why"
    said = _message(lines[fatal[-1]])
    cause = next((_message(line) for line in reversed(lines[: fatal[-1]]) if CAUSE.search(line)), "")
    return f"the restored cluster stopped: {said}" + (f" ({cause})" if cause and cause != said else "")


# A line logged just before a FATAL that says what went wrong.
CAUSE = re.compile(
    r"(LOG|WARNING|ERROR):\s+(invalid|could not|cannot|unrecognized|parameter|permission|syntax error)", re.I
)


def _message(line):
    return re.split(r"\b(?:FATAL|PANIC|LOG|WARNING|ERROR):\s+", line, maxsplit=1)[-1].strip()
